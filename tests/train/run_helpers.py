"""Helpers the resume tests share: what a folder holds, the one error line, a copied run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def snapshot(*folders) -> dict:
    """Every file under the folders: bytes and mtime (what "nothing written" compares)."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                out[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def one_error_line(capsys) -> str:
    """stderr is one ``error: ...`` line and no traceback; returned without its ``error: ``."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


def copy_run(done, dest: Path) -> Path:
    """A copy of the finished run that believes it was trained in ``dest``."""
    shutil.copytree(done, dest)
    saved = json.loads((dest / "train_config.json").read_text())
    saved["proj_dir"] = str(dest)
    (dest / "train_config.json").write_text(json.dumps(saved))
    return dest
