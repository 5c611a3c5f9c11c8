import datetime as dt

import pytest

from imagegem_hf.data.civitai import RecordError, flatten_image, flatten_model, user_hash
from imagegem_hf.data.schema import IMAGES_COLUMNS, LORAS_COLUMNS, features_for

from .conftest import IMAGE_ITEM, MODEL_ITEM


def test_schemas_have_the_published_columns():
    assert len(IMAGES_COLUMNS) == 29 and len(LORAS_COLUMNS) == 45
    assert list(features_for("interactions")) == ["userHash", "itemType", "itemId", "timestamp", "source", "weight"]
    assert features_for("images", with_images=True)["image"].__class__.__name__ == "Image"
    assert features_for("preference_pairs")["chosen"].dtype == "int64"
    assert features_for("preference_pairs", with_images=True)["chosen"].__class__.__name__ == "Image"
    assert str(features_for("images")["createdAt"].dtype).startswith("timestamp[ms")
    with pytest.raises(ValueError, match="Unknown config"):
        features_for("users")
    with pytest.raises(ValueError, match="no image column"):
        features_for("loras", with_images=True)


def test_flatten_image_gives_exact_published_row():
    rows = flatten_image(IMAGE_ITEM, salt="s")
    expected_first = {
        "imageId": 11,
        "modelVersionId": 70,
        "postId": 5,
        "url": "https://image.civitai.com/x/11.jpeg",
        "hash": "U5Q0]~00",
        "nsfw": False,
        "browsingLevel": 2,
        "type": "image",
        "height": 768,
        "width": 512,
        "seed": 42,
        "steps": 30,
        "prompt": "a red car",
        "negativePrompt": "blurry",
        "sampler": "Euler a",
        "cfgScale": 7.0,
        "clipSkip": 2,
        "hiresUpscale": 1.5,
        "hiresUpscaler": "4x-UltraSharp",
        "denoisingStrength": 0.4,
        "createdAt": dt.datetime(2024, 3, 1, 10, tzinfo=dt.UTC),
        "comfy": False,
        "cryCount": 1,
        "laughCount": 2,
        "likeCount": 3,
        "dislikeCount": 0,
        "heartCount": 4,
        "commentCount": 5,
        "userHash": user_hash("alice", "s"),
    }
    assert rows[0] == expected_first
    assert list(rows[0]) == list(IMAGES_COLUMNS)
    assert [r["modelVersionId"] for r in rows] == [70, 71]
    assert rows[0]["userHash"] == __import__("hashlib").sha256(b"salice").hexdigest()


def test_flatten_image_null_meta_is_valid():
    rows = flatten_image(dict(IMAGE_ITEM, meta=None))
    assert rows[0]["prompt"] is None and rows[0]["seed"] is None and rows[0]["comfy"] is None


@pytest.mark.parametrize(
    "patch, reason",
    [
        ({"id": None}, "missing required field 'id'"),
        ({"width": "wide"}, "field 'width' must be an integer"),
        ({"nsfwLevel": "Spicy"}, "unknown nsfwLevel"),
        ({"type": "gif"}, "unknown image type"),
        ({"username": None}, "username"),
        ({"createdAt": "yesterday"}, "not an ISO-8601"),
        ({"stats": [1]}, "must be an object"),
    ],
)
def test_flatten_image_rejects_bad_records(patch, reason):
    with pytest.raises(RecordError, match=reason):
        flatten_image(dict(IMAGE_ITEM, **patch))


def test_flatten_model_gives_exact_published_row():
    (row,) = flatten_model(MODEL_ITEM)
    assert list(row) == list(LORAS_COLUMNS)
    assert row["allowCommercialUse"] == "Image, Rent" and row["tags"] == "car, vehicle"
    assert row["trainedWords"] == "car_style" and row["primary"] == 1 and row["fileId"] == 700
    assert row["hashSHA256"] == "S" and row["fp"] == "fp16" and row["sizeKB"] == 18000.5
    assert row["publishedAt"] == dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    with pytest.raises(RecordError, match="unknown model type"):
        flatten_model(dict(MODEL_ITEM, type="Sticker"))
    with pytest.raises(RecordError, match="no versions"):
        flatten_model(dict(MODEL_ITEM, modelVersions=[]))
