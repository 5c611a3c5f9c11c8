"""Synthetic users whose taste can only be read from their own references.

Every image has four independent binary visual attributes (`ATTRIBUTES`): the colour of its shape (red or blue),
the shape (circle or square), the brightness of the background (bright or dark) and the texture of the shape
(striped or plain), drawn with random size, position, tint and pixel noise. A user is a signed mix of the four
attributes, `w = s ⊙ m` with random signs `s ∈ {±1}⁴` and mixing weights `m ~ Dirichlet(α)`, and prefers the image
of higher utility `w · a` (attributes coded ±1); pairs whose utilities differ by less than `margin` are not shown (a
user without a clear preference would have answered "tie", which paper 003 drops).

Users come in mirrored couples (`w` and `−w`) that always land in the same split, so every global score — the
redness of an image, any single attribute, the tiny CLIP score, PickScore on a tiny CLIP, any function of the image
alone — has exactly chance accuracy in expectation on every split; only a model that reads *this* user's liked and
disliked references can beat it. `reference_rule_scores` is that reading done by hand on the true attributes
(agreement with the liked references minus agreement with the disliked ones), the ceiling a learnt model aims at.

Example:
    ```python
    >>> from imagegem_hf.preference.synthetic_users import SyntheticUsersConfig, synthetic_user_splits
    >>> world = synthetic_user_splits(SyntheticUsersConfig(train_users=4, test_users=2, seen_users=2))
    >>> sorted(world.splits)
    ['test_seen', 'test_unseen', 'train']
    ```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from imagegem_hf.preference.data import PreferenceExample

# attribute name → (name of the +1 value, name of the −1 value)
ATTRIBUTES: dict[str, tuple[str, str]] = {
    "colour": ("red", "blue"),
    "shape": ("circle", "square"),
    "brightness": ("bright", "dark"),
    "texture": ("striped", "plain"),
}
RED, BLUE = np.array([205.0, 45.0, 45.0]), np.array([45.0, 70.0, 205.0])


@dataclass
class SyntheticUsersConfig:
    """How many synthetic users, pairs and references, and how their tastes and images are drawn."""

    train_users: int = field(default=256, metadata={"help": "Training users (even: mirrored couples)."})
    test_users: int = field(default=32, metadata={"help": "Unseen test users, never trained on (even)."})
    seen_users: int = field(
        default=32, metadata={"help": "Training users that also give held-out (seen) test pairs (even)."}
    )
    seen_pairs_per_user: int = field(default=2, metadata={"help": "Held-out pairs per seen user."})
    pairs_per_user: int = field(
        default=12, metadata={"help": "Pairs per user; each is a target once, with n_ref of the others as references."}
    )
    n_ref: int = field(default=8, metadata={"help": "Reference pairs per example (paper 003: 8)."})
    image_size: int = field(default=16, metadata={"help": "Side of the square images in pixels."})
    mix_concentration: float = field(
        default=0.5, metadata={"help": "Dirichlet α of each user's attribute mix (small: one attribute dominates)."}
    )
    margin: float = field(
        default=0.5, metadata={"help": "Minimum utility gap |w·(a_liked − a_disliked)| of a shown pair (±1 coding)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the tastes, the images and the reference draws."})

    def __post_init__(self):
        for name in ("train_users", "test_users", "seen_users"):
            if getattr(self, name) % 2:
                raise ValueError(f"{name} must be even (users come in mirrored couples), got {getattr(self, name)}.")
        if self.seen_users > self.train_users:
            raise ValueError(f"seen_users ({self.seen_users}) cannot exceed train_users ({self.train_users}).")
        if self.pairs_per_user <= self.n_ref + self.seen_pairs_per_user:
            raise ValueError(
                f"pairs_per_user ({self.pairs_per_user}) must exceed n_ref + seen_pairs_per_user "
                f"({self.n_ref + self.seen_pairs_per_user}) so that held-out targets keep n_ref references."
            )


def draw_attributes(n: int, rng: np.random.Generator) -> np.ndarray:
    """`(n, 4)` independent uniform ±1 attributes, columns in `ATTRIBUTES` order."""
    return rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, len(ATTRIBUTES)))


def render_image(attributes: Sequence[int], rng: np.random.Generator, size: int = 16) -> Image.Image:
    """Draw one image with the given ±1 attributes (`ATTRIBUTES` order) and random nuisance variation.

    The shape (radius 28–38 % of the side, centre jittered by up to 10 %) is tinted red or blue, filled plain or
    with horizontal stripes, on a bright or dark grey background, plus Gaussian pixel noise.

    Example:
        ```python
        >>> import numpy as np
        >>> render_image([1, 1, -1, 1], np.random.default_rng(0)).size
        (16, 16)
        ```
    """
    colour, shape, brightness, texture = (int(a) for a in attributes)
    grey = rng.uniform(170, 230) if brightness > 0 else rng.uniform(25, 85)
    pixels = np.full((size, size, 3), grey, dtype=np.float64)
    radius = rng.uniform(0.28, 0.38) * size
    cy, cx = (size - 1) / 2 + rng.uniform(-0.1, 0.1, 2) * size
    yy, xx = np.mgrid[:size, :size]
    if shape > 0:
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    else:
        half = 0.886 * radius  # the square of the same area as the circle
        inside = (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
    fill = (RED if colour > 0 else BLUE) + rng.normal(0, 12, 3)
    shade = np.ones((size, size))
    if texture > 0:
        shade[(yy + rng.integers(2)) % 2 == 0] = 0.4
    pixels[inside] = fill * shade[inside][:, None]
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def attribute_caption(attributes: Sequence[int]) -> str:
    """The attributes in words, e.g. `"red circle, bright, striped"`."""
    words = [pos if a > 0 else neg for a, (pos, neg) in zip(attributes, ATTRIBUTES.values(), strict=True)]
    return f"{words[0]} {words[1]}, {words[2]}, {words[3]}"


def draw_tastes(n_couples: int, concentration: float, rng: np.random.Generator) -> np.ndarray:
    """`(2·n_couples, 4)` signed attribute mixes: each couple is a random `w` followed by its mirror `−w`."""
    mixes = rng.dirichlet([concentration] * len(ATTRIBUTES), size=n_couples)
    w = mixes * rng.choice([-1.0, 1.0], size=mixes.shape)
    return np.stack([w, -w], axis=1).reshape(2 * n_couples, len(ATTRIBUTES))


@dataclass
class SyntheticWorld:
    """Synthetic users, their images and their per-user examples.

    Attributes:
        splits: `{"train", "test_seen", "test_unseen"}` → `PreferenceExample`s (the published processed format).
        images: Image key → PIL image.
        attributes: Image key → its ±1 attributes (`ATTRIBUTES` order).
        tastes: User id → the user's signed attribute mix.
        config: The configuration that drew them.
    """

    splits: dict[str, list[PreferenceExample]]
    images: dict[str, Image.Image]
    attributes: dict[str, np.ndarray]
    tastes: dict[str, np.ndarray]
    config: SyntheticUsersConfig

    def load_image(self, key: str) -> Image.Image:
        """The image of `key`; raises `KeyError` naming the key when it is not in this world."""
        try:
            return self.images[key]
        except KeyError:
            raise KeyError(f"Image {key!r} is not one of the {len(self.images)} synthetic images.") from None


def _user_pairs(
    user_id: str, w: np.ndarray, config: SyntheticUsersConfig, rng: np.random.Generator, world: SyntheticWorld
) -> list[tuple[str, str, str]]:
    """Draw the user's pairs `(liked_key, disliked_key, prompt)`, rejecting pairs closer than `config.margin`."""
    pairs = []
    while len(pairs) < config.pairs_per_user:
        a, b = draw_attributes(2, rng)
        gap = float(w @ (a - b))
        if abs(gap) < config.margin:
            continue
        liked, disliked = (a, b) if gap > 0 else (b, a)
        p = len(pairs)
        keys = (f"{user_id}-p{p}-liked", f"{user_id}-p{p}-disliked")
        for key, attributes in zip(keys, (liked, disliked), strict=True):
            world.attributes[key] = attributes
            world.images[key] = render_image(attributes, rng, config.image_size)
        pairs.append((*keys, f"a toy picture, pair {p}"))
    return pairs


