"""Reward scoring split across 2 CPU processes (`torchrun`, gloo) gives exactly the scores of one process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd

from imagegem_hf.data.pairs import scorer_scores
from imagegem_hf.fetch.local_server import png_bytes
from imagegem_hf.scoring import PickScore
from imagegem_hf.testing import tiny_clip_model

N_IMAGES, BATCH = 23, 4  # 6 batches, the last one short; image 5 is missing

SCRIPT = textwrap.dedent(
    f"""
    import numpy as np, pandas as pd, torch
    from imagegem_hf.data.pairs import scorer_scores
    from imagegem_hf.distributed import end_distributed, is_main_process, process_count_and_index
    from imagegem_hf.fetch.local_server import png_bytes
    from imagegem_hf.scoring import PickScore
    from imagegem_hf.testing import tiny_clip_model

    torch.set_num_threads(1)
    ids = range({N_IMAGES})
    images = pd.DataFrame({{"imageId": ids, "prompt": [f"a shape {{i % 5}}" for i in ids]}})

    def locate(i):
        if i == 5:
            raise FileNotFoundError(i)
        return png_bytes(i)

    scores, problems = scorer_scores(images, PickScore(*tiny_clip_model(seed=3)), locate, batch_size={BATCH})
    assert process_count_and_index()[0] == 2
    if is_main_process():
        np.save("scores.npy", scores.to_numpy())
        print("PROBLEMS", problems)
    end_distributed()  # a gloo group left to interpreter shutdown can abort the process (SIGABRT) after the work
    assert not torch.distributed.is_initialized()
    """
)


def test_two_processes_score_exactly_like_one(tmp_path):
    images = pd.DataFrame({"imageId": range(N_IMAGES), "prompt": [f"a shape {i % 5}" for i in range(N_IMAGES)]})

    def locate(i):
        if i == 5:
            raise FileNotFoundError(i)
        return png_bytes(i)

    expected, problems = scorer_scores(images, PickScore(*tiny_clip_model(seed=3)), locate, batch_size=BATCH)
    assert problems == {"missing image": 1}
    (tmp_path / "score.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*command, "score.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PROBLEMS {'missing image': 1}" in result.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), expected.to_numpy())
