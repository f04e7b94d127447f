"""Read, check and write RWKV checkpoints; infer the model shape from keys and tensor shapes.

Checkpoints come from the internet, so ``.pth`` files load with ``weights_only=True`` (pickled code is
refused, never run) and ``mmap=True`` (a 15 GB bf16 model loads without a second copy in RAM).
:func:`infer_config` checks every tensor's name and shape against the layout of the version it finds
(docs/MODEL.md, "Checkpoint layout") before any model is built, so a damaged file is one line naming
the tensor, never an error from deep inside torch.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from rwkv_disha.choices import MODEL_VERSIONS
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.fsio import atomic_write, safetensors_writer
from rwkv_disha.model.config import ModelConfig
from rwkv_disha.model.registry import get_version, markers, version_name

SAFETENSORS_SUFFIXES = (".safetensors", ".st")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def is_hf_model_folder(path: str | os.PathLike) -> bool:
    """A Hugging Face model folder: config.json beside the weights (as `export --format hf` writes it)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def hf_folder_error(name: str, folder: Path, what: str = "model") -> RWKVDishaError:
    """The one line for a Hugging Face model folder (config.json + model.safetensors) given as ``name``
    (a flag and its path); ``what``: "model", or the file expected with its article ("an adapter"). For a
    model, the import command that converts it; for an adapter or a state
    file, that it is a whole model (it holds no .pth to pick), so the fix is the right file there."""
    command = f"`rwkv-disha import --hf_model {folder} --output model.pth`"
    if what == "model":
        return RWKVDishaError(
            f"{name} is a Hugging Face model folder: convert it with {command} and give the .pth"
        )
    return RWKVDishaError(
        f"{name} is a Hugging Face model folder, not {what} file: give {what} file (.pth) there; a model "
        f"goes to --load_model / --base_model, converted with {command}"
    )


def load_state_dict(path: str | os.PathLike, what: str = "model") -> dict[str, torch.Tensor]:
    """Memory-map a ``.pth`` (or read a ``.safetensors``/``.st``) file into a dict of tensors."""
    p = Path(path)
    if not p.exists():
        raise RWKVDishaError(f"{what} file not found: {p} (check the path)")
    if p.is_dir():
        if is_hf_model_folder(p):
            expected = "model" if what.endswith("model") else f"{'an' if what[0] in 'aeiou' else 'a'} {what}"
            raise hf_folder_error(f"{what} path {p}", p, expected)
        raise RWKVDishaError(f"{what} path {p} is a directory; give the .pth file inside it")
    if not p.is_file():  # reading a FIFO waits for a writer forever; a device never ends
        raise RWKVDishaError(
            f"{what} path {p} is not a regular file (a FIFO, device or socket); give the .pth file"
        )
    _refuse_non_checkpoint(p, what)
    if p.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise RWKVDishaError(f"{p} is not a readable safetensors file ({e})") from None
        if "emb.weight" not in tensors and _hf_layout(tensors):  # fla's layout: `import` converts it
            raise RWKVDishaError(
                f"{p} is the weights of a Hugging Face model folder (model.embeddings / model.layers.N "
                f"keys): convert it with `rwkv-disha import --hf_model {p.parent} --output model.pth` and "
                "give the .pth"
            )
        return tensors
    try:
        with warnings.catch_warnings():
            # a plain pickle (not torch's zip) makes torch warn about its protocol before refusing or
            # loading it: the outcome is said in one line below, or it loads and needs no word
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) torch files cannot be memory-mapped
                    raise
                obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling failed"
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise RWKVDishaError(
                f"{p} needs pickled Python code to load, which is refused for safety (weights_only); "
                "re-save it as a plain dict of tensors (torch.save(state_dict, path))"
            ) from None
        raise RWKVDishaError(f"{p} is not a torch checkpoint or is truncated ({first})") from None
    except Exception as e:  # torch raises RuntimeError, KeyError, EOFError... for damaged files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RWKVDishaError(
            f"{p} is not a torch checkpoint or is truncated ({first}); download or copy it again"
        ) from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise RWKVDishaError(f"{p} does not hold a state dict (a dict of name -> tensor)")
    return obj


def _refuse_non_checkpoint(p: Path, what: str) -> None:
    """A file that does not start as torch writes one (a zip, or a pickle for legacy files): a JSON / text
    file (a .json sidecar, a jsonl, a config) is named as such, anything else as not a checkpoint, rather
    than the unpickler's "needs pickled Python code" that such bytes provoke."""
    with open(p, "rb") as f:
        head = f.read(64)
    if not head or head.startswith((b"PK\x03\x04", b"\x80")) or p.suffix in SAFETENSORS_SUFFIXES:
        return  # torch's own formats; safetensors and empty files are named by their readers
    try:
        text = head.decode("utf-8").lstrip("\ufeff").lstrip()
    except UnicodeDecodeError:
        text = ""
    if text and not any(b < 9 or 13 < b < 32 for b in head):
        kind = "a JSON file" if text[:1] in "{[" else "a text file"
        raise RWKVDishaError(
            f"{what} file {p} is {kind}, not a checkpoint: give the {what}'s .pth (or .safetensors)"
        )
    raise RWKVDishaError(
        f"{p} is not a torch checkpoint or is truncated (it does not start as one); download or copy it again"
    )


