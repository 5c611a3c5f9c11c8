import imagegem_hf
from imagegem_hf.cli import build_parser


def test_every_public_name_resolves():
    for name in imagegem_hf.__all__:
        assert getattr(imagegem_hf, name) is not None


def test_cli_lists_the_commands():
    help_text = build_parser().format_help()
    for command in ("dataset", "recommend", "dpo", "w2w", "preference", "demo"):
        assert command in help_text
