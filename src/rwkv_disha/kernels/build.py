"""Our compiled kernels (``--op cuda``, ``--op cpp``) are built by torch's cpp_extension at first use and
cached by it (``~/.cache/torch_extensions``); a failed build is one error line."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

from rwkv_disha.errors import RWKVDishaError


@functools.cache
def build_tools_missing() -> str | None:
    """What cpp_extension lacks here to build anything (a C++ compiler, ninja), or None."""
    from torch.utils.cpp_extension import get_cxx_compiler, is_ninja_available

    if shutil.which(get_cxx_compiler()) is None:
        return f"a C++ compiler ({get_cxx_compiler()}: install g++ or clang)"
    if not is_ninja_available():
        return "ninja (pip install ninja)"
    return None


def build_extension(op: str, what: str, instead: str, name: str, sources: list[Path], **flags):
    """Build (or load from torch's cache) extension ``name`` for ``--op op``; a failed build becomes one line
    naming the ops that still run (``instead``)."""
    from torch.utils.cpp_extension import load

    try:
        return load(name=name, sources=[str(s) for s in sources], **flags)
    except (OSError, RuntimeError) as e:  # compiler missing or failing: say which op still runs
        last = (str(e).strip().splitlines() or ["?"])[-1]  # the build log is long; its last line says why
        msg = f"--op {op}: building the {what} kernel failed ({last}); use --op {instead}"
        raise RWKVDishaError(msg) from e
