"""Every artifact's card has the metadata the Hub reads, and its usage snippet runs as written on the saved folder.

The metadata is parsed with huggingface_hub's `ModelCard` / `DatasetCard` and checked field by field against its
`ModelCardData` / `DatasetCardData` (names) and the Hub's documented values (licenses, pipeline tags, size
categories). Base models are tiny models put in a local Hub cache as `imagegem-test/tiny-sd` and
`imagegem-test/tiny-vlm` (with a license in their cards), so that `base_model` and the inherited license are
recorded from repo ids the way a user's `from_pretrained("org/name")` records them, offline.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id

from imagegem_hf.hub import PLACEHOLDER_REPO, card_license, hub_repo_id, size_category

REPO = Path(__file__).resolve().parents[1]
SD_REPO, VLM_REPO = "imagegem-test/tiny-sd", "imagegem-test/tiny-vlm"
# Hub license ids used here (https://huggingface.co/docs/hub/repositories-licenses) and pipeline tags / size
# categories (huggingface.js packages/tasks: pipelines.ts; the dataset card spec).
LICENSES = {"apache-2.0", "mit", "creativeml-openrail-m", "openrail++", "cc-by-4.0", "cc-by-nc-4.0", "other"}
PIPELINE_TAGS = {"text-to-image", "image-text-to-text", "image-classification", "feature-extraction"}
TASK_CATEGORIES = PIPELINE_TAGS
SIZE_CATEGORIES = {"n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B", "n>1T"}
MODEL_FIELDS = set(inspect.signature(ModelCardData).parameters) - {"kwargs", "ignore_metadata_errors"}
DATASET_FIELDS = set(inspect.signature(DatasetCardData).parameters) - {"kwargs", "ignore_metadata_errors"}
DATASET_FIELDS |= {"configs", "dataset_info", "license_name", "license_link", "tags"}  # datasets' and the spec's keys


def _put_in_cache(cache: Path, repo_id: str, save, license_: str) -> None:
    """Lay out a saved model as the Hub cache does (`models--org--name/snapshots/<commit>/`, `refs/main`)."""
    commit = "0" * 40
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    save(snapshot)
    (snapshot / "README.md").write_text(f"---\nlicense: {license_}\n---\n# {repo_id}\n")
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    from imagegem_hf.testing import tiny_sd_pipeline, tiny_vlm

    cache = tmp_path_factory.mktemp("hub")
    _put_in_cache(cache, SD_REPO, lambda d: tiny_sd_pipeline(seed=0).save_pretrained(d), "creativeml-openrail-m")

    def save_vlm(folder):
        model, processor = tiny_vlm()
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    _put_in_cache(cache, VLM_REPO, save_vlm, "apache-2.0")
    with pytest.MonkeyPatch.context() as patch:  # `base_model_license` reads the default cache
        import huggingface_hub.constants

        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield cache


def _front_matter(folder: Path) -> str:
    return (folder / "README.md").read_text(encoding="utf-8")


def check_model_card(folder: Path, library: str, pipeline_tag: str | None, base_model: str | None, tags=()) -> dict:
    card = ModelCard(_front_matter(folder))
    data = card.data.to_dict()
    assert set(data) <= MODEL_FIELDS, set(data) - MODEL_FIELDS  # only fields the Hub's card data knows
    assert data["library_name"] == library
    assert data.get("pipeline_tag") == pipeline_tag and (pipeline_tag is None or pipeline_tag in PIPELINE_TAGS)
    assert data.get("base_model") == base_model
    for repo in [data.get("base_model"), *data.get("datasets", [])]:
        if repo is not None:
            validate_repo_id(repo)
    _check_license(data)
    assert set(tags) <= set(data["tags"]) and all(isinstance(tag, str) for tag in data["tags"])
    return data


def _check_license(data: dict) -> None:
    assert data["license"] in LICENSES
    if data["license"] == "other":
        assert data["license_name"] and re.fullmatch(r"[a-z0-9-.]+", data["license_name"])


def check_dataset_card(folder: Path, configs: list[str], task_categories: set[str]) -> dict:
    data = DatasetCard(_front_matter(folder)).data.to_dict()
    assert set(data) <= DATASET_FIELDS, set(data) - DATASET_FIELDS
    _check_license(data)
    if data["license"] == "other":
        assert data["license_link"].startswith(("https://", "LICENSE"))
    assert set(data["task_categories"]) == task_categories and task_categories <= TASK_CATEGORIES
    assert len(data["size_categories"]) == 1 and data["size_categories"][0] in SIZE_CATEGORIES
    assert [c["config_name"] for c in data["configs"]] == configs
    for config in data["configs"]:
        assert config["data_files"] and all({"split", "path"} <= set(files) for files in config["data_files"])
    return data


def snippet(folder: Path) -> str:
    """The card's one ```python block, with the folder in place of the repo id."""
    blocks = re.findall(r"```python\n(.*?)```", _front_matter(folder), flags=re.S)
    assert len(blocks) == 1, blocks
    assert PLACEHOLDER_REPO in blocks[0]
    return blocks[0].replace(PLACEHOLDER_REPO, str(folder))


