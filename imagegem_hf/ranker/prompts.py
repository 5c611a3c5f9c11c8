"""The prompt templates of ImageGem appendix B (B.1.1–B.1.4), versioned and overridable."""

from __future__ import annotations

from dataclasses import asdict, dataclass

IMAGE_CAPTIONING = """Analyze these images and generate a structured description focusing on:

1. Primary Subject Type (e.g., human, fantasy creature, landscape).

2. Defining Visual Features (facial structure, clothing details, body posture).

3. Artistic Style (anime, realistic, digital painting).

4. Background Elements (futuristic city, ancient palace, foggy forest)."""

IMAGE_RANKING = """Rank images based on similarity to the visual preference profile.

1. Overall Similarity (60 pts)
  - Primary Subject Match (20 pts): Does it belong to the same category?
    (Human, anthropomorphic, animal, scenery, object)
  - Artistic Style (15 pts): Matches reference? (Anime, realistic, digital painting, etc.)
  - Color Palette & Mood (15 pts): Similar tones, lighting, contrast?
  - Background & Setting (10 pts): Same environment (indoor, nature, fantasy, city, etc.)?

2. Detail Similarity (40 pts)
  - Key Features (20 pts):
    - Humans: Hair, clothing, accessories.
    - Animals: Fur color, body shape, eye design.
    - Scenery/Objects: Texture, materials, lighting effects.
  - Pose & Expression (10 pts): Consistency with visual preference profile.
  - Fine Details (10 pts): Composition, small artistic elements.

Return a JSON object:

{
  "image_id": ID,
  "similarity_score": score,
  "explanation": "Brief reason"
}"""

MODEL_CAPTIONING = "Summarize the common features, themes, and styles across these descriptions in detail."

MODEL_RANKING = """Extract a detailed description of the user's visual style preferences.

Compare prompts based on:

1. Primary Subject (e.g., architecture, people, nature, abstract).

2. Artistic Style & Features (e.g., brushwork, realism, shading).

3. Color, Composition, Lighting (e.g., soft pastels, dark cyberpunk, contrast).

Scoring:

90-100: Perfect match with all key preferences
70-89: Strong match with most preferences
50-69: Moderate match with some preferences
30-49: Weak match with few preferences
10-29: Very weak match with preferences
0-9: No match with preferences

Return a JSON object:
{
  "version_id": Version ID,
  "similarity_score": score,
  "explanation": "Brief reason"
}"""

# Appended to a ranking prompt that scores several candidates at once.
MULTI_CANDIDATE_SUFFIX = "Score every candidate below. Return a JSON list with one such object per candidate."


@dataclass
class RankerTemplates:
    """The four appendix-B templates; override any field to change a prompt.

    Attributes:
        version: Name of this template set (saved with the ranker, so results say which prompts produced them).
        image_captioning: B.1.1, turns a user's history images into a preference profile.
        image_ranking: B.1.2, scores candidate images against the profile.
        model_captioning: B.1.3, summarises the prompts/images of a user's models into a profile.
        model_ranking: B.1.4, scores candidate models against the profile.
        multi_candidate_suffix: Asks for one JSON object per candidate when a prompt holds several.

    Example:
        ```python
        >>> from imagegem_hf.ranker.prompts import RankerTemplates
        >>> RankerTemplates().id_key("model")
        'version_id'
        ```
    """

    version: str = "imagegem-appendix-b-v1"
    image_captioning: str = IMAGE_CAPTIONING
    image_ranking: str = IMAGE_RANKING
    model_captioning: str = MODEL_CAPTIONING
    model_ranking: str = MODEL_RANKING
    multi_candidate_suffix: str = MULTI_CANDIDATE_SUFFIX

    def captioning(self, item_type: str) -> str:
        return self.image_captioning if _check(item_type) == "image" else self.model_captioning

    def ranking(self, item_type: str) -> str:
        return self.image_ranking if _check(item_type) == "image" else self.model_ranking

    @staticmethod
    def id_key(item_type: str) -> str:
        """The id field the ranking template asks for: `image_id` or `version_id`."""
        return "image_id" if _check(item_type) == "image" else "version_id"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _check(item_type: str) -> str:
    if item_type not in ("image", "model"):
        raise ValueError(f"item_type must be 'image' or 'model', got {item_type!r}.")
    return item_type
