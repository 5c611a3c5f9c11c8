"""Build hook: the card templates live in the top-level `model_cards/` and ship as `imagegem_hf/model_cards/`.

Everything else about the package is declared in `setup.cfg`.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CARDS_SOURCE = Path(__file__).parent / "model_cards"


class BuildPyWithModelCards(build_py):
    """`build_py` that also copies `model_cards/*.md` into the built package (`imagegem_hf/model_cards/`)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the top-level folder itself
            return
        target = Path(self.build_lib) / "imagegem_hf" / "model_cards"
        target.mkdir(parents=True, exist_ok=True)
        for template in sorted(CARDS_SOURCE.glob("*.md")):
            shutil.copyfile(template, target / template.name)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        target = Path(self.build_lib) / "imagegem_hf" / "model_cards"
        cards = [str(target / template.name) for template in sorted(CARDS_SOURCE.glob("*.md"))]
        return [*super().get_outputs(include_bytecode), *([] if self.editable_mode else cards)]


setup(cmdclass={"build_py": BuildPyWithModelCards})
