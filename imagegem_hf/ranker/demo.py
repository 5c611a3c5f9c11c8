"""Demo stage `ranker`: VLM re-ranking of the recsys stage's CF candidates with a tiny random VLM.

A random-weight VLM writes noise, so this stage shows the full path (profiles, randomized trials, parsing,
Table 7, stability), not ranking quality; the README shows the commands for a real VLM.
"""

from __future__ import annotations

from imagegem_hf.ranker.items import imagegem_item_loader
from imagegem_hf.ranker.pipeline_vlm_ranker import RankerConfig, VLMRankerPipeline
from imagegem_hf.ranker.two_stage import rerank_and_evaluate
from imagegem_hf.testing import tiny_vlm

DEMO_USERS = 8


def run_demo(context) -> list[str]:
    out = context.stage_dir("ranker")
    model, processor = tiny_vlm(seed=context.seed)
    lines = []
    for item_type, payload in context.artifacts["cf_candidates"].items():
        pipeline = VLMRankerPipeline(
            model,
            processor,
            RankerConfig(item_type=item_type, k_subset=5, n_trials=4, max_new_tokens=32, batch_size=8),
        )
        loader = imagegem_item_loader(context.artifacts["dataset_dir"], item_type)
        report = rerank_and_evaluate(payload, pipeline, loader, seed=context.seed, max_users=DEMO_USERS)
        print(
            f"\n{item_type.title()} recommendation, CF ({payload['model_name']}) → tiny random VLM "
            f"(placeholder images + prompts):\n{report.table()}"
        )
        print("Stability: " + ", ".join(f"{k} {v:.3f}" for k, v in report.stability.items()))
        lines += [f"{item_type} re-ranking {k} → {v}" for k, v in report.save(out, f"{item_type}_rerank").items()]
    lines.append(f"ranker (config, templates, VLM weights) → {pipeline.save_pretrained(out / 'ranker')}")
    return lines
