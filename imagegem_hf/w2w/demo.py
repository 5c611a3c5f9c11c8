"""Demo stage of imagegem_hf.w2w."""


def run_demo(context) -> list[str]:
    return []
