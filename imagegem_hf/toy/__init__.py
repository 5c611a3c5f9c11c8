"""A trained toy world in which text-to-image methods show measurable effects in seconds on a CPU.

Images are 32×32 coloured shapes on grey backgrounds (`world`): six hues, three shapes, dark or light backgrounds,
named by prompts from a small grammar ("a red circle on a dark background", "a square", ...), plus a size and a
position that prompts never name. Every attribute is measured back from pixels (`measure_attributes`), so prompt
following (`attribute_accuracy`, with its chance level) and any style shift (hue, warmth, size, brightness) are
numbers.

The model (`load_toy_pipeline`) is a `StableDiffusionPipeline` of the SD 1.5 architecture at toy scale (a
`UNet2DConditionModel` with cross-attention on 4×16×16 latents, an `AutoencoderKL` with downsampling factor 2, a
`CLIPTextModel` and a `CLIPTokenizer` over the grammar's words), trained from scratch by `imagegem_hf.toy.train` in a
about 19 CPU minutes and shipped with the package as safetensors. LoRAs, Diffusion-DPO, weight-space edits and
samplers apply to it exactly as to SD 1.5; `ToyReward` (bigger subjects are better) implements the scorer protocol.

Example:
    ```python
    >>> from imagegem_hf.toy import attribute_accuracy, generate, load_toy_pipeline
    >>> pipe = load_toy_pipeline()
    >>> images = generate(pipe, ["a red circle on a dark background"] * 4, seeds=[0, 1, 2, 3])
    >>> attribute_accuracy(images, ["a red circle on a dark background"] * 4)["mean"]  # doctest: +SKIP
    1.0
    ```
"""

from imagegem_hf.toy.evaluation import (
    TOY_GUIDANCE_SCALE,
    TOY_INFERENCE_STEPS,
    PromptFollowing,
    generate,
    prompt_following,
)
from imagegem_hf.toy.figures import captioned_grid
from imagegem_hf.toy.pipeline import TOY_PIPELINE_PATH, load_toy_pipeline, toy_components, toy_tokenizer
from imagegem_hf.toy.reward import ToyReward
from imagegem_hf.toy.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    SIZE_RANGE,
    ToySpec,
    all_prompts,
    attribute_accuracy,
    full_prompts,
    measure_attributes,
    parse_prompt,
    prompt_for,
    random_spec,
    render,
    sample_world,
)

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLOURS",
    "IMAGE_SIZE",
    "SHAPES",
    "SIZE_RANGE",
    "TOY_GUIDANCE_SCALE",
    "TOY_INFERENCE_STEPS",
    "TOY_PIPELINE_PATH",
    "PromptFollowing",
    "ToyReward",
    "ToySpec",
    "all_prompts",
    "attribute_accuracy",
    "captioned_grid",
    "full_prompts",
    "generate",
    "load_toy_pipeline",
    "measure_attributes",
    "parse_prompt",
    "prompt_following",
    "prompt_for",
    "random_spec",
    "render",
    "sample_world",
    "toy_components",
    "toy_tokenizer",
]