def run_snippets(snippets: dict[str, str], tmp_path: Path, hub_cache: Path) -> None:
    """Run each snippet in one fresh CPU process, each in its own namespace and working folder, offline."""
    runner = tmp_path / "run_snippets.py"
    runner.write_text(
        "import json, os, sys, traceback\n"
        "failed = {}\n"
        "for name, code in json.loads(open(sys.argv[1]).read()).items():\n"
        "    os.makedirs(name, exist_ok=True); os.chdir(name)\n"
        "    try:\n"
        "        exec(compile(code, name, 'exec'), {'__name__': '__main__'})\n"
        "    except Exception:\n"
        "        failed[name] = traceback.format_exc()\n"
        "    os.chdir('..')\n"
        "print(json.dumps(failed))\n"
    )
    (tmp_path / "snippets.json").write_text(json.dumps(snippets))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HOME": str(tmp_path / "hf_home"),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run(
        [sys.executable, str(runner), str(tmp_path / "snippets.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"--- {name}\n{trace}" for name, trace in failed.items())


# ----------------------------------------------------------------------------------------------- helpers


def test_hub_repo_id_and_license_helpers(hub_cache, tmp_path):
    snapshot = next((hub_cache / "models--imagegem-test--tiny-sd" / "snapshots").iterdir())
    assert hub_repo_id(snapshot / "unet") == SD_REPO  # what from_pretrained("org/name") leaves in a component
    assert hub_repo_id(SD_REPO) == SD_REPO
    assert hub_repo_id(tmp_path) is None and hub_repo_id(None) is None and hub_repo_id("./rel/path") is None
    assert card_license(SD_REPO) == {"license": "creativeml-openrail-m"}  # read from the cached card
    assert card_license(snapshot) == {"license": "creativeml-openrail-m"}
    assert card_license(snapshot / "unet") == {"license": "creativeml-openrail-m"}  # a component: its pipeline's
    (tmp_path / "project" / "model").mkdir(parents=True)
    (tmp_path / "project" / "README.md").write_text("---\nlicense: mit\n---\n")  # not the model's card
    assert card_license(tmp_path / "project" / "model") == {"license": "other", "license_name": "base-model-license"}
    assert card_license("someone/uncached") == {
        "license": "other",
        "license_name": "base-model-license",
        "license_link": "https://huggingface.co/someone/uncached",
    }
    assert [size_category(n) for n in (0, 999, 1000, 99_999, 10**6, 10**13)] == [
        "n<1K",
        "n<1K",
        "1K<n<10K",
        "10K<n<100K",
        "1M<n<10M",
        "n>1T",
    ]


# ----------------------------------------------------------------------------------------------- artifacts


def _dpo_folder(tmp_path: Path, hub_cache: Path, mode: str = "lora") -> Path:
    from diffusers import StableDiffusionPipeline

    from imagegem_hf.dpo import DiffusionDPOConfig, DiffusionDPOTrainer
    from tests.dpo.test_dpo import _pairs

    pipe = StableDiffusionPipeline.from_pretrained(SD_REPO, cache_dir=hub_cache, local_files_only=True)
    args = DiffusionDPOConfig(
        str(tmp_path / f"dpo-{mode}-run"),
        mode=mode,
        max_steps=1,
        per_device_train_batch_size=2,
        resolution=32,
        lora_rank=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataset_name="imagegem-test/dpo-pairs",
    )
    trainer = DiffusionDPOTrainer(pipe, args, train_dataset=_pairs())
    trainer.train()
    trainer.save_model(str(tmp_path / f"dpo-{mode}"))
    return tmp_path / f"dpo-{mode}"


def _w2w_folders(tmp_path: Path, hub_cache: Path) -> tuple[Path, Path]:
    from diffusers import StableDiffusionPipeline

    from imagegem_hf.w2w import W2WEditPipeline, WeightSpace, lora_target_shapes
    from imagegem_hf.w2w.demo import ATTENTION_TARGETS, synthetic_loras

    sd = StableDiffusionPipeline.from_pretrained(SD_REPO, cache_dir=hub_cache, local_files_only=True)
    loras, _, _ = synthetic_loras(lora_target_shapes(sd.unet, ATTENTION_TARGETS), n=8, seed=2)
    space = WeightSpace.build(loras, n_components=4, show_progress=False)
    space.save_pretrained(tmp_path / "w2w-space")
    names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    pipe = W2WEditPipeline(**{k: sd.components[k] for k in names}, weight_space=space)
    pipe.save_pretrained(tmp_path / "w2w-pipeline")
    return tmp_path / "w2w-space", tmp_path / "w2w-pipeline"


def _preference_folders(tmp_path: Path, hub_cache: Path) -> tuple[Path, Path]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from imagegem_hf.preference import PreferencePrototypeModel, save_preference_model
    from imagegem_hf.preference.data import (
        build_user_splits,
        group_pickapic_records,
        save_preference_dataset,
        synthetic_pickapic_records,
    )

    records, images = synthetic_pickapic_records(n_users=10, pairs_per_user=13, seed=1)
    splits = build_user_splits(group_pickapic_records(records), val_users=2, test_users=2, seen_users=2)
    dataset = save_preference_dataset(
        splits, tmp_path / "pref-data", images, source_dataset="imagegem-test/pickapic-like"
    )
    backbone = AutoModelForImageTextToText.from_pretrained(VLM_REPO, cache_dir=hub_cache, local_files_only=True)
    processor = AutoProcessor.from_pretrained(VLM_REPO, cache_dir=hub_cache, local_files_only=True)
    model, _ = PreferencePrototypeModel.from_backbone(backbone, processor, num_prototypes=2, n_ref=1)
    folder = save_preference_model(model, processor, tmp_path / "pref-model", stage=1, dataset="me/pickapic-users")
    return dataset, folder


def _recommender_and_ranker(tmp_path: Path, hub_cache: Path) -> tuple[Path, Path]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from imagegem_hf.ranker import RankerConfig, VLMRankerPipeline
    from imagegem_hf.recsys import InteractionData, ItemKNN

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"userHash": rng.integers(0, 8, 120), "itemId": rng.integers(0, 15, 120), "timestamp": np.arange(120)}
    )
    model = ItemKNN().fit(InteractionData.from_table(frame))
    model.save_pretrained(tmp_path / "recommender")
    vlm = AutoModelForImageTextToText.from_pretrained(VLM_REPO, cache_dir=hub_cache, local_files_only=True)
    processor = AutoProcessor.from_pretrained(VLM_REPO, cache_dir=hub_cache, local_files_only=True)
    VLMRankerPipeline(vlm, processor, RankerConfig(max_new_tokens=4)).save_pretrained(tmp_path / "ranker")
    return tmp_path / "recommender", tmp_path / "ranker"


