"""Reward scorers for generated images: PickScore, HPSv2 / HPSv2.1 and CLIP score behind one `Scorer` protocol.

Every scorer takes row-aligned `images` and `prompts` and returns one float32 score per pair:

```python
>>> from imagegem_hf.scoring import CLIPScore, HPSv2, PickScore
>>> scorer = HPSv2.from_pretrained("xswu/HPSv2", version="v2.1", device="cuda")  # doctest: +SKIP
>>> scorer.score(images, prompts, batch_size=32)  # doctest: +SKIP
tensor([0.2871, 0.2544])
```
"""

from imagegem_hf.scoring.base import CLIPPairScorer, Scorer
from imagegem_hf.scoring.clip_score import CLIPScore
from imagegem_hf.scoring.hpsv2 import HPSv2, hpsv2_preprocess, resize_max_size
from imagegem_hf.scoring.open_clip_convert import (
    convert_open_clip_state_dict,
    open_clip_to_clip_model,
    vit_h_14_config,
)
from imagegem_hf.scoring.pickscore import PickScore

__all__ = [
    "CLIPPairScorer",
    "CLIPScore",
    "HPSv2",
    "PickScore",
    "Scorer",
    "convert_open_clip_state_dict",
    "hpsv2_preprocess",
    "open_clip_to_clip_model",
    "resize_max_size",
    "vit_h_14_config",
]
