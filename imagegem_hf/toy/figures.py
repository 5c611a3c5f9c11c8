"""Grids of toy images with a measured number under each one (base vs tuned, strength sweeps)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

_LINE = 12  # pixel height of one line of PIL's default font


def captioned_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    captions: Sequence[Sequence[str]] | None = None,
    column_titles: Sequence[str] | None = None,
    cell: int = 96,
) -> Image.Image:
    """One labelled row per model (or strength), a caption under each image and optional column titles.

    Args:
        rows: Images, one list per row (rows may differ in length).
        row_labels: Text left of each row.
        captions: Text under each image (same nesting as `rows`), e.g. its reward or measured attribute.
        column_titles: Text above each column (e.g. the prompt), wrapped to the cell width.
        cell: Side of each image in pixels (toy images are upscaled with nearest-neighbour, so pixels stay visible).

    Returns:
        An RGB PIL image.

    Example:
        ```python
        >>> from imagegem_hf.toy import ToySpec, captioned_grid, render
        >>> images = [render(ToySpec("red", "circle", "dark", 8.0))]
        >>> captioned_grid([images], ["base"], captions=[["reward 20.1"]]).mode
        'RGB'
        ```
    """
    if len(rows) != len(row_labels):
        raise ValueError(f"Got {len(rows)} rows but {len(row_labels)} row labels.")
    if captions is not None and [len(c) for c in captions] != [len(r) for r in rows]:
        raise ValueError("captions must have one entry per image, nested like rows.")
    columns = max(len(r) for r in rows)
    chars_per_line = max(1, cell // 6)
    title_lines = []
    if column_titles is not None:
        for title in column_titles:
            words, lines, line = title.split(), [], ""
            for word in words:
                if line and len(line) + 1 + len(word) > chars_per_line:
                    lines.append(line)
                    line = word
                else:
                    line = f"{line} {word}".strip()
            title_lines.append(lines + [line])
    header = _LINE * max((len(t) for t in title_lines), default=0) + (4 if title_lines else 0)
    caption_height = _LINE + 4 if captions is not None else 0
    label_width = 6 * max(len(label) for label in row_labels) + 10
    row_height = cell + caption_height
    grid = Image.new("RGB", (label_width + cell * columns, header + row_height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(title_lines):
        for i, line in enumerate(lines):
            draw.text((label_width + c * cell + 2, 2 + i * _LINE), line, fill="black")
    for r, (row, label) in enumerate(zip(rows, row_labels, strict=True)):
        top = header + r * row_height
        draw.text((4, top + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (label_width + c * cell, top))
            if captions is not None:
                draw.text((label_width + c * cell + 4, top + cell + 2), captions[r][c], fill="black")
    return grid
