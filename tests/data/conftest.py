import gzip
import json

import pytest

IMAGE_ITEM = {
    "id": 11,
    "url": "https://image.civitai.com/x/11.jpeg",
    "hash": "U5Q0]~00",
    "width": 512,
    "height": 768,
    "nsfwLevel": "Soft",
    "nsfw": False,
    "type": "image",
    "createdAt": "2024-03-01T10:00:00.000Z",
    "postId": 5,
    "username": "alice",
    "modelVersionIds": [70, 71],
    "stats": {"cryCount": 1, "laughCount": 2, "likeCount": 3, "dislikeCount": 0, "heartCount": 4, "commentCount": 5},
    "meta": {
        "prompt": "a red car",
        "negativePrompt": "blurry",
        "seed": 42,
        "steps": 30,
        "sampler": "Euler a",
        "cfgScale": 7,
        "Clip skip": 2,
        "Hires upscale": 1.5,
        "Hires upscaler": "4x-UltraSharp",
        "Denoising strength": 0.4,
    },
}
MODEL_ITEM = {
    "id": 3,
    "name": "Car LoRA",
    "description": "cars",
    "type": "LORA",
    "nsfw": False,
    "nsfwLevel": 1,
    "allowNoCredit": True,
    "allowCommercialUse": ["Image", "Rent"],
    "allowDerivatives": True,
    "allowDifferentLicense": False,
    "minor": False,
    "poi": False,
    "tags": ["car", "vehicle"],
    "creator": {"username": "bob"},
    "stats": {"downloadCount": 100, "ratingCount": 7, "rating": 4.5, "thumbsUpCount": 9, "thumbsDownCount": 1},
    "modelVersions": [
        {
            "id": 70,
            "name": "v1",
            "baseModel": "SD 1.5",
            "baseModelType": "Standard",
            "publishedAt": "2024-01-01T00:00:00.000Z",
            "trainedWords": ["car_style"],
            "availability": "Public",
            "nsfwLevel": 1,
            "description": "first",
            "downloadUrl": "https://civitai.com/api/download/models/70",
            "files": [
                {
                    "id": 700,
                    "name": "car.safetensors",
                    "sizeKB": 18000.5,
                    "type": "Model",
                    "primary": True,
                    "metadata": {"fp": "fp16", "format": "SafeTensor"},
                    "pickleScanResult": "Success",
                    "pickleScanMessage": "No Pickle imports",
                    "virusScanResult": "Success",
                    "scannedAt": "2024-01-02T00:00:00.000Z",
                    "hashes": {"AutoV1": "A1", "AutoV2": "A2", "SHA256": "S", "CRC32": "C", "BLAKE3": "B"},
                }
            ],
        }
    ],
}


def write_page(path, items, fmt="json"):
    path.parent.mkdir(parents=True, exist_ok=True)
    page = json.dumps({"items": items, "metadata": {"nextCursor": None}})
    if fmt == "json":
        path.write_text(page)
    elif fmt == "jsonl.gz":
        with gzip.open(path, "wt") as handle:
            handle.write(page + "\n")
    return path


@pytest.fixture
def raw_dir(tmp_path):
    """A tiny raw dump: 4 users × 3 images with one LoRA each, one model page."""
    raw = tmp_path / "raw"
    items = []
    for u in range(4):
        for k in range(3):
            item = json.loads(json.dumps(IMAGE_ITEM))
            item.update(
                id=100 + 10 * u + k,
                username=f"user{u}",
                createdAt=f"2024-03-0{k + 1}T10:00:00.000Z",
                modelVersionIds=[70],
            )
            item["meta"]["prompt"] = f"prompt {u} {k}"
            items.append(item)
    write_page(raw / "images" / "p0.json", items[:6])
    write_page(raw / "images" / "p1.jsonl.gz", items[6:], fmt="jsonl.gz")
    write_page(raw / "models" / "m0.json", [MODEL_ITEM])
    return raw
