"""Fixtures for the model tests: a folder on a small tmpfs (read-only or nearly full)."""

from __future__ import annotations

import subprocess

import pytest


@pytest.fixture
def small_fs(tmp_path):
    """small_fs(size="2m", read_only=False) -> a folder on its own tmpfs (unmounted afterwards).

    Skips the test where this machine does not allow mounting (mounting needs root)."""
    mounted = []

    def mount(size: str = "2m", read_only: bool = False):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or 'not permitted'})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], capture_output=True)
