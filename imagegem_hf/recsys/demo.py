"""Demo stage of imagegem_hf.recsys."""


def run_demo(context) -> list[str]:
    return []