def _hf_layout(sd) -> bool:
    """Keys of fla's Hugging Face RWKV layout (``model.embeddings.weight``, ``model.layers.N.*``)."""
    return "model.embeddings.weight" in sd or any(k.startswith("model.layers.") for k in sd)


def detect_version(sd: dict[str, torch.Tensor]) -> str:
    """The version (``x070``, ``x060``, ...) from the keys, or raise naming a few unexpected keys."""
    keys = list(sd)
    if any(k.endswith(".disha") or ".lora_" in k for k in keys) and "emb.weight" not in sd:
        raise RWKVDishaError(
            "this is an adapter checkpoint (*.disha / lora_* tensors), not a base model: "
            "give it as --peft_checkpoint (merge/generate) or disha_config 'load', and the base as the model"
        )
    if "emb.weight" not in sd or not any(_BLOCK.match(k) for k in keys):
        sample = ", ".join(keys[:5]) or "(no keys)"
        if _hf_layout(sd):
            raise RWKVDishaError(
                "this is a Hugging Face RWKV model (model.embeddings / model.layers.N keys): convert its "
                "folder with `rwkv-disha import --hf_model FOLDER --output model.pth` and give the .pth"
            )
        raise RWKVDishaError(
            f"not an RWKV checkpoint: expected emb.weight and blocks.N.* keys, found e.g. {sample}"
        )
    for version, marker in markers():
        if any(k.endswith(marker) for k in keys):
            return version
    sample = ", ".join(k for k in keys if k.startswith("blocks.0.att."))[:200] or "(none)"
    raise RWKVDishaError(
        f"unrecognised RWKV version: block 0 attention has keys {sample}; the file is damaged or of a "
        "version this tool does not read (RWKV-7, -6 and -5.2 are read)"
    )


def _shape_problem(cfg: ModelConfig) -> str | None:
    """What makes ``cfg`` impossible (a zero width, a head size that does not divide C), or None."""
    head_key = f"blocks.0.{get_version(cfg.version).head_key}"
    widths = {
        "n_embd (emb.weight dim 1)": cfg.n_embd,
        "vocab_size (emb.weight dim 0)": cfg.vocab_size,
        f"head_size ({head_key} dim 1)": cfg.head_size,
        "dim_ffn (blocks.0.ffn.key.weight dim 0)": cfg.dim_ffn,
    }
    for name, value in widths.items():
        if value < 1:
            return f"{name} is {value}"
    if cfg.n_embd % cfg.head_size:
        return f"n_embd {cfg.n_embd} is not a multiple of head_size {cfg.head_size} ({head_key} dim 1)"
    return None


def check_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig, source: str = "the checkpoint") -> None:
    """Refuse a state dict whose keys, shapes or dtypes differ from the layout of ``cfg`` (one line)."""
    name = version_name(cfg.version)
    problem = _shape_problem(cfg)
    if problem:
        raise RWKVDishaError(
            f"{source} does not have a consistent {name} shape: {problem}; the file is damaged or not {name}"
        )
    want = get_version(cfg.version).tensor_shapes(cfg)
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise RWKVDishaError(
            f"{source} does not match the {name} layout for {cfg.summary()}: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    bad = [f"{k} {tuple(sd[k].shape)} != {shape}" for k, shape in want.items() if tuple(sd[k].shape) != shape]
    if bad:
        raise RWKVDishaError(f"{source} has tensors of unexpected shape: {'; '.join(bad[:3])}")
    not_float = [f"{k} ({sd[k].dtype})" for k in want if not sd[k].dtype.is_floating_point]
    if not_float:
        raise RWKVDishaError(
            f"{source} has non-floating-point tensors: {', '.join(not_float[:3])}; "
            "an RWKV model holds fp32 / bf16 / fp16 weights"
        )


def infer_config(sd: dict[str, torch.Tensor], source: str = "the checkpoint") -> ModelConfig:
    """The whole model shape from keys and tensor shapes, after checking every tensor against it.

    Refuses versions that are not supported yet, and any missing, extra or mis-shaped tensor. A file
    written by ``merge --state`` also holds ``blocks.i.att.time_state`` (H, N, N) for every block.
    """
    from rwkv_disha.adapters.state import check_state_keys, is_state_key, state_shapes

    version = detect_version(sd)
    base = {k: v for k, v in sd.items() if not is_state_key(k)}
    cfg = get_version(version).infer_config(base)
    check_tensors(base, cfg, source)
    if len(base) < len(sd):  # initial states merged in: one per block, (H, N, N), floating point
        check_state_keys(sd, cfg.n_layer, source)
        want = state_shapes(cfg.n_layer, cfg.n_head, cfg.head_size)
        bad = [f"{k} {tuple(sd[k].shape)} != {s}" for k, s in want.items() if tuple(sd[k].shape) != s]
        bad += [f"{k} ({sd[k].dtype})" for k in want if not sd[k].dtype.is_floating_point]
        if bad:
            shown = "; ".join(bad[:3])
            raise RWKVDishaError(f"{source} has initial states of the wrong shape or type: {shown}")
    return cfg


def model_from_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, op: str = "auto") -> torch.nn.Module:
    """The model of shape ``cfg`` holding the tensors of ``sd`` themselves (assigned, not copied), loaded
    strictly; initial states merged into the file become the model's ``time_state`` parameters."""
    from rwkv_disha.adapters.state import add_time_states, is_state_key

    model = build_model(cfg, op=op)
    if any(is_state_key(k) for k in sd):
        add_time_states(model)
    model.load_state_dict(sd, strict=True, assign=True)  # assign: keep the mmap'ed tensors, no copy
    return model


