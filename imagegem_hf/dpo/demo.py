"""Demo stage of imagegem_hf.dpo."""


def run_demo(context) -> list[str]:
    return []
