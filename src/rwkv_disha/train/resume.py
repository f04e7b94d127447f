"""``proj_dir/resume.ckpt``: read safely (``weights_only=True``, always), check it, hand it to Lightning.

Lightning's ``trainer.fit(ckpt_path=...)`` would call ``torch.load`` with torch's default, which an
environment variable (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) or an older torch turns into a full unpickle
that runs code from the file. So the file is read here, checked, and Lightning gets the checked dict
through :class:`PreloadedCheckpointIO`. Checked is every part Lightning and torch will read: the trainable
tensors, the optimizer state (a moment of the wrong shape makes the fused AdamW kernel write out of
bounds), the LR scheduler, the loop progress, the scaler; each against what this run's objects would
save (their own ``state_dict()`` as the template), so a damaged file is one line before any work.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from rwkv_disha.errors import RWKVDishaError

KEY = "rwkv_disha"  # our part of the checkpoint: tokens seen, batches done in the current epoch


def read_resume_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a resume checkpoint; anything else is one error line."""
    path = Path(path)
    what = f"--resume: {path}"
    if path.is_dir():
        raise RWKVDishaError(
            f"{what} is a DeepSpeed checkpoint folder, which cannot be read without unpickling it; continue "
            'from the last adapter instead ("load" in --disha_config / lora_load, and --epoch_begin)'
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        from rwkv_disha.fsio import os_error_cause

        raise RWKVDishaError(f"{what} cannot be read ({os_error_cause(e)})") from None
    except Exception as e:  # UnpicklingError, a corrupt zip, a foreign format
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RWKVDishaError(
            f"{what} is not an rwkv-disha resume checkpoint, or it holds objects other than tensors "
            f"(refused: {first})"
        ) from None
    parts = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "pytorch-lightning_version", KEY)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in parts):
        raise RWKVDishaError(f"{what} is not an rwkv-disha resume checkpoint (missing its training state)")
    if not isinstance(ckpt["state_dict"], dict):
        raise RWKVDishaError(f"{what} is not an rwkv-disha resume checkpoint (no tensor dict)")
    return ckpt


def _train_state_hint(missing: list[str], extra: list[str]) -> str:
    """Where the tensors differ by the initial states alone: the --train_state the run had."""
    from rwkv_disha.adapters.state import is_state_key

    if any(is_state_key(k) for k in extra) and not any(is_state_key(k) for k in missing):
        return " (it trained initial states: --train_state 1)"
    if any(is_state_key(k) for k in missing) and not any(is_state_key(k) for k in extra):
        return " (it trained no initial states: --train_state 0)"
    return ""