def _imagegem_dataset(tmp_path: Path) -> Path:
    from imagegem_hf.data.build import build_dataset
    from imagegem_hf.data.synth import generate_raw_sample

    generate_raw_sample(tmp_path / "raw", users=30, seed=0, show_progress=False)
    build_dataset(tmp_path / "raw", tmp_path / "imagegem", show_progress=False)
    return tmp_path / "imagegem"


def _pixels_dataset(tmp_path: Path) -> Path:
    from datasets import Dataset, Features, Image, Value

    from imagegem_hf.fetch.images import _card
    from imagegem_hf.testing import random_images

    folder = tmp_path / "pixels"
    features = Features({"imageId": Value("int64"), "image": Image()})
    Dataset.from_dict({"imageId": [11, 12], "image": random_images(2, size=16)}, features=features).to_parquet(
        folder / "data" / "train-00000-of-00001.parquet"
    )
    (folder / "README.md").write_text(_card(folder, shards=1))
    return folder


def test_every_card_has_hub_metadata_and_a_snippet_that_runs(hub_cache, tmp_path):
    dpo, dpo_full = _dpo_folder(tmp_path, hub_cache), _dpo_folder(tmp_path, hub_cache, mode="full")
    space, w2w = _w2w_folders(tmp_path, hub_cache)
    pref_data, pref_model = _preference_folders(tmp_path, hub_cache)
    recommender, ranker = _recommender_and_ranker(tmp_path, hub_cache)
    imagegem = _imagegem_dataset(tmp_path)
    pixels = _pixels_dataset(tmp_path)

    sd_tags = ("text-to-image", "diffusers", "lora", "diffusers-training")
    data = check_model_card(dpo, "diffusers", "text-to-image", SD_REPO, sd_tags)
    assert data["license"] == "creativeml-openrail-m"  # the base's, read from its card
    assert data["datasets"] == ["imagegem-test/dpo-pairs"]
    assert "pipe.load_lora_weights(" in snippet(dpo)
    check_model_card(dpo_full, "diffusers", "text-to-image", SD_REPO, ("text-to-image", "full-fine-tune"))
    data = check_model_card(w2w, "diffusers", "text-to-image", SD_REPO, ("text-to-image", "diffusers", "lora"))
    assert data["license"] == "creativeml-openrail-m"
    data = check_model_card(pref_model, "transformers", "image-text-to-text", VLM_REPO, ("preference",))
    assert data["license"] == "apache-2.0" and data["datasets"] == ["me/pickapic-users"]
    check_model_card(ranker, "imagegem_hf", "image-text-to-text", VLM_REPO, ("recommendation",))
    check_model_card(space, "imagegem_hf", None, None, ("weights2weights",))
    check_model_card(recommender, "imagegem_hf", None, None, ("recommendation",))

    data = check_dataset_card(pref_data, ["pairs", "images"], {"image-text-to-text", "text-to-image"})
    assert data["license_link"] == "https://huggingface.co/datasets/imagegem-test/pickapic-like"
    assert data["source_datasets"] == ["imagegem-test/pickapic-like"] and data["size_categories"] == ["n<1K"]
    data = check_dataset_card(imagegem, ["images", "loras", "interactions"], {"text-to-image"})
    assert data["license_link"] == "https://civitai.com/content/tos"
    check_dataset_card(pixels, ["default"], {"text-to-image"})

    # The W2W pipeline reloaded from its folder keeps its base (model_index.json) and writes the same card.
    from imagegem_hf.w2w import W2WEditPipeline

    assert W2WEditPipeline.from_pretrained(w2w).model_card() == _front_matter(w2w)

    folders = dict(
        dpo=dpo, dpo_full=dpo_full, w2w=w2w, space=space, pref_model=pref_model, pref_data=pref_data,
        recommender=recommender, ranker=ranker, imagegem=imagegem, pixels=pixels,
    )  # fmt: skip
    run_snippets({name: snippet(folder) for name, folder in folders.items()}, tmp_path, hub_cache)
    assert (tmp_path / "w2w" / "w2w_grid.png").is_file() and (
        tmp_path / "space" / "my_lora_edited.safetensors"
    ).is_file()
