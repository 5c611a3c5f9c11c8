"""A seeded generator of Civitai-API-shaped raw pages with realistic structure (the demo's input).

Users have latent taste clusters that drive which LoRAs they use (mostly from their cluster, with habitual
re-use of favourites) and which words they prompt, so recommenders have real signal to find and a random
ranker has none. Activity and reactions are heavy-tailed, base models follow the paper's mix, and a few
records are broken the way real dumps are (missing ids, mistyped fields, duplicates, a malformed line).
The builder treats these pages like any other raw input.
"""

from __future__ import annotations

import gzip
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
from tqdm.auto import tqdm

THEMES: dict[str, list[str]] = {
    "anime": ["anime girl", "school uniform", "cherry blossoms", "magical girl", "cel shading", "twin tails"],
    "cyberpunk": ["cyberpunk city", "neon lights", "rainy street", "hologram", "android", "night market"],
    "cars": ["sports car", "vintage car", "race track", "motion blur", "chrome", "muscle car"],
    "dogs": ["golden retriever", "puppy", "dog in a park", "corgi", "husky in snow", "dog portrait"],
    "scenery": ["mountain lake", "sunset", "misty forest", "waterfall", "aurora", "alpine meadow"],
    "fantasy": ["dragon", "castle", "wizard", "enchanted forest", "elven warrior", "ancient ruins"],
    "portrait": ["realistic portrait", "freckles", "studio lighting", "bokeh", "85mm photo", "soft skin"],
    "food": ["sushi", "ramen bowl", "chocolate cake", "food photography", "fresh fruit", "coffee latte art"],
    "architecture": ["modern house", "gothic cathedral", "interior design", "skyscraper", "brutalist", "loft"],
    "scifi": ["spaceship", "robot", "alien planet", "mech suit", "space station", "laser"],
    "watercolor": ["watercolor flowers", "ink wash", "pastel colors", "botanical", "paper texture", "sketch"],
    "pixel": ["pixel art", "8-bit", "isometric", "retro game", "sprite sheet", "low poly"],
}
QUALITY = ["masterpiece", "best quality", "highly detailed", "8k", "sharp focus", "trending on artstation"]
BASE_MODELS = (
    ["SD 1.5"] * 41
    + ["Pony"] * 31
    + ["SDXL 1.0"] * 12
    + ["Flux.1 D"] * 9
    + ["Illustrious"] * 4
    + ["SD 3.5"] * 2
    + ["Other"] * 1
)
SAMPLERS = ["Euler a", "DPM++ 2M Karras", "DPM++ SDE Karras", "DDIM", "UniPC"]
START = datetime(2023, 1, 1, tzinfo=UTC)


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def generate_raw_sample(
    output_dir: str | os.PathLike,
    users: int = 2000,
    seed: int = 0,
    images_per_user: float = 25.0,
    page_size: int = 200,
    show_progress: bool = True,
) -> dict[str, int]:
    """Write a Civitai-shaped raw dump (`images/` and `models/` API pages) for `users` synthetic users.

    Args:
        output_dir: Folder to create (`images/`, `models/` inside).
        users: Number of users.
        seed: Seed: the same arguments give byte-identical files.
        images_per_user: Mean images per user (activity is long-tailed around it).
        page_size: Items per API page.
        show_progress: Show a progress bar.

    Returns:
        Counts written: `{"images": ..., "models": ..., "broken": ...}`.

    Example:
        ```python
        >>> from imagegem_hf.data.synth import generate_raw_sample
        >>> counts = generate_raw_sample("/tmp/raw", users=50, seed=0, show_progress=False)  # doctest: +SKIP
        ```
    """
    if users < 1:
        raise ValueError(f"users must be ≥ 1, got {users}.")
    rng = np.random.default_rng(seed)
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    themes = list(THEMES)
    usernames = [f"user_{seed}_{i:06d}" for i in range(users)]

    # LoRAs: a theme each, Zipf popularity within the theme, creators drawn from a subset of users.
    n_models = max(3 * len(themes), users // 2)
    model_theme = rng.permutation(np.arange(n_models) % len(themes))  # every theme has LoRAs
    model_pop = rng.zipf(1.6, n_models).clip(max=1000).astype(float)
    creators = rng.choice(users, size=max(1, users // 4), replace=False)
    models, version_ids, version_trigger = [], [], []
    next_version = 100_000
    for m in range(n_models):
        theme = themes[model_theme[m]]
        versions = []
        for v in range(1 + int(rng.random() < 0.2)):
            trigger = f"{theme}_{m}_v{v}"
            versions.append(
                {
                    "id": next_version,
                    "name": f"v{v + 1}.0",
                    "baseModel": str(rng.choice(BASE_MODELS)),
                    "baseModelType": "Standard",
                    "publishedAt": _iso(START + timedelta(days=int(rng.integers(0, 60)))),
                    "trainedWords": [trigger],
                    "availability": "Public",
                    "nsfwLevel": 1,
                    "downloadUrl": f"https://civitai.com/api/download/models/{next_version}",
                    "files": [
                        {
                            "id": next_version * 10,
                            "name": f"{theme}_{m}.safetensors",
                            "sizeKB": 18_000.5,
                            "type": "Model",
                            "primary": True,
                            "metadata": {"fp": "fp16", "format": "SafeTensor"},
                            "pickleScanResult": "Success",
                            "virusScanResult": "Success",
                            "scannedAt": _iso(START),
                            "hashes": {"SHA256": f"{next_version:064X}"},
                        }
                    ],
                    "stats": {"downloadCount": int(model_pop[m] * 10)},
                }
            )
            version_ids.append((m, next_version))
            version_trigger.append(trigger)
            next_version += 1
        models.append(
            {
                "id": 10_000 + m,
                "name": f"{theme.title()} LoRA {m}",
                "description": f"A LoRA for {theme} images.",
                "type": "LORA" if rng.random() > 0.03 else "Checkpoint",
                "nsfw": False,
                "nsfwLevel": 1,
                "allowNoCredit": True,
                "allowCommercialUse": ["Image"],
                "allowDerivatives": True,
                "allowDifferentLicense": True,
                "minor": False,
                "poi": False,
                "tags": [theme, *rng.choice(THEMES[theme], 2, replace=False).tolist()],
                "creator": {"username": usernames[int(rng.choice(creators))]},
                "stats": {
                    "downloadCount": int(model_pop[m] * 10),
                    "ratingCount": int(model_pop[m]),
                    "rating": 4.5,
                    "thumbsUpCount": int(model_pop[m]),
                    "thumbsDownCount": 0,
                },
                "modelVersions": versions,
            }
        )
    version_of = np.array([v for _, v in version_ids])
    version_model = np.array([m for m, _ in version_ids])
    theme_versions = [np.flatnonzero(model_theme[version_model] == t) for t in range(len(themes))]
    version_weight = model_pop[version_model]

    # Users: a main theme, long-tailed activity, an engagement level; images in time order.
    user_theme = rng.integers(0, len(themes), users)
    activity = np.maximum(3, rng.lognormal(np.log(images_per_user) - 0.5, 1.0, users)).astype(int)
    engagement = rng.lognormal(0.0, 1.0, users)
    image_id = 1_000_000
    items = []
    broken = 0
    for u in tqdm(range(users), desc="synth users", disable=not show_progress):
        theme = user_theme[u]
        pool = theme_versions[theme]
        p = version_weight[pool] / version_weight[pool].sum()
        favourites = rng.choice(pool, size=min(3, len(pool)), replace=False, p=p)
        t = START + timedelta(days=float(rng.uniform(60, 500)))
        last = None
        for _ in range(activity[u]):
            t += timedelta(hours=float(rng.exponential(30)))
            r = rng.random()
            if last is not None and r < 0.3:
                chosen = last
            elif r < 0.6:
                chosen = int(rng.choice(favourites))
            elif r < 0.9:
                chosen = int(rng.choice(pool, p=p))
            else:
                chosen = int(rng.choice(len(version_of), p=version_weight / version_weight.sum()))
            last = chosen
            lora_versions = [chosen] + ([int(rng.choice(pool))] if rng.random() < 0.1 else [])
            words = rng.choice(THEMES[themes[theme]], size=int(rng.integers(2, 5)), replace=False).tolist()
            prompt = ", ".join(
                [*rng.choice(QUALITY, 2, replace=False).tolist(), *words, *(version_trigger[v] for v in lora_versions)]
            )
            likes = int(engagement[u] * rng.pareto(1.5) * 3)
            items.append(
                {
                    "id": image_id,
                    "url": f"https://image.civitai.com/x/{image_id}.jpeg",
                    "hash": "U5Q0]~00%M%M",
                    "width": 512,
                    "height": 768,
                    "nsfwLevel": "None",
                    "nsfw": False,
                    "type": "image",
                    "createdAt": _iso(t),
                    "postId": image_id // 3,
                    "username": usernames[u],
                    "modelVersionIds": [int(version_of[v]) for v in lora_versions],
                    "stats": {
                        "cryCount": int(rng.random() < 0.05),
                        "laughCount": int(rng.random() < 0.05),
                        "likeCount": likes,
                        "dislikeCount": 0,
                        "heartCount": int(likes * rng.random() * 0.6),
                        "commentCount": int(rng.random() < 0.1),
                    },
                    "meta": None
                    if rng.random() < 0.02
                    else {
                        "prompt": prompt,
                        "negativePrompt": "lowres, bad anatomy",
                        "seed": int(rng.integers(0, 2**32)),
                        "steps": int(rng.choice([20, 25, 30])),
                        "sampler": str(rng.choice(SAMPLERS)),
                        "cfgScale": float(rng.choice([5.0, 7.0, 7.5])),
                        "Clip skip": int(rng.choice([1, 2])),
                    },
                }
            )
            image_id += 1
    # A few records broken the way real dumps are.
    for k in range(max(1, len(items) // 1000)):
        victim = dict(items[int(rng.integers(0, len(items)))])
        kind = k % 3
        if kind == 0:
            victim.pop("id")
        elif kind == 1:
            victim["width"] = "wide"
        items.append(victim)  # kind 2: a plain duplicate of an existing id
        broken += 1
    rng.shuffle(items)  # API pages are not in user order

    for start in range(0, len(items), page_size):
        page_no = start // page_size
        page = {
            "items": items[start : start + page_size],
            "metadata": {"nextCursor": f"cursor-{page_no + 1}" if start + page_size < len(items) else None},
        }
        if page_no % 2 == 0:
            (out / "images" / f"page_{page_no:05d}.json").write_bytes(orjson.dumps(page))
        else:
            with gzip.GzipFile(out / "images" / f"page_{page_no:05d}.jsonl.gz", "wb", mtime=0) as handle:
                handle.write(orjson.dumps(page) + b"\n")
                if page_no == 1:
                    handle.write(b'{"items": [{"id": 1, \n')  # a truncated line
                    broken += 1
    for start in range(0, len(models), page_size):
        page = {"items": models[start : start + page_size], "metadata": {"nextCursor": None}}
        (out / "models" / f"page_{start // page_size:05d}.json").write_bytes(orjson.dumps(page))
    return {"images": len(items), "models": len(models), "broken": broken}