def check_resume_checkpoint(ckpt: dict[str, Any], expected: dict[str, tuple[int, ...]], path: str) -> None:
    """Refuse a checkpoint whose trainable tensors differ from this run's by name or shape, or are not
    finite. ``expected``: name -> shape without the ``model.`` prefix Lightning adds."""
    have = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    missing, extra = sorted(set(expected) - set(have)), sorted(set(have) - set(expected))
    if missing or extra:
        raise RWKVDishaError(
            f"--resume: {path} was saved by a run that trained other tensors "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the same --peft, "
            f"--disha_config / --lora_config and --train_parts{_train_state_hint(missing, extra)}"
        )
    for name, shape in expected.items():
        t = have[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise RWKVDishaError(
                f"--resume: {path} has {name} of shape {got}, this run needs {tuple(shape)}: the adapter "
                "settings (r, mode, lora_r) differ from the run being resumed; resume with the same ones"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RWKVDishaError(f"--resume: {path} holds non-finite values ({name}); it cannot be resumed")
    ours = ckpt[KEY] if isinstance(ckpt[KEY], dict) else {}
    counts = (ours.get("tokens_seen"), ours.get("epoch_batches", 0))
    if not all(isinstance(n, int) and n >= 0 for n in counts):
        raise RWKVDishaError(f"--resume: {path} is not an rwkv-disha resume checkpoint (bad progress record)")
    groups = _param_groups(expected)
    _check_lightning_parts(ckpt, len(groups), path)
    _check_optimizer(ckpt["optimizer_states"], groups, expected, path)


def check_resume_epochs(ckpt: dict[str, Any], epoch_count: int, folder: str) -> None:
    """Refuse an --epoch_count the resumed run has already reached: Lightning would fail on a smaller one
    (a restored epoch above max_epochs) and stop at once, silently, on an equal one. Call after
    :func:`check_resume_checkpoint`, which checked the loop state's form."""
    # "processed" counts the epochs whose every batch ran: a run stopped mid-epoch has started one more
    done = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    if epoch_count <= done:
        raise RWKVDishaError(
            f"--resume {folder}: the run has finished {done} epoch{'s' if done != 1 else ''}; --epoch_count "
            f"{epoch_count} trains nothing more: give --epoch_count {done + 1} or more"
        )


def check_resume_base(
    folder: str, load_model: str, recorded: dict[str, Any] | None = None, ckpt: dict[str, Any] | None = None
) -> None:
    """Refuse a --load_model whose shape differs from the base the resumed run was trained on (``recorded``:
    the base fingerprint its train_config.json keeps; a run of an older version has none, and its own
    sidecar of the epoch ``ckpt`` belongs to tells, else the base file its train_config.json names): the
    trained tensors would not fit, and the checkpoint check could only blame the adapter settings."""
    from rwkv_disha.adapters.fingerprint import base_fingerprint, check_fingerprint, shape_summary
    from rwkv_disha.model.load import load_state_dict

    if not recorded:
        recorded = _run_sidecar_base(Path(folder), ckpt)
    want, source = _recorded_base_shape(Path(folder), recorded)
    if want is None:
        return
    sd = load_state_dict(load_model)
    have = shape_summary({k: tuple(v.shape) for k, v in sd.items()})
    diff = [k for k, v in want.items() if v is not None and have.get(k) != v]
    hint = f" (--load_model {source})" if source else ""
    if diff:
        raise RWKVDishaError(
            f"--load_model {load_model} is a {_describe(have, diff)} model but {folder} was trained on "
            f"{_describe(want, diff)}: resume with the run's base{hint}"
        )
    if recorded:  # same shape: the weights' fingerprint tells another base of that shape
        check_fingerprint(recorded, base_fingerprint(sd), f"--resume {folder}: the run{hint}")


def _run_sidecar_base(folder: Path, ckpt: dict[str, Any] | None) -> dict[str, Any] | None:
    """The base fingerprint recorded by the newest sidecar in ``folder`` that this run can have written: of
    an epoch it has finished, at a step it has reached (an --overwrite 1 run of an older version left the
    earlier run's files beside its own, higher-numbered ones included). None: no readable one."""
    from rwkv_disha.adapters.adapter_file import read_sidecar
    from rwkv_disha.train.config import SAVED_CONFIG, load_saved_config

    try:
        done = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
        step = ckpt["global_step"]
        last = load_saved_config(folder / SAVED_CONFIG).get("epoch_begin", 0) + done - 1
    except (KeyError, TypeError, RWKVDishaError):  # a damaged checkpoint: its own checks follow
        return None
    saved = [(int(p.stem[5:]), p) for p in folder.glob("rwkv-*.json") if p.stem[5:].isdigit()]
    for epoch, side in sorted(saved, reverse=True):
        if epoch > last:
            continue
        try:
            meta = read_sidecar(side.with_suffix(".pth")) or {}
        except RWKVDishaError:  # a damaged sidecar records nothing: the checkpoint's own checks follow
            continue
        trained = meta.get("trained") if isinstance(meta.get("trained"), dict) else {}
        if isinstance(trained.get("global_step"), int) and trained["global_step"] > step:
            continue  # written after the point this run has reached: an earlier run's
        return meta.get("base") or None
    return None


def _recorded_base_shape(folder: Path, recorded: dict | None) -> tuple[dict[str, Any] | None, str]:
    """The shape summary of the base the run in ``folder`` trained on (from ``recorded``, the run's base
    fingerprint, else from the base file train_config.json names), and that base's path."""
    from rwkv_disha.adapters.fingerprint import shape_summary
    from rwkv_disha.model.load import load_state_dict
    from rwkv_disha.train.config import SAVED_CONFIG, load_saved_config

    base = load_saved_config(folder / SAVED_CONFIG).get("load_model", "")  # resolve_resume read it already
    shape = (recorded or {}).get("shape")
    if shape:
        return shape, base
    if base and Path(base).is_file():  # no adapter saved yet (stopped in the first epoch)
        try:
            return shape_summary({k: tuple(v.shape) for k, v in load_state_dict(base).items()}), base
        except RWKVDishaError:  # the recorded base is gone bad: nothing to compare with
            pass
    return None, ""


def _describe(shape: dict[str, Any], diff: list[str]) -> str:
    """``RWKV-7 L2 C64``, and the other fields in which two bases differ (``V65536``, ``head_size 64``)."""
    from rwkv_disha.model.registry import version_name

    name = version_name(shape["version"]) if shape.get("version") else "RWKV"
    text = f"{name} L{shape.get('n_layer')} C{shape.get('n_embd')}"
    if "vocab_size" in diff:
        text += f" V{shape.get('vocab_size')}"
    shown = ("version", "n_layer", "n_embd", "vocab_size")
    if any(k in shown for k in diff):  # the headline tells the bases apart; the widths follow from it
        return text
    return text + "".join(f" {k} {shape.get(k)}" for k in diff)


def _damaged(path: str, what: str) -> RWKVDishaError:
    return RWKVDishaError(
        f"--resume: {path} {what}: it is damaged or was not written by rwkv-disha train; resume from a good "
        'copy, or start a new run from the last adapter ("load" in --disha_config, and --epoch_begin)'
    )


def _param_groups(expected: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """The trained tensors' names by optimizer group, in the order DishaModule._param_groups makes them:
    one group, or with --train_state next to other tensors, the initial states as a second group."""
    from rwkv_disha.adapters.state import is_state_key

    rest = [n for n in expected if not is_state_key(n)]
    states = [n for n in expected if is_state_key(n)]
    return [rest, states] if rest and states else [list(expected)]


def _same_form(template: Any, got: Any, exact: bool) -> bool:
    """``got`` has ``template``'s structure: its keys (all of them, or with ``exact=False`` a subset), list
    lengths and leaf types; numbers finite and >= 0."""
    if isinstance(template, dict):
        keys_ok = isinstance(got, dict) and (
            got.keys() == template.keys() or not exact and got.keys() <= template.keys()
        )
        return keys_ok and all(_same_form(template[k], v, exact) for k, v in got.items())
    if isinstance(template, (list, tuple)):
        return (
            isinstance(got, (list, tuple))
            and len(got) == len(template)
            and all(_same_form(t, g, exact) for t, g in zip(template, got))
        )
    if isinstance(template, bool) or template is None:
        return type(got) is type(template)
    if isinstance(template, int):
        return type(got) is int and got >= 0
    if isinstance(template, float):
        return type(got) in (int, float) and math.isfinite(got) and got >= 0
    return False


def _check_lightning_parts(ckpt: dict[str, Any], n_groups: int, path: str) -> None:
    """The loops, scheduler, scaler, callbacks and version entries, against what Lightning and torch save."""
    from lightning.pytorch.loops import _FitLoop
    from packaging.version import InvalidVersion, Version

    version = ckpt["pytorch-lightning_version"]
    try:  # an older checkpoint would go through Lightning's migrations, which assume a sound file
        ok = isinstance(version, str) and Version(version) >= Version("2.0.0")
    except InvalidVersion:
        ok = False
    if not ok:
        raise _damaged(path, f"has a bad pytorch-lightning_version ({version!r})")
    loops = ckpt["loops"]
    if not (
        isinstance(loops, dict)
        and _same_form(_FitLoop(trainer=None).state_dict(), loops.get("fit_loop"), True)
    ):
        raise _damaged(path, "has no sound training-loop position (loops)")
    params = [{"params": [torch.zeros(1)]} for _ in range(n_groups)]
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW(params), lambda step: 1.0).state_dict()
    got = ckpt["lr_schedulers"]
    if not (
        isinstance(got, list) and len(got) == 1 and _same_form(sched, got[0], False) and "base_lrs" in got[0]
    ):
        raise _damaged(path, "has no sound LR scheduler state (lr_schedulers)")
    scaler = torch.amp.GradScaler("cpu").state_dict()  # fp16's loss scaler, under the precision plugin's name
    for key in ("MixedPrecision", "FSDPPrecision", "native_amp_scaling_state"):
        if key in ckpt and not _same_form(scaler, ckpt[key], True):
            raise _damaged(path, f"has no sound loss-scaler state ({key})")
    if not isinstance(ckpt.get("callbacks", {}), dict):
        raise _damaged(path, "has a bad callbacks entry")


def _check_optimizer(states: Any, groups: list[list[str]], expected: dict[str, tuple], path: str) -> None:
    """One AdamW state whose groups hold this run's tensors and whose moments fit them: torch pairs saved
    and live parameters by position, and the fused kernel trusts the moments' shapes."""
    one = states[0] if isinstance(states, list) and len(states) == 1 else None
    if not (
        isinstance(one, dict)
        and isinstance(one.get("state"), dict)
        and isinstance(one.get("param_groups"), list)
    ):
        raise _damaged(path, "has no optimizer state for this run's one optimizer (optimizer_states)")
    saved = one["param_groups"]
    if len(saved) != len(groups) or not all(isinstance(g, dict) for g in saved):
        raise _damaged(path, f"has {len(saved)} optimizer param_groups, this run has {len(groups)}")
    names: dict[Any, str] = {}
    for g, mine in zip(saved, groups):
        ids = g.get("params")
        if not (isinstance(ids, list) and len(ids) == len(mine) and all(type(i) in (int, str) for i in ids)):
            raise _damaged(
                path, f"has optimizer param_groups that do not hold this run's {len(mine)} tensors"
            )
        names.update(zip(ids, mine))
        _check_hyperparameters(g, path)
    if len(names) != len(expected):
        raise _damaged(path, "has optimizer param_groups that name a tensor twice")
    if not one["state"]:
        raise _damaged(path, "holds no optimizer moments (a resumed run would restart Adam from zero)")
    for key, entry in one["state"].items():
        if key not in names:
            raise _damaged(path, f"has optimizer state for a tensor this run does not train ({key!r})")
        _check_moments(entry, names[key], expected[names[key]], path)


def _check_hyperparameters(group: dict[str, Any], path: str) -> None:
    """The group's numbers replace this run's (torch restores them): finite, in range; no other algorithm."""

    def number(x: Any) -> bool:
        return type(x) in (int, float) and math.isfinite(x) and x >= 0

    betas = group.get("betas")
    ok = (
        all(number(group.get(k)) for k in ("lr", "eps", "weight_decay"))
        and number(group.get("initial_lr", 0.0))
        and isinstance(betas, (list, tuple))
        and len(betas) == 2
        and all(number(b) and b < 1 for b in betas)
        and all(group.get(k, False) is False for k in ("amsgrad", "maximize", "capturable", "differentiable"))
        and all(group.get(k) in (None, True, False) for k in ("foreach", "fused"))
    )
    if not ok:
        shown = {k: v for k, v in group.items() if k != "params"}
        raise _damaged(path, f"has bad optimizer param_groups settings ({str(shown)[:160]})")


def _check_moments(entry: Any, name: str, shape: tuple, path: str) -> None:
    """AdamW's per-tensor state: a scalar step and two float32 moments of the tensor's shape, finite."""
    keys = ("step", "exp_avg", "exp_avg_sq")
    fits = (
        isinstance(entry, dict)
        and set(entry) == set(keys)
        and all(isinstance(entry[k], torch.Tensor) and entry[k].dtype == torch.float32 for k in keys)
        and entry["step"].dim() == 0
        and all(tuple(entry[k].shape) == tuple(shape) for k in keys[1:])
    )
    if not fits:
        got = (
            {
                k: (tuple(v.shape), str(v.dtype)[6:]) if isinstance(v, torch.Tensor) else v
                for k, v in entry.items()
            }
            if isinstance(entry, dict)
            else entry
        )
        needs = f"a float32 step and exp_avg, exp_avg_sq of shape {tuple(shape)}"
        raise _damaged(
            path, f"has an optimizer state of {name} that does not fit it ({repr(got)[:160]}; needs {needs})"
        )
    if not all(bool(torch.isfinite(entry[k]).all()) for k in keys):
        raise _damaged(path, f"holds non-finite optimizer state of {name}")
    if not (bool((entry["exp_avg_sq"] >= 0).all()) and float(entry["step"]) >= 0):
        raise _damaged(path, f"holds a negative step or exp_avg_sq in the optimizer state of {name}")


class PreloadedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, except that loading returns the checkpoint already read and checked."""

    def __init__(self, checkpoint: dict[str, Any] | None = None):
        super().__init__()
        self.checkpoint = checkpoint

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:  # noqa: ARG002
        if self.checkpoint is None:
            raise RWKVDishaError(f"internal: no checked checkpoint for {path}")
        return self.checkpoint
