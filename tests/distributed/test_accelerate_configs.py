"""Every accelerate config in examples/accelerate_configs/ loads with accelerate's own config classes and says what
its header comment says."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "accelerate_configs"
EXPECTED = {  # file: (distributed type, processes, mixed precision, CPU only)
    "cpu.yaml": (DistributedType.NO, 1, "no", True),
    "single_gpu.yaml": (DistributedType.NO, 1, "bf16", False),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 8, "bf16", False),
}


def test_the_folder_holds_exactly_the_tested_configs():
    assert sorted(p.name for p in CONFIGS.glob("*.y*ml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerates_config_classes(name):
    path = CONFIGS / name
    config = load_config_from_file(str(path))  # unknown keys or values raise here
    assert isinstance(config, ClusterConfig)
    distributed_type, processes, precision, cpu = EXPECTED[name]
    assert (config.distributed_type, config.num_processes, config.mixed_precision, config.use_cpu) == (
        distributed_type,
        processes,
        precision,
        cpu,
    )
    assert config.num_machines == 1 and config.compute_environment.value == "LOCAL_MACHINE"
    assert f"accelerate launch --config_file examples/accelerate_configs/{name}" in path.read_text().splitlines()[0]