def normalise_version(value: str) -> str:
    """RWKV-PEFT's ``--my_testing`` spellings -> a version (``x070rc4a``, ``RWKV-x070`` -> ``x070``)."""
    value = str(value).strip().lower().replace("rwkv", "").strip("-_")
    for version in MODEL_VERSIONS:
        if value.startswith(version[:3]):  # x07*, x06*, x05*: sub-releases share one layout
            return version
    return value


def check_expected(cfg: ModelConfig, **given: int | str | None) -> None:
    """Refuse user-given shape flags that disagree with the checkpoint (0 / None / '' mean 'infer')."""
    for name, value in given.items():
        if value in (None, 0, ""):
            continue
        if name == "my_testing":
            version = normalise_version(value)
            if version not in MODEL_VERSIONS:
                raise RWKVDishaError(
                    f"unknown --my_testing {value}: choose one of {', '.join(MODEL_VERSIONS)}, or drop it "
                    "to read the version from the model"
                )
            if version != cfg.version:
                raise RWKVDishaError(
                    f"--my_testing {value} ({version_name(version)}) disagrees with the checkpoint, which "
                    f"is {version_name(cfg.version)} ({cfg.version}, {cfg.summary()}): drop the flag to read "
                    "the version from the model, or pick the matching model file"
                )
            continue
        have = getattr(cfg, name)
        if value != have:
            raise RWKVDishaError(
                f"--{name} {value} disagrees with the checkpoint, which has {name} = {have} "
                f"({cfg.summary()}); drop the flag to infer it, or pick the matching model file"
            )


def build_model(cfg: ModelConfig, op: str = "auto", device: str | torch.device = "meta") -> torch.nn.Module:
    """An empty model of shape ``cfg`` (on the meta device by default: no memory until weights load)."""
    with torch.device(device):
        return get_version(cfg.version).model_class(cfg, op=op)


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    op: str = "auto",
    device: str | torch.device = "cpu",
    state: str | os.PathLike | None = None,
    **expected: int | str | None,
):
    """Load an official RWKV checkpoint into its version's model class (strict).

    ``dtype`` None keeps the file's dtype (bf16 stays bf16). ``expected`` takes n_layer, n_embd,
    vocab_size, head_size, my_testing: each, if given, must match what the file has. ``state``: a state
    file (``--peft state``) every sequence then starts from; refused when trained on another base.
    """
    sd = load_state_dict(path)
    cfg = infer_config(sd, source=str(path))
    check_expected(cfg, **expected)
    model = model_from_state_dict(sd, cfg, op=op)
    if state:
        from rwkv_disha.adapters.state import load_state_file

        load_state_file(model, state)
    if dtype is not None or device != "cpu":
        model.to(device=device, dtype=dtype)
    return model


def non_finite_names(tensors) -> list[str]:
    """Names of the floating-point tensors holding NaN / inf, in order; ``tensors``: a mapping or
    (name, tensor) pairs. Every reader and writer that refuses such values asks this."""
    items = tensors.items() if hasattr(tensors, "items") else tensors
    return [k for k, t in items if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike, what: str = "model") -> Path:
    """Write ``sd`` as ``.pth`` (or ``.safetensors`` / ``.st``) atomically through :func:`fsio.atomic_write`:
    a failure never leaves a partial file at ``path``, and an OS error is one line naming the cause."""
    return atomic_write(path, state_dict_writer(sd, path), what)


def state_dict_writer(sd: dict[str, torch.Tensor], path: str | os.PathLike):
    """The ``write(tmp)`` that fills a temporary file for :func:`save_state_dict` (by ``path``'s suffix)."""
    if Path(path).suffix in SAFETENSORS_SUFFIXES:
        return safetensors_writer(path, {k: v.contiguous() for k, v in sd.items()})
    return lambda tmp: torch.save(sd, tmp)
