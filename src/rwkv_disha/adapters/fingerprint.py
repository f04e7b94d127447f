"""The base fingerprint an adapter sidecar records, so that loading and merging refuse another base model
(docs/ADAPTERS.md, "Files").

The fingerprint identifies the base model from a few tensors its version's registry entry names
(``ModelVersion.fingerprint``): on RWKV-7 ``att.r_k``, ``att.k_k``, ``att.w0`` of the first and last block,
which no adapter setting trains or quantizes; on RWKV-6 / 5.2 the first rows of ``emb.weight`` and
``head.weight`` (16 rows each: a memory-mapped embedding costs a few KB, not its size). The shape summary
must match exactly, the values must match after rounding to bf16 (so an fp32 base trained in bf16 still
matches), or at least agree in sum and |sum| to 1e-3.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from rwkv_disha.adapters.base import adapter_modules
from rwkv_disha.errors import RWKVDishaError

Tensor = torch.Tensor

_ROWS = re.compile(r"^(?P<key>.+)\[:(?P<rows>\d+)\]$")  # "emb.weight[:16]": the first 16 rows
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _shapes_and_tensors(source: nn.Module | Mapping[str, Tensor]) -> tuple[dict[str, tuple], Mapping]:
    if isinstance(source, nn.Module):
        tensors = source.state_dict()
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        for name, m in adapter_modules(source):  # a quantized base weight is not in the state dict
            shapes[f"{name}.weight"] = tuple(m.weight.shape)
        return shapes, tensors
    return {k: tuple(v.shape) for k, v in source.items()}, source


def _version(shapes: Mapping[str, tuple]) -> str | None:
    """The model's version, read from its keys as loading reads it; None for keys of no supported model."""
    from rwkv_disha.model.load import detect_version
    from rwkv_disha.model.registry import MODELS

    try:
        version = detect_version(shapes)  # only the keys are read
    except RWKVDishaError:
        return None
    return version if version in MODELS else None


def shape_summary(shapes: Mapping[str, tuple]) -> dict[str, int | str | None]:
    """The version and shape of a model from its tensor shapes (None where a key is absent; the low-rank
    widths are RWKV-7's)."""
    from rwkv_disha.model.registry import MODELS

    def dim(key: str, i: int) -> int | None:
        return int(shapes[key][i]) if key in shapes else None

    version = _version(shapes)
    layers = {int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))}
    return {
        "version": version,
        "n_layer": (max(layers) + 1) if layers else 0,
        "n_embd": dim("emb.weight", 1),
        "vocab_size": dim("emb.weight", 0),
        "head_size": dim(f"blocks.0.{MODELS[version].head_key}", 1) if version else None,
        "dim_ffn": dim("blocks.0.ffn.key.weight", 0),
        "d_decay": dim("blocks.0.att.w1", 1),
        "d_aaa": dim("blocks.0.att.a1", 1),
        "d_mv": dim("blocks.1.att.v1", 1),
        "d_gate": dim("blocks.0.att.g1", 1),
    }


def _describe_shape(s: Mapping[str, Any]) -> str:
    from rwkv_disha.model.registry import version_name

    version = f"{version_name(s['version'])} " if s.get("version") else ""  # older sidecars lack it
    head = f" head_size {s['head_size']}" if s.get("head_size") is not None else ""
    return (
        f"{version}L{s.get('n_layer')} C{s.get('n_embd')} V{s.get('vocab_size')} ffn {s.get('dim_ffn')}{head}"
    )


def base_fingerprint(source: nn.Module | Mapping[str, Tensor]) -> dict[str, Any]:
    """Shape summary + hash of a few never-trained tensors, from a model (with or without adapters,
    quantized or not, any dtype) or from a base state dict (mmap'ed: only a few KB are read)."""
    from rwkv_disha.model.registry import MODELS

    shapes, tensors = _shapes_and_tensors(source)
    summary = shape_summary(shapes)
    n = summary["n_layer"]
    keys = MODELS[summary["version"]].fingerprint if summary["version"] else ()
    blocks = sorted({0, max(n - 1, 0)})
    names = [k.replace("*", str(i)) for i in blocks for k in keys if "*" in k]  # block by block
    names += [k for k in keys if "*" not in k]
    h = hashlib.sha256()
    checksums: dict[str, list[float]] = {}
    for name in names:
        m = _ROWS.match(name)
        key = m["key"] if m else name
        if key not in tensors:
            continue
        t = tensors[key].detach()[: int(m["rows"])] if m else tensors[key].detach()
        t = t.to("cpu", torch.float32)
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        t64 = t.double()
        checksums[name] = [float(t64.sum()), float(t64.abs().sum())]
    return {"shape": summary, "hash": h.hexdigest()[:32], "checksums": checksums}


def check_fingerprint(expected: Mapping[str, Any], actual: Mapping[str, Any], source: str) -> None:
    """Raise unless ``actual`` (this base) is the base ``expected`` (recorded in a sidecar) describes."""
    want, have = expected.get("shape", {}), actual.get("shape", {})
    diff = [k for k in want if want.get(k) is not None and want.get(k) != have.get(k)]
    diff.sort(key=lambda k: k != "version")  # another version explains every other difference
    if diff:
        raise RWKVDishaError(
            f"{source} was trained on a {_describe_shape(want)} model but this base is "
            f"{_describe_shape(have)} (differs in {', '.join(diff)}): "
            f"use the base model the adapter was trained on"
        )
    if expected.get("hash") == actual.get("hash"):
        return
    want_sums, have_sums = expected.get("checksums", {}), actual.get("checksums", {})
    for name, (s, a) in want_sums.items():
        if name not in have_sums:
            continue
        s2, a2 = have_sums[name]
        if abs(s - s2) > 1e-3 * (a + 1e-12) or abs(a - a2) > 1e-3 * (a + 1e-12):
            raise RWKVDishaError(
                f"{source} was trained on a different base model of the same shape (its {name} differs): "
                f"use the base model the adapter was trained on"
            )


def check_fingerprint_types(fingerprint: Any, source: str) -> None:
    """Refuse a recorded fingerprint of the wrong JSON shape (a hand-edited or foreign sidecar)."""
    shape = fingerprint.get("shape") if isinstance(fingerprint, dict) else None
    sums = fingerprint.get("checksums", {}) if isinstance(fingerprint, dict) else None
    ok = (
        isinstance(shape, dict)
        and all(isinstance(v, int) or v is None for k, v in shape.items() if k != "version")
        and isinstance(shape.get("version"), (str, type(None)))
        and isinstance(fingerprint.get("hash"), (str, type(None)))
        and isinstance(sums, dict)
        and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
            for v in sums.values()
        )
    )
    if not ok:
        raise RWKVDishaError(
            f"{source} has a malformed 'base' fingerprint: restore it from the training run, or move it away"
        )
