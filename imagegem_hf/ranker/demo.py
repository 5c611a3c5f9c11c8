"""Demo stage `ranker`: Table 7 in miniature with the toy VLM, and a figure of one user's re-ranking.

The toy VLM (`imagegem_hf.ranker.toy_vlm`, trained on first use and cached) reads the toy world's images, so this
stage re-ranks the toy world's ItemKNN candidates, not the sample dataset's (whose items have no pixels); the
README shows the commands for a real VLM on a real dataset. The figure shows one user's history, the CF top-M and
the VLM order with each score and first explanation (candidates the VLM did not score keep their CF order).
"""

from __future__ import annotations

from dataclasses import replace

from imagegem_hf.ranker.pipeline_vlm_ranker import VLMRankerPipeline
from imagegem_hf.ranker.toy_ranking import ToyRankingWorldConfig, plot_reranking, table7, toy_ranking_world
from imagegem_hf.ranker.toy_vlm import answer_token_budget, pretrained_toy_ranker_vlm
from imagegem_hf.recsys import ItemKNN

DEMO_USERS = 24
TOP_M = 10


def run_demo(context) -> list[str]:
    out = context.stage_dir("ranker")
    folder = pretrained_toy_ranker_vlm()
    world = toy_ranking_world(replace(ToyRankingWorldConfig(), seed=context.seed))

    def make_pipeline() -> VLMRankerPipeline:
        return VLMRankerPipeline.from_pretrained(
            folder, k_subset=5, n_trials=4, max_new_tokens=answer_token_budget(5), batch_size=16
        )

    result = table7(world, make_pipeline, {"ItemKNN": ItemKNN()}, top_m=TOP_M, seed=context.seed, max_users=DEMO_USERS)
    report = result.reports["ItemKNN"]
    print(f"\nToy world, ItemKNN → toy VLM ({DEMO_USERS} users at most):\n{result.table()}")
    print(f"Share of candidates the toy VLM scored: {result.parse_rate:.3f}")
    (out / "toy_table7.md").write_text(f"## Table 7 in miniature (toy world)\n\n{result.table()}\n")
    paths = report.save(out, "toy_image_rerank")
    user = next(iter(report.vlm_ranks))
    figure = plot_reranking(world, result.payloads["ItemKNN"], report, user, out / "toy_rerank_example.png", TOP_M)
    # the toy VLM comes from a local cache, so the folder gets its weights to stand on its own
    ranker_dir = make_pipeline().save_pretrained(out / "ranker", save_model=True)
    return [
        f"toy Table 7 → {out / 'toy_table7.md'}",
        f"toy re-ranking details → {paths['json']}",
        f"toy re-ranking figure → {figure}",
        f"ranker (config, templates, toy VLM weights) → {ranker_dir}",
    ]
