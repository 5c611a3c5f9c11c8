"""Generative recommendation: VLM re-ranking of collaborative-filtering candidates (ImageGem §4.2, appendix B)."""

from imagegem_hf.ranker.parsing import ParsedScores, parse_scores
from imagegem_hf.ranker.pipeline_vlm_ranker import (
    CandidateScore,
    RankerConfig,
    RankingResult,
    RankItem,
    VLMRankerPipeline,
    trial_subsets,
)
from imagegem_hf.ranker.prompts import RankerTemplates

__all__ = [
    "CandidateScore",
    "ParsedScores",
    "RankItem",
    "RankerConfig",
    "RankerTemplates",
    "RankingResult",
    "VLMRankerPipeline",
    "parse_scores",
    "trial_subsets",
]
