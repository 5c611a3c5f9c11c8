"""Demo stage `recsys`: model and image recommendation baselines on the sample (ImageGem Tables 5 and 6)."""

from __future__ import annotations

import pandas as pd

from imagegem_hf.recsys import InteractionData, Pop, TwoTower
from imagegem_hf.recsys.content import prompt_vectors
from imagegem_hf.recsys.evaluate import RandomRecommender, candidates_payload, default_models, evaluate_models


def run_demo(context) -> list[str]:
    """Evaluate the baselines; leaves CF candidates for the VLM re-ranking stage in `context.artifacts`."""
    dataset_dir = context.artifacts["dataset_dir"]
    out = context.stage_dir("recsys")
    lines = []

    models_data = InteractionData.from_table(dataset_dir, item_type="model")
    result = evaluate_models(models_data, default_models(context.seed), ks=(10, 50, 100))
    print("\nModel recommendation (test, full ranking):\n" + result.table("test"))
    lines += [f"model recommendation {k} → {v}" for k, v in result.save(out, "model_recommendation").items()]
    context.artifacts["cf_candidates"] = {"model": candidates_payload(result, "sasrec")}
    lines.append(f"SASRec model recommender → {result.models['sasrec'].save_pretrained(out / 'sasrec')}")

    # Each image is interacted with once (by its uploader), so image recommendation needs item content: the
    # Two-Tower item tower starts from LSA vectors of the image prompts (CLIP image vectors with real pixels).
    images_data = InteractionData.from_table(dataset_dir, item_type="image")
    prompts = pd.read_parquet(dataset_dir / "images", columns=["imageId", "prompt"]).drop_duplicates("imageId")
    filtered = images_data.filter_users(3)
    features = prompt_vectors(filtered.item_ids, prompts.set_index("imageId")["prompt"], seed=context.seed)
    image_models = {
        "random": RandomRecommender(context.seed),
        "pop": Pop(),
        "twotower": TwoTower(item_features=pd.DataFrame(features, index=filtered.item_ids), seed=context.seed),
    }
    result = evaluate_models(filtered, image_models, ks=(10, 50, 100))
    print("\nImage recommendation (test, full ranking):\n" + result.table("test"))
    lines += [f"image recommendation {k} → {v}" for k, v in result.save(out, "image_recommendation").items()]
    context.artifacts["cf_candidates"]["image"] = candidates_payload(result, "twotower")
    return lines
