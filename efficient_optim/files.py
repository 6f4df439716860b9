"""Writing result files so that a reader (or an interrupted run) never sees half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: str | Path, data) -> None:
    """Write ``data`` as indented JSON through a temporary file and ``os.replace``.

    Args:
        path: the file to (re)write; its folder must exist.
        data: anything ``json.dumps`` accepts.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)
