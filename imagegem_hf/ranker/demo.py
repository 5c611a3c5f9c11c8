"""Demo stage of imagegem_hf.ranker."""


def run_demo(context) -> list[str]:
    return []
