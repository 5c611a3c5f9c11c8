"""The toy world's images, prompts and attribute measures.

An image is one filled shape on a flat grey background, 32×32 RGB, drawn anti-aliased:

- **colour** (named in prompts): one of six hues 60° apart (`COLOURS`), with jittered saturation and value;
- **shape** (named): circle, square or triangle, all of the same area for a given size;
- **background** (named): dark or light grey;
- **size** (never named): the shape's equal-area radius, uniform in `SIZE_RANGE` pixels;
- position (never named): the centre jitters by up to `MAX_OFFSET` pixels.

Prompts come from one grammar, `"a {colour} {shape} on a {background} background"`, where any part may be left
out (`"a red shape"`, `"a circle on a light background"`, `"a shape"`); what a prompt leaves out is drawn at random.
Every attribute can be measured back from pixels (`measure_attributes`), on rendered and on generated images alike,
so a model's prompt following (`attribute_accuracy`) and any style shift (hue, warmth, size, background
brightness) are numbers, not impressions. A colour grade (`grade`: a warm/cool tint and an exposure) is what the
toy users' LoRAs learn (`imagegem_hf.toy.loras`); prompts never name it.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
COLOURS: dict[str, float] = {
    "red": 0.0,
    "yellow": 60.0,
    "green": 120.0,
    "cyan": 180.0,
    "blue": 240.0,
    "magenta": 300.0,
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, float] = {"dark": 0.15, "light": 0.85}
SIZE_RANGE: tuple[float, float] = (5.0, 10.0)
MAX_OFFSET = 3
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "background")
_VALUES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "background": tuple(BACKGROUNDS),
}
_SUPERSAMPLE = 4
TINT = 0.4  # the red gain (and blue loss) of the warmest grade
EXPOSURE = 0.7  # log2 of the gamma of the darkest grade (the brightest: its inverse)
# A pixel belongs to the subject when its RGB distance to the background colour exceeds this.
_FOREGROUND_DISTANCE = 0.25


@dataclass(frozen=True)
class ToySpec:
    """Everything that determines one toy image.

    Attributes:
        colour: A key of `COLOURS`.
        shape: One of `SHAPES`.
        background: A key of `BACKGROUNDS`.
        size: Equal-area radius in pixels (a circle's radius; squares and triangles have the same area).
        hue_jitter: Degrees added to the colour's hue.
        saturation: HSV saturation of the fill.
        value: HSV value of the fill.
        grey: Background grey level in [0, 1].
        dx: Horizontal offset of the centre in pixels.
        dy: Vertical offset of the centre in pixels.
    """

    colour: str
    shape: str
    background: str
    size: float
    hue_jitter: float = 0.0
    saturation: float = 0.85
    value: float = 0.9
    grey: float | None = None
    dx: float = 0.0
    dy: float = 0.0


def prompt_for(colour: str | None = None, shape: str | None = None, background: str | None = None) -> str:
    """The prompt naming the given attributes (`None` leaves one out).

    Example:
        ```python
        >>> prompt_for("red", "circle", "dark")
        'a red circle on a dark background'
        >>> prompt_for(shape="square"), prompt_for("blue"), prompt_for(background="light")
        ('a square', 'a blue shape', 'a shape on a light background')
        ```
    """
    words = ["a"] + ([colour] if colour else []) + [shape or "shape"]
    if background:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a prompt names, e.g. `{"colour": "red", "shape": "circle"}` (words outside the grammar are
    ignored, so any prompt parses).

    Example:
        ```python
        >>> parse_prompt("a red circle on a dark background")
        {'colour': 'red', 'shape': 'circle', 'background': 'dark'}
        ```
    """
    words = prompt.lower().replace(",", " ").split()
    named: dict[str, str] = {}
    for attribute in ATTRIBUTES:
        found = [w for w in words if w in _VALUES[attribute]]
        if found:
            named[attribute] = found[0]
    return named


def all_prompts() -> list[str]:
    """Every prompt of the grammar (84, from `"a shape"` to `"a red circle on a dark background"`), in a fixed
    order."""
    return [
        prompt_for(colour, shape, background)
        for colour in (*COLOURS, None)
        for shape in (*SHAPES, None)
        for background in (*BACKGROUNDS, None)
    ]


def full_prompts() -> list[str]:
    """The 36 prompts that name colour, shape and background, in a fixed order."""
    return [prompt_for(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def vocabulary() -> list[str]:
    """The words of the grammar (the toy tokenizer's vocabulary)."""
    return ["a", "shape", "on", "background", *COLOURS, *SHAPES, *BACKGROUNDS]


def random_spec(rng: np.random.Generator, **fixed: str) -> ToySpec:
    """A random `ToySpec`; attributes passed in `fixed` (e.g. `colour="red"`) are kept."""
    colour = fixed.get("colour") or str(rng.choice(list(COLOURS)))
    shape = fixed.get("shape") or str(rng.choice(SHAPES))
    background = fixed.get("background") or str(rng.choice(list(BACKGROUNDS)))
    return ToySpec(
        colour=colour,
        shape=shape,
        background=background,
        size=float(rng.uniform(*SIZE_RANGE)),
        hue_jitter=float(rng.uniform(-8.0, 8.0)),
        saturation=float(rng.uniform(0.75, 0.95)),
        value=float(rng.uniform(0.8, 1.0)),
        grey=float(BACKGROUNDS[background] + rng.uniform(-0.05, 0.05)),
        dx=float(rng.uniform(-MAX_OFFSET, MAX_OFFSET)),
        dy=float(rng.uniform(-MAX_OFFSET, MAX_OFFSET)),
    )


def _polygon(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]] | None:
    """Vertices of an equal-area square or triangle (None for a circle)."""
    if shape == "square":
        half = radius * np.sqrt(np.pi) / 2.0
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":
        # An upright equilateral triangle with area π·r²: circumradius R = r·sqrt(4π / (3·sqrt(3))).
        big = radius * np.sqrt(4.0 * np.pi / (3.0 * np.sqrt(3.0)))
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        return [(cx + big * np.cos(a), cy + big * np.sin(a)) for a in angles]
    if shape == "circle":
        return None
    raise ValueError(f"Unknown shape {shape!r}; choose from {SHAPES}.")


def render(spec: ToySpec) -> Image.Image:
    """Draw one toy image (32×32 RGB, anti-aliased by 4× supersampling).

    Example:
        ```python
        >>> from imagegem_hf.toy.world import ToySpec, render
        >>> render(ToySpec("red", "circle", "dark", size=8.0)).size
        (32, 32)
        ```
    """
    s = _SUPERSAMPLE
    grey = BACKGROUNDS[spec.background] if spec.grey is None else spec.grey
    hue = ((COLOURS[spec.colour] + spec.hue_jitter) % 360.0) / 360.0
    fill = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, spec.saturation, spec.value))
    image = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), (round(255 * grey),) * 3)
    draw = ImageDraw.Draw(image)
    cx, cy, radius = (IMAGE_SIZE / 2 + spec.dx) * s, (IMAGE_SIZE / 2 + spec.dy) * s, spec.size * s
    polygon = _polygon(spec.shape, cx, cy, radius)
    if polygon is None:
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon(polygon, fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def grade(image: Image.Image, warmth: float, brightness: float) -> Image.Image:
    """The image in a colour grade, each axis in [−1, 1].

    `warmth` −1 tints every pixel blue (R × 0.6, B × 1.4), +1 red (R × 1.4, B × 0.6); `brightness` −1 darkens it
    (gamma 1.6), +1 brightens it (gamma 0.6), applied after the tint.

    Example:
        ```python
        >>> from PIL import Image
        >>> from imagegem_hf.toy.world import grade
        >>> grade(Image.new("RGB", (1, 1), (128, 128, 128)), warmth=1.0, brightness=0.0).getpixel((0, 0))
        (179, 128, 77)
        ```
    """
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    x = x * np.array([1 + TINT * warmth, 1.0, 1 - TINT * warmth], dtype=np.float32)
    x = np.clip(x, 0.0, 1.0) ** (2.0 ** (-EXPOSURE * brightness))
    return Image.fromarray(np.round(255 * x).astype(np.uint8))


def sample_world(n: int, seed: int = 0, drop_probability: float = 0.2) -> tuple[list[ToySpec], list[str]]:
    """`n` random images' specs and their prompts; each attribute is left out of a prompt with probability
    `drop_probability` (the image still has one, drawn at random).

    Example:
        ```python
        >>> specs, prompts = sample_world(2, seed=0)
        >>> len(specs), len(prompts)
        (2, 2)
        ```
    """
    rng = np.random.default_rng(seed)
    specs, prompts = [], []
    for _ in range(n):
        spec = random_spec(rng)
        keep = rng.random(3) >= drop_probability
        prompts.append(
            prompt_for(
                spec.colour if keep[0] else None, spec.shape if keep[1] else None, spec.background if keep[2] else None
            )
        )
        specs.append(spec)
    return specs, prompts


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.asarray(image, dtype=np.float32)


def background_colour(image: Image.Image | np.ndarray, border: int = 2) -> np.ndarray:
    """The background's RGB colour: the per-channel median of the `border`-pixel ring around the image.

    Toy subjects are drawn away from the edges, so the ring is background wherever the model put the subject.

    Example:
        ```python
        >>> from imagegem_hf.toy.world import ToySpec, background_colour, render
        >>> [round(float(c), 2) for c in background_colour(render(ToySpec("red", "circle", "dark", size=8.0)))]
        [0.15, 0.15, 0.15]
        ```
    """
    x = _as_array(image)
    ring = [x[:border], x[-border:], x[:, :border], x[:, -border:]]
    return np.median(np.concatenate([side.reshape(-1, 3) for side in ring]), axis=0)


def _templates(cx: float, cy: float, radius: float, size: int) -> dict[str, np.ndarray]:
    """Binary masks of the three shapes with centre (cx, cy) and equal-area radius `radius`."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    masks = {"circle": (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2}
    half = radius * np.sqrt(np.pi) / 2.0
    masks["square"] = (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    (x0, y0), (x1, y1), (x2, y2) = _polygon("triangle", cx, cy, radius)
    inside = np.ones_like(xs, dtype=bool)
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y1)), ((x1, y1), (x2, y2)), ((x2, y2), (x0, y0))):
        inside &= (bx - ax) * (ys - ay) - (by - ay) * (xs - ax) >= 0
    masks["triangle"] = inside
    return masks


def _hue_distance(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    d = np.abs(np.asarray(a) - np.asarray(b)) % 360.0
    return np.minimum(d, 360.0 - d)


def _coverage(x: np.ndarray, background: np.ndarray, mask: np.ndarray) -> float:
    """Alpha-matte area of the subject as a fraction of the image (see `measure_attributes`)."""
    offset = x - background
    distance = np.linalg.norm(offset[mask], axis=-1)
    subject = offset[mask][distance >= np.quantile(distance, 0.75)].mean(axis=0)
    return float((offset @ subject).mean() / float(subject @ subject))


def measure_attributes(images: Sequence[Image.Image | np.ndarray]) -> dict[str, np.ndarray]:
    """Measure every attribute of each image from its pixels.

    The background colour is the median of the outer 2-pixel ring; the subject is every pixel farther than 0.25
    (RGB distance, channels in [0, 1]) from it. Colour is the nearest named hue to the subject's mean colour;
    shape is the template (circle, square, triangle with the subject's centroid and area) of highest IoU.
    Coverage reads the image as an alpha matte between the background and the subject colour (the mean of the
    subject's most distinct quarter of pixels): each pixel counts by where it lies on the line from one to the other,
    so it is the drawn area itself on rendered images, it does not change when an image is blurred, and zero-mean
    noise leaves it unchanged on average, whereas `size` (pixels past the threshold) grows with both.

    Args:
        images: PIL images or float arrays `(H, W, 3)` in [0, 1].

    Returns:
        A dict of arrays, one entry per image:
        `colour`, `shape`, `background` (names; `""` when no subject is found),
        `hue` (degrees), `saturation`, `value` (of the subject's mean colour), `warmth` (mean R − B over the subject,
        in [−1, 1]), `size` (fraction of the image covered by the subject), `radius` (equal-area radius in pixels),
        `brightness` (background grey level), `shape_iou` (IoU of the best template), `coverage` (alpha-matte area
        of the subject as a fraction of the image; 0 when no subject is found).

    Example:
        ```python
        >>> from imagegem_hf.toy.world import ToySpec, measure_attributes, render
        >>> m = measure_attributes([render(ToySpec("blue", "square", "light", size=8.0))])
        >>> m["colour"][0], m["shape"][0], m["background"][0]
        ('blue', 'square', 'light')
        ```
    """
    names = list(COLOURS)
    hues = np.array([COLOURS[n] for n in names])
    out: dict[str, list] = {
        k: []
        for k in (
            "colour",
            "shape",
            "background",
            "hue",
            "saturation",
            "value",
            "warmth",
            "size",
            "radius",
            "brightness",
            "shape_iou",
            "coverage",
        )
    }
    for image in images:
        x = _as_array(image)
        h, w, _ = x.shape
        background = background_colour(x)
        brightness = float(background.mean())
        mask = np.linalg.norm(x - background, axis=-1) > _FOREGROUND_DISTANCE
        area = int(mask.sum())
        out["background"].append("dark" if brightness < 0.5 else "light")
        out["brightness"].append(brightness)
        out["size"].append(area / (h * w))
        out["radius"].append(float(np.sqrt(area / np.pi)))
        if area == 0:
            for key, empty in (("colour", ""), ("shape", ""), ("hue", np.nan), ("saturation", 0.0)):
                out[key].append(empty)
            for key in ("value", "warmth", "shape_iou", "coverage"):
                out[key].append(0.0 if key != "value" else brightness)
            continue
        mean = x[mask].mean(axis=0)
        hue, saturation, value = colorsys.rgb_to_hsv(*(float(c) for c in mean))
        out["hue"].append(hue * 360.0)
        out["saturation"].append(saturation)
        out["value"].append(value)
        out["colour"].append(names[int(np.argmin(_hue_distance(hue * 360.0, hues)))])
        out["warmth"].append(float((x[mask][:, 0] - x[mask][:, 2]).mean()))
        ys, xs = np.nonzero(mask)
        templates = _templates(xs.mean() + 0.5, ys.mean() + 0.5, np.sqrt(area / np.pi), h)
        ious = {name: (mask & t).sum() / max((mask | t).sum(), 1) for name, t in templates.items()}
        best = max(ious, key=ious.get)
        out["shape"].append(best)
        out["shape_iou"].append(float(ious[best]))
        out["coverage"].append(_coverage(x, background, mask))
    return {k: np.asarray(v) for k, v in out.items()}


def attribute_accuracy(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
    """How often each attribute a prompt names is the one measured in its image, with the chance level.

    Args:
        images: Generated (or rendered) images.
        prompts: The prompt of each image.

    Returns:
        `{"colour": acc, "shape": acc, "background": acc, "mean": acc, "chance": chance, "n": named}` where
        `mean` is over every named (image, attribute) and `chance` is the accuracy of a uniform guess over the same.

    Example:
        ```python
        >>> from imagegem_hf.toy.world import ToySpec, attribute_accuracy, render
        >>> image = render(ToySpec("red", "circle", "dark", size=8.0))
        >>> attribute_accuracy([image], ["a red circle"])["mean"]
        1.0
        ```
    """
    if len(images) != len(prompts):
        raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts; pass one prompt per image.")
    measured = measure_attributes(images)
    hits: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    chance: list[float] = []
    for i, prompt in enumerate(prompts):
        for attribute, value in parse_prompt(prompt).items():
            hits[attribute].append(bool(measured[attribute][i] == value))
            chance.append(1.0 / len(_VALUES[attribute]))
    every = [h for a in ATTRIBUTES for h in hits[a]]
    result = {a: float(np.mean(hits[a])) if hits[a] else float("nan") for a in ATTRIBUTES}
    result["mean"] = float(np.mean(every)) if every else float("nan")
    result["chance"] = float(np.mean(chance)) if chance else float("nan")
    result["n"] = len(every)
    return result
