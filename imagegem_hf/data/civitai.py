"""Raw Civitai API records → rows of the published ImageGem tables.

`flatten_image(item)` turns one item of `GET /api/v1/images` into one row per model version it was made with
(the published `images` table has one row per (imageId, modelVersionId)); `flatten_model(item)` turns one item
of `GET /api/v1/models` into one row per model-version *file* (`primary == 1` marks the main file). Both raise
`RecordError` with a reason for a record that cannot be used; the builder quarantines those.
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime
from typing import Any

import numpy as np

from imagegem_hf.data.schema import IMAGES_COLUMNS, LORAS_COLUMNS

# Civitai's nsfwLevel names (images) and their numeric browsing levels.
NSFW_LEVELS: dict[str, int] = {"None": 1, "Soft": 2, "Mature": 4, "X": 8, "Blocked": 16}
MODEL_TYPES: frozenset[str] = frozenset(
    {
        "Checkpoint",
        "TextualInversion",
        "Hypernetwork",
        "AestheticGradient",
        "LORA",
        "LoCon",
        "DoRA",
        "Controlnet",
        "Upscaler",
        "MotionModule",
        "VAE",
        "Poses",
        "Wildcards",
        "Workflows",
        "Other",
    }
)
IMAGE_TYPES: frozenset[str] = frozenset({"image", "video"})


class RecordError(ValueError):
    """A raw record that cannot become a row; `reason` says why (it goes to `rejected.jsonl`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def user_hash(username: str, salt: str = "") -> str:
    """The 64-hex `userHash` of a Civitai username: `sha256(salt + username)`.

    Example:
        ```python
        >>> from imagegem_hf.data.civitai import user_hash
        >>> len(user_hash("alice"))
        64
        ```
    """
    return hashlib.sha256((salt + username).encode("utf-8")).hexdigest()


def _int(value: Any, field: str, required: bool = False) -> int | None:
    if type(value) is int:  # the common case, checked first: this runs ~15 times per record
        return value  # the range of the column's type is checked on the whole row (`_check_ranges`)
    if value is None:
        if required:
            raise RecordError(f"missing required field {field!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RecordError(f"field {field!r} must be an integer, got {type(value).__name__}")
    if isinstance(value, str):
        try:
            return int(value)  # exact for integer strings of any length (a float would round above 2**53)
        except ValueError:
            pass
    try:
        as_float = float(value)
    except ValueError:
        raise RecordError(f"field {field!r} must be an integer, got {value!r}") from None
    if not math.isfinite(as_float) or as_float != int(as_float):
        raise RecordError(f"field {field!r} must be a finite integer, got {value!r}")
    return int(as_float)


def _column_bounds(columns: dict[str, Any]) -> tuple[tuple[str, float, float, str], ...]:
    """`(column, lowest, highest, dtype)` for every integer and float32 column: the values its type can hold."""
    bounds = []
    for name, feature in columns.items():
        dtype = feature.dtype
        if dtype in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
            info = np.iinfo(dtype)
            bounds.append((name, int(info.min), int(info.max), dtype))
        elif dtype == "float32":
            limit = float(np.finfo(np.float32).max)
            bounds.append((name, -limit, limit, dtype))
    return tuple(bounds)


# The image's own columns (its `modelVersionIds[]` are checked one by one), and the loras columns.
_IMAGE_BOUNDS = _column_bounds({k: v for k, v in IMAGES_COLUMNS.items() if k != "modelVersionId"})
_VERSION_BOUNDS = _column_bounds({"modelVersionId": IMAGES_COLUMNS["modelVersionId"]})
_LORAS_BOUNDS = _column_bounds(LORAS_COLUMNS)


def _check_ranges(row: dict[str, Any], bounds: tuple[tuple[str, float, float, str], ...]) -> None:
    """Raise `RecordError` naming the column when a value does not fit its column's type (e.g. 2**40 in int32)."""
    for name, lowest, highest, dtype in bounds:
        value = row[name]
        if value is not None and not lowest <= value <= highest:
            raise RecordError(f"{name} = {value!r} does not fit the {dtype} column")


def _float(value: Any, field: str) -> float | None:
    if type(value) is float:
        return value
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise RecordError(f"field {field!r} must be a number, got a boolean")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RecordError(f"field {field!r} must be a number, got {value!r}") from None


def _str(value: Any, field: str) -> str | None:
    if value is None or type(value) is str:
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise RecordError(f"field {field!r} must be a string, got {type(value).__name__}")


def _bool(value: Any, field: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise RecordError(f"field {field!r} must be a boolean, got {value!r}")


def _time(value: Any, field: str, required: bool = False) -> datetime | None:
    if value is None:
        if required:
            raise RecordError(f"missing required field {field!r}")
        return None
    if not isinstance(value, str):
        raise RecordError(f"field {field!r} must be an ISO-8601 string, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise RecordError(f"field {field!r} is not an ISO-8601 timestamp: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _joined(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value)
    raise RecordError(f"field {field!r} must be a list of strings")


def _dict(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecordError(f"field {field!r} must be an object, got {type(value).__name__}")
    return value


def _browsing_level(item: dict[str, Any]) -> int | None:
    level = item.get("nsfwLevel", item.get("browsingLevel"))
    if level is None or isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str):
        if level not in NSFW_LEVELS:
            raise RecordError(f"unknown nsfwLevel {level!r}; expected one of {sorted(NSFW_LEVELS)}")
        return NSFW_LEVELS[level]
    raise RecordError(f"field 'nsfwLevel' must be a string or integer, got {type(level).__name__}")


def flatten_image(item: Any, salt: str = "") -> list[dict[str, Any]]:
    """Flatten one `/api/v1/images` item into rows of the `images` table (one per model version).

    `stats.*` become the reaction counts and `meta.*` the generation parameters; a null or partial `meta` is
    valid and gives null columns. An image with no model version is kept with `modelVersionId = None`.

    Args:
        item: The decoded JSON object of one image.
        salt: Salt of the username hash.

    Returns:
        Rows with exactly the published columns, in order.

    Raises:
        RecordError: The item is not an object, lacks `id`/`createdAt`/`username`, or has a mistyped field.

    Example:
        ```python
        >>> from imagegem_hf.data.civitai import flatten_image
        >>> rows = flatten_image({"id": 1, "createdAt": "2024-01-01T00:00:00Z", "username": "u",
        ...                       "modelVersionIds": [7, 9], "stats": {"likeCount": 3}, "meta": None})
        >>> [(r["imageId"], r["modelVersionId"], r["likeCount"]) for r in rows]
        [(1, 7, 3), (1, 9, 3)]
        ```
    """
    if not isinstance(item, dict):
        raise RecordError(f"an image record must be a JSON object, got {type(item).__name__}")
    image_id = _int(item.get("id"), "id", required=True)
    username = item.get("username")
    if not isinstance(username, str) or not username:
        raise RecordError("missing required field 'username'")
    image_type = _str(item.get("type"), "type")
    if image_type is not None and image_type not in IMAGE_TYPES:
        raise RecordError(f"unknown image type {image_type!r}; expected one of {sorted(IMAGE_TYPES)}")
    stats = _dict(item.get("stats"), "stats")
    meta = _dict(item.get("meta"), "meta")
    version_ids = item.get("modelVersionIds") or [None]
    if not isinstance(version_ids, list):
        raise RecordError("field 'modelVersionIds' must be a list")
    base = {
        "imageId": image_id,
        "postId": _int(item.get("postId"), "postId"),
        "url": _str(item.get("url"), "url"),
        "hash": _str(item.get("hash"), "hash"),
        "nsfw": _bool(item.get("nsfw"), "nsfw"),
        "browsingLevel": _browsing_level(item),
        "type": image_type,
        "height": _int(item.get("height"), "height"),
        "width": _int(item.get("width"), "width"),
        "seed": _int(meta.get("seed"), "meta.seed"),
        "steps": _int(meta.get("steps"), "meta.steps"),
        "prompt": _str(meta.get("prompt"), "meta.prompt"),
        "negativePrompt": _str(meta.get("negativePrompt"), "meta.negativePrompt"),
        "sampler": _str(meta.get("sampler"), "meta.sampler"),
        "cfgScale": _float(meta.get("cfgScale"), "meta.cfgScale"),
        "clipSkip": _int(meta.get("Clip skip", meta.get("clipSkip")), "meta.Clip skip"),
        "hiresUpscale": _float(meta.get("Hires upscale"), "meta.Hires upscale"),
        "hiresUpscaler": _str(meta.get("Hires upscaler"), "meta.Hires upscaler"),
        "denoisingStrength": _float(meta.get("Denoising strength"), "meta.Denoising strength"),
        "createdAt": _time(item.get("createdAt"), "createdAt", required=True),
        "comfy": "comfy" in meta if meta else None,
        "cryCount": _int(stats.get("cryCount", 0), "stats.cryCount"),
        "laughCount": _int(stats.get("laughCount", 0), "stats.laughCount"),
        "likeCount": _int(stats.get("likeCount", 0), "stats.likeCount"),
        "dislikeCount": _int(stats.get("dislikeCount", 0), "stats.dislikeCount"),
        "heartCount": _int(stats.get("heartCount", 0), "stats.heartCount"),
        "commentCount": _int(stats.get("commentCount", 0), "stats.commentCount"),
        "userHash": user_hash(username, salt),
    }
    _check_ranges(base, _IMAGE_BOUNDS)
    versions = dict.fromkeys(_int(version_id, "modelVersionIds[]") for version_id in version_ids)  # keep order
    rows = []
    for version_id in versions:
        row = dict(base, modelVersionId=version_id)
        _check_ranges(row, _VERSION_BOUNDS)
        rows.append({column: row[column] for column in IMAGES_COLUMNS})
    return rows


def flatten_model(item: Any, salt: str = "") -> list[dict[str, Any]]:
    """Flatten one `/api/v1/models` item into rows of the `loras` table (one per model-version file).

    Args:
        item: The decoded JSON object of one model.
        salt: Salt of the username hash.

    Returns:
        Rows with exactly the published columns, in order.

    Raises:
        RecordError: The item is not an object, has no id/type/creator, an unknown `type`, or a mistyped field.

    Example:
        ```python
        >>> from imagegem_hf.data.civitai import flatten_model
        >>> rows = flatten_model({"id": 3, "name": "m", "type": "LORA", "creator": {"username": "u"},
        ...     "modelVersions": [{"id": 30, "baseModel": "SD 1.5", "files": [{"id": 300, "primary": True}]}]})
        >>> [(r["modelId"], r["modelVersionId"], r["fileId"], r["primary"]) for r in rows]
        [(3, 30, 300, 1)]
        ```
    """
    if not isinstance(item, dict):
        raise RecordError(f"a model record must be a JSON object, got {type(item).__name__}")
    model_id = _int(item.get("id"), "id", required=True)
    model_type = _str(item.get("type"), "type")
    if model_type is None:
        raise RecordError("missing required field 'type'")
    if model_type not in MODEL_TYPES:
        raise RecordError(f"unknown model type {model_type!r}")
    creator = _dict(item.get("creator"), "creator")
    username = creator.get("username")
    if not isinstance(username, str) or not username:
        raise RecordError("missing required field 'creator.username'")
    stats = _dict(item.get("stats"), "stats")
    versions = item.get("modelVersions") or []
    if not isinstance(versions, list):
        raise RecordError("field 'modelVersions' must be a list")
    model = {
        "modelId": model_id,
        "modelName": _str(item.get("name"), "name"),
        "modelDescription": _str(item.get("description"), "description"),
        "allowNoCredit": _bool(item.get("allowNoCredit"), "allowNoCredit"),
        "allowCommercialUse": _joined(item.get("allowCommercialUse"), "allowCommercialUse"),
        "allowDerivatives": _bool(item.get("allowDerivatives"), "allowDerivatives"),
        "allowDifferentLicense": _bool(item.get("allowDifferentLicense"), "allowDifferentLicense"),
        "modelType": model_type,
        "minor": _bool(item.get("minor"), "minor"),
        "poi": _bool(item.get("poi"), "poi"),
        "modelNsfwLevel": _int(item.get("nsfwLevel"), "nsfwLevel"),
        "cosmetic": _bool(item.get("cosmetic"), "cosmetic"),
        "tags": _joined(item.get("tags"), "tags"),
        "downloadCount": _int(stats.get("downloadCount"), "stats.downloadCount"),
        "ratingCount": _int(stats.get("ratingCount"), "stats.ratingCount"),
        "rating": _float(stats.get("rating"), "stats.rating"),
        "thumbsUpCount": _int(stats.get("thumbsUpCount"), "stats.thumbsUpCount"),
        "thumbsDownCount": _int(stats.get("thumbsDownCount"), "stats.thumbsDownCount"),
        "userHash": user_hash(username, salt),
    }
    rows = []
    for version in versions:
        version = _dict(version, "modelVersions[]")
        files = version.get("files") or []
        if not isinstance(files, list):
            raise RecordError("field 'modelVersions[].files' must be a list")
        version_row = {
            "modelVersionId": _int(version.get("id"), "modelVersions[].id", required=True),
            "modelVersionName": _str(version.get("name"), "modelVersions[].name"),
            "publishedAt": _time(version.get("publishedAt"), "modelVersions[].publishedAt"),
            "baseModel": _str(version.get("baseModel"), "modelVersions[].baseModel"),
            "baseModelType": _str(version.get("baseModelType"), "modelVersions[].baseModelType"),
            "availability": _str(version.get("availability"), "modelVersions[].availability"),
            "modelVersionNsfwLevel": _int(version.get("nsfwLevel"), "modelVersions[].nsfwLevel"),
            "modelVersionDescription": _str(version.get("description"), "modelVersions[].description"),
            "trainedWords": _joined(version.get("trainedWords"), "modelVersions[].trainedWords"),
            "downloadUrl": _str(version.get("downloadUrl"), "modelVersions[].downloadUrl"),
        }
        for file in files or [{}]:
            file = _dict(file, "modelVersions[].files[]")
            file_meta = _dict(file.get("metadata"), "files[].metadata")
            hashes = _dict(file.get("hashes"), "files[].hashes")
            primary = _bool(file.get("primary"), "files[].primary")
            row = dict(
                model,
                **version_row,
                fileId=_int(file.get("id"), "files[].id"),
                fileName=_str(file.get("name"), "files[].name"),
                sizeKB=_float(file.get("sizeKB", file.get("sizeKb")), "files[].sizeKB"),
                fileType=_str(file.get("type"), "files[].type"),
                fp=_str(file_meta.get("fp"), "files[].metadata.fp"),
                format=_str(file_meta.get("format"), "files[].metadata.format"),
                pickleScanResult=_str(file.get("pickleScanResult"), "files[].pickleScanResult"),
                pickleScanMessage=_str(file.get("pickleScanMessage"), "files[].pickleScanMessage"),
                virusScanResult=_str(file.get("virusScanResult"), "files[].virusScanResult"),
                scannedAt=_time(file.get("scannedAt"), "files[].scannedAt"),
                hashAutoV1=_str(hashes.get("AutoV1"), "hashes.AutoV1"),
                hashAutoV2=_str(hashes.get("AutoV2"), "hashes.AutoV2"),
                hashSHA256=_str(hashes.get("SHA256"), "hashes.SHA256"),
                hashCRC32=_str(hashes.get("CRC32"), "hashes.CRC32"),
                hashBLAKE3=_str(hashes.get("BLAKE3"), "hashes.BLAKE3"),
                primary=None if primary is None else int(primary),
            )
            _check_ranges(row, _LORAS_BOUNDS)
            rows.append({column: row[column] for column in LORAS_COLUMNS})
    if not rows:
        raise RecordError("model has no versions")
    return rows
