import pandas as pd

from imagegem_hf.cli import main
from imagegem_hf.toy import ToySpec, render


def test_dataset_pairs_scores_image_files_with_the_toy_reward(tmp_path):
    dataset, pixels = tmp_path / "dataset", tmp_path / "pixels"
    (dataset / "images").mkdir(parents=True)
    (dataset / "README.md").write_text("---\n---\n")
    pixels.mkdir()
    rows = []
    for image_id in range(16):
        colour, shape = ("red", "circle") if image_id < 8 else ("blue", "square")
        size = 5.0 + 0.6 * (image_id % 8)
        render(ToySpec(colour, shape, "dark", size=size)).save(pixels / f"{image_id}.png")
        rows.append({"imageId": image_id, "prompt": f"a {colour} {shape} on a dark background"})
    pd.DataFrame(rows).to_parquet(dataset / "images" / "train.parquet")
    assert main(["dataset", "pairs", str(dataset), "--score", "toy", "--image-dir", str(pixels)]) == 0
    pairs = pd.read_parquet(dataset / "preference_pairs")
    # One cluster per prompt; min-max pairs the biggest subject (the last of its 8) with the smallest (the first).
    assert sorted(pairs[["chosen", "rejected"]].values.tolist()) == [[7, 0], [15, 8]]
    assert set(pairs.score_name) == {"toyreward"}
    assert (pairs.chosen_score > pairs.rejected_score).all()