def _examples(
    user_id: str,
    pairs: Sequence[tuple[str, str, str]],
    targets: Sequence[int],
    reference_pool: Sequence[int],
    n_ref: int,
    rng: np.random.Generator,
) -> list[PreferenceExample]:
    """One example per target pair, with `n_ref` references drawn from `reference_pool` minus the target."""
    examples = []
    for t in targets:
        pool = [i for i in reference_pool if i != t]
        chosen = rng.choice(pool, size=n_ref, replace=False)
        liked, disliked, prompt = pairs[t]
        flip = bool(rng.integers(2))
        examples.append(
            PreferenceExample(
                user_id=user_id,
                references=[pairs[int(i)] for i in chosen],
                image0=disliked if flip else liked,
                image1=liked if flip else disliked,
                prompt=prompt,
                label0=0 if flip else 1,
            )
        )
    return examples


def synthetic_user_splits(config: SyntheticUsersConfig | None = None) -> SyntheticWorld:
    """Draw synthetic users and split them as paper 003 does, keeping mirrored couples together.

    Unseen test users are never trained on; every pair of theirs is a target once, with `n_ref` of their other pairs
    as references. Seen users are training users of which `seen_pairs_per_user` pairs are held out as targets, with
    references from their training pairs only. Every image belongs to exactly one pair, so no test target is ever a
    reference or a training target.

    Args:
        config: Sizes, tastes and seed (defaults: `SyntheticUsersConfig()`).

    Returns:
        A [`SyntheticWorld`].

    Example:
        ```python
        >>> world = synthetic_user_splits(SyntheticUsersConfig(train_users=4, test_users=2, seen_users=2))
        >>> len(world.splits["test_unseen"])  # 2 users × 12 pairs
        24
        ```
    """
    config = config or SyntheticUsersConfig()
    rng = np.random.default_rng(config.seed)
    n_users = config.train_users + config.test_users
    tastes = draw_tastes(n_users // 2, config.mix_concentration, rng)
    world = SyntheticWorld({"train": [], "test_seen": [], "test_unseen": []}, {}, {}, {}, config)
    for u, w in enumerate(tastes):
        user_id = f"user{u:04d}"
        world.tastes[user_id] = w
        pairs = _user_pairs(user_id, w, config, rng, world)
        everything = range(len(pairs))
        if u >= config.train_users:
            world.splits["test_unseen"] += _examples(user_id, pairs, everything, everything, config.n_ref, rng)
            continue
        held = list(range(config.seen_pairs_per_user)) if u < config.seen_users else []
        kept = [i for i in everything if i not in held]
        world.splits["train"] += _examples(user_id, pairs, kept, kept, config.n_ref, rng)
        world.splits["test_seen"] += _examples(user_id, pairs, held, kept, config.n_ref, rng)
    return world


def reference_rule_scores(
    examples: Sequence[PreferenceExample], attributes: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Score `image0` and `image1` of each example by comparing them with the example's references.

    `score(t) = mean over liked references of agreement(t, r) − mean over disliked references of agreement(t, r)`,
    with `agreement` the number of equal attributes (on the true attributes): a target that looks like what the
    user liked and unlike what they disliked scores high.

    Returns:
        `(scores of image0, scores of image1)`.
    """

    def score(e: PreferenceExample, key: str) -> float:
        target = attributes[key]
        liked = np.stack([attributes[r[0]] for r in e.references])
        disliked = np.stack([attributes[r[1]] for r in e.references])
        return float((liked == target).sum(1).mean() - (disliked == target).sum(1).mean())

    return (
        np.array([score(e, e.image0) for e in examples]),
        np.array([score(e, e.image1) for e in examples]),
    )


def swap_references(examples: Sequence[PreferenceExample]) -> list[PreferenceExample]:
    """The same examples with each reference pair's liked and disliked image exchanged (a control: a model that
    reads the references must now prefer the other target)."""
    return [
        PreferenceExample(e.user_id, [(b, a, p) for a, b, p in e.references], e.image0, e.image1, e.prompt, e.label0)
        for e in examples
    ]


class AttributeScorer:
    """A global score: one attribute of the image, read from the pixels (`Scorer` protocol; the prompt is unused).

    `colour` is the redness of the image (mean red minus mean blue channel), `brightness` its mean grey level,
    `texture` the mean absolute difference between neighbouring rows, `shape` how much of the non-background pixels
    fall in the corners of the shape's bounding box (low for circles).

    Example:
        ```python
        >>> import numpy as np
        >>> scorer = AttributeScorer("colour")
        >>> red, blue = (render_image([c, 1, 1, -1], np.random.default_rng(0)) for c in (1, -1))
        >>> bool(scorer.score([red], [""]) > scorer.score([blue], [""]))
        True
        ```
    """

    def __init__(self, attribute: str):
        if attribute not in ATTRIBUTES:
            raise ValueError(f"Unknown attribute {attribute!r}; choose from {list(ATTRIBUTES)}.")
        self.attribute = attribute

    def _one(self, image: Image.Image) -> float:
        x = np.asarray(image, dtype=np.float64)
        if self.attribute == "colour":
            return float((x[..., 0] - x[..., 2]).mean())
        if self.attribute == "brightness":
            return float(x.mean())
        if self.attribute == "texture":
            return float(np.abs(np.diff(x, axis=0)).mean())
        shape = np.abs(x[..., 0] - x[..., 2]) > 40  # the tinted pixels (the grey background has R ≈ B)
        ys, xs = np.nonzero(shape)
        if len(ys) == 0:
            return 0.0
        box = shape[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        k = max(1, box.shape[0] // 4)
        corners = np.concatenate([box[:k, :k], box[:k, -k:], box[-k:, :k], box[-k:, -k:]], axis=None)
        return -float(corners.mean())  # high for circles (empty corners)

    def score(self, images: list[Image.Image], prompts: list[str], batch_size: int = 16) -> torch.Tensor:
        """One score per image (the prompts are ignored)."""
        return torch.tensor([self._one(im) for im in images], dtype=torch.float32)
