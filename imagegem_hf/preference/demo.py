"""Demo stage of imagegem_hf.preference."""


def run_demo(context) -> list[str]:
    return []
