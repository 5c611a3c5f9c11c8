import pandas as pd

from imagegem_hf.cli import main


def test_dataset_cli_end_to_end(tmp_path, capsys):
    raw, ds = tmp_path / "raw", tmp_path / "ds"
    assert main(["dataset", "synth", str(raw), "--users", "30", "--seed", "1"]) == 0
    assert main(["dataset", "build", str(raw), str(ds)]) == 0
    assert "| images |" in capsys.readouterr().out
    assert main(["dataset", "subsets", str(ds), str(tmp_path / "subsets")]) == 0
    assert len(pd.read_parquet(tmp_path / "subsets" / "models.parquet")) > 0
    assert main(["dataset", "stats", str(ds), "--out", str(tmp_path / "stats")]) == 0
    assert (tmp_path / "stats" / "base_models.png").exists()
    # A second build into the same folder is refused with one clear line.
    assert main(["dataset", "build", str(raw), str(ds)]) == 2
    assert "already exists" in capsys.readouterr().err
