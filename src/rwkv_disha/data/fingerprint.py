"""A cheap fingerprint of a run's training data, recorded when the run starts (train_config.json) so that
``--resume`` refuses data that changed since: the data position in resume.ckpt counts samples of *that*
data.

Each file the run reads (a binidx prefix's ``.bin`` and ``.idx``, its ``.mask`` files with
``--loss_mask qa``; the one file of the other data types) is recorded by its size and a SHA-256 of its
first and last MiB and 16 evenly spaced 64 KiB pieces between: a few MiB read per file whatever its size
(a file up to 2 MiB is hashed whole). Keys are the files' suffixes, so the same data moved elsewhere
matches. ``dummy`` data and an sft ``datasets`` name have no files here, and no fingerprint.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from rwkv_disha.errors import RWKVDishaError

EDGE = 1 << 20  # bytes hashed at each end
PIECES, PIECE = 16, 1 << 16  # evenly spaced pieces hashed between the ends


def data_files(data_file: str, data_type: str, loss_mask: str) -> dict[str, str]:
    """``{key: path}`` of the files the run reads: ``.bin``, ``.idx`` (+ ``.mask.bin`` / ``.mask.idx``) of a
    binidx prefix, ``""`` for the one file of other types; empty when there is none here."""
    from rwkv_disha.data.binidx import FILE_SUFFIXES, split_prefix

    if data_type == "dummy" or not data_file:
        return {}
    if data_type == "binidx":
        prefix = split_prefix(data_file)
        suffixes = FILE_SUFFIXES if loss_mask == "qa" else FILE_SUFFIXES[:2]
        return {s: prefix + s for s in suffixes if os.path.isfile(prefix + s)}
    return {"": data_file} if os.path.isfile(data_file) else {}


def _file_print(path: str) -> dict[str, Any]:
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 2 * EDGE:
            h.update(f.read())
        else:
            h.update(f.read(EDGE))
            step = (size - 2 * EDGE - PIECE) // (PIECES + 1)
            for i in range(1, PIECES + 1):
                f.seek(EDGE + i * step)
                h.update(f.read(PIECE))
            f.seek(size - EDGE)
            h.update(f.read(EDGE))
    return {"size": size, "sha256": h.hexdigest()}


def data_fingerprint(data_file: str, data_type: str, loss_mask: str) -> dict[str, Any] | None:
    """``{"files": {key: {"size", "sha256"}}}`` of the run's data, or None when it has no files here."""
    files = data_files(data_file, data_type, loss_mask)
    try:
        return {"files": {k: _file_print(p) for k, p in files.items()}} if files else None
    except OSError:  # unreadable now: building the dataset says why, in its own words
        return None


def check_data_fingerprint(
    recorded: Any, data_file: str, data_type: str, loss_mask: str, folder: str, fix: str
) -> None:
    """Refuse data whose files differ from the fingerprint the run recorded (None: an older run, which
    recorded none, resumes unchecked). ``fix`` ends the line: how to start a new run instead."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files"), dict):
        return
    files = data_files(data_file, data_type, loss_mask)
    for key, was in sorted(recorded["files"].items()):
        path = files.get(key) or (data_file if key == "" else f"{data_file}{key}")
        if key not in files:
            why = "is gone"
        else:
            now = _file_print(path)
            if not isinstance(was, dict) or now == was:
                continue
            if now["size"] != was.get("size"):
                why = f"has {now['size']:,} bytes, {was.get('size'):,} when the run started"
            else:
                why = "has other content than when the run started"
        raise RWKVDishaError(
            f"--resume {folder}: the training data changed since the run started ({path} {why}): --resume "
            f"continues the run's data position in the same data; restore it, or {fix}"
        )
