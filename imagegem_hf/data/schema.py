"""`datasets.Features` of the four ImageGem configs, declared once.

`images` and `loras` carry exactly the published columns of the ImageGem metadata tables (REFERENCE.md §1);
`interactions` and `preference_pairs` are derived configs. Every parquet file the library writes is cast
to these features, so `datasets.load_dataset(dir, config)` gives the same types everywhere.
"""

from __future__ import annotations

from datasets import Features, Image, Value

CONFIG_NAMES: tuple[str, ...] = ("images", "loras", "interactions", "preference_pairs")

_TIMESTAMP = Value("timestamp[ms, tz=UTC]")

IMAGES_COLUMNS: dict[str, Value] = {
    "imageId": Value("int64"),
    "modelVersionId": Value("int64"),
    "postId": Value("int64"),
    "url": Value("string"),
    "hash": Value("string"),  # blurhash
    "nsfw": Value("bool"),
    "browsingLevel": Value("int32"),
    "type": Value("string"),
    "height": Value("int32"),
    "width": Value("int32"),
    "seed": Value("uint64"),  # 0 … 2**64 − 1: ComfyUI seeds use the whole range (A1111's fit in uint32)
    "steps": Value("int32"),
    "prompt": Value("string"),
    "negativePrompt": Value("string"),
    "sampler": Value("string"),
    "cfgScale": Value("float32"),
    "clipSkip": Value("int32"),
    "hiresUpscale": Value("float32"),
    "hiresUpscaler": Value("string"),
    "denoisingStrength": Value("float32"),
    "createdAt": _TIMESTAMP,
    "comfy": Value("bool"),
    "cryCount": Value("int32"),
    "laughCount": Value("int32"),
    "likeCount": Value("int32"),
    "dislikeCount": Value("int32"),
    "heartCount": Value("int32"),
    "commentCount": Value("int32"),
    "userHash": Value("string"),
}

LORAS_COLUMNS: dict[str, Value] = {
    "modelId": Value("int64"),
    "modelName": Value("string"),
    "modelVersionId": Value("int64"),
    "modelVersionName": Value("string"),
    "fileId": Value("int64"),
    "fileName": Value("string"),
    "modelDescription": Value("string"),
    "allowNoCredit": Value("bool"),
    "allowCommercialUse": Value("string"),  # ", "-joined list of permissions, e.g. "Image, Rent"
    "allowDerivatives": Value("bool"),
    "allowDifferentLicense": Value("bool"),
    "modelType": Value("string"),
    "minor": Value("bool"),
    "poi": Value("bool"),
    "modelNsfwLevel": Value("int32"),
    "cosmetic": Value("bool"),
    "tags": Value("string"),  # ", "-joined
    "publishedAt": _TIMESTAMP,
    "baseModel": Value("string"),
    "baseModelType": Value("string"),
    "availability": Value("string"),
    "modelVersionNsfwLevel": Value("int32"),
    "modelVersionDescription": Value("string"),
    "trainedWords": Value("string"),  # ", "-joined
    "sizeKB": Value("float64"),
    "fileType": Value("string"),
    "fp": Value("string"),
    "format": Value("string"),
    "pickleScanResult": Value("string"),
    "pickleScanMessage": Value("string"),
    "virusScanResult": Value("string"),
    "scannedAt": _TIMESTAMP,
    "hashAutoV1": Value("string"),
    "hashAutoV2": Value("string"),
    "hashSHA256": Value("string"),
    "hashCRC32": Value("string"),
    "hashBLAKE3": Value("string"),
    "downloadUrl": Value("string"),
    "primary": Value("int8"),  # 1 marks the main file of a model version
    "downloadCount": Value("int64"),
    "ratingCount": Value("int32"),
    "rating": Value("float32"),
    "thumbsUpCount": Value("int32"),
    "thumbsDownCount": Value("int32"),
    "userHash": Value("string"),
}

INTERACTIONS_COLUMNS: dict[str, Value] = {
    "userHash": Value("string"),
    "itemType": Value("string"),  # "image" | "model"
    "itemId": Value("int64"),  # imageId for images, modelVersionId for models
    "timestamp": _TIMESTAMP,
    "source": Value("string"),  # "generated" | "uploaded"
    "weight": Value("float32"),
}
ITEM_TYPES: tuple[str, ...] = ("image", "model")
INTERACTION_SOURCES: tuple[str, ...] = ("generated", "uploaded")

PREFERENCE_PAIRS_COLUMNS: dict[str, Value] = {
    "prompt": Value("string"),
    "chosen": Value("int64"),  # imageId of the winner (an `Image()` when pixels are stored)
    "rejected": Value("int64"),  # imageId of the loser (an `Image()` when pixels are stored)
    "chosen_score": Value("float32"),
    "rejected_score": Value("float32"),
    "score_name": Value("string"),  # e.g. "hpsv2", "pickscore", "reactions"
    "cluster_id": Value("int32"),
    "topic": Value("string"),  # "" when the pair belongs to no topic subset
}


def features_for(config_name: str, with_images: bool = False) -> Features:
    """The `datasets.Features` of one ImageGem config.

    Args:
        config_name: One of `"images"`, `"loras"`, `"interactions"`, `"preference_pairs"`.
        with_images: Store pixels: adds an `image` column to `images`, and makes `chosen`/`rejected` of
            `preference_pairs` `Image()` columns instead of image ids.

    Returns:
        The features, in the published column order.

    Example:
        ```python
        >>> from imagegem_hf.data.schema import features_for
        >>> list(features_for("interactions"))
        ['userHash', 'itemType', 'itemId', 'timestamp', 'source', 'weight']
        ```
    """
    if config_name == "images":
        columns = dict(IMAGES_COLUMNS)
        if with_images:
            columns["image"] = Image()
    elif config_name == "loras":
        if with_images:
            raise ValueError("The 'loras' config has no image column; call features_for('loras').")
        columns = dict(LORAS_COLUMNS)
    elif config_name == "interactions":
        if with_images:
            raise ValueError("The 'interactions' config has no image column; call features_for('interactions').")
        columns = dict(INTERACTIONS_COLUMNS)
    elif config_name == "preference_pairs":
        columns = dict(PREFERENCE_PAIRS_COLUMNS)
        if with_images:
            columns["chosen"] = Image()
            columns["rejected"] = Image()
    else:
        raise ValueError(f"Unknown config {config_name!r}; expected one of {', '.join(CONFIG_NAMES)}.")
    return Features(columns)
