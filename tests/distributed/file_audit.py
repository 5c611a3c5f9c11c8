"""Which files a process writes (Python-level opens and `os.replace`/`os.rename` targets, through an audit hook)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


@contextlib.contextmanager
def record_writes(folder: Path, report: Path):
    """Record the paths under `folder` opened for writing in this block, then write them to `report` (JSON)."""
    folder, written, active = str(Path(folder).resolve()), [], [True]

    def hook(event, args):
        if not active[0] or event not in ("open", "os.rename") or not isinstance(args[0], str | os.PathLike):
            return
        if event == "open":
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
            path = os.path.abspath(args[0])
        else:  # `os.replace` of a file written elsewhere (e.g. by pyarrow) into place
            writing, path = True, os.path.abspath(args[1])
        if writing and path.startswith(folder):
            written.append(os.path.relpath(path, folder))

    sys.addaudithook(hook)  # hooks cannot be removed: this one goes quiet at the end of the block
    try:
        yield written
    finally:
        active[0] = False
        Path(report).write_text(json.dumps(written))
