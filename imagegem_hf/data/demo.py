"""Demo stage of imagegem_hf.data."""


def run_demo(context) -> list[str]:
    return []
