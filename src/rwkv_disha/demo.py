"""`rwkv-disha demo`: the whole pipeline on CPU in a few minutes, from nothing.

1. write a small chat corpus (templated Q&A about invented creatures; generated, no third-party text)
2. `init` a tiny base with the 65536-token World vocabulary (RWKV-7; ``--version x060`` / ``x052``: 6 / 5.2)
3. `prepare` it into binidx (+ the answer mask for --loss_mask qa)
4. `train` Bone adapters for a few epochs
5. `merge` the last adapter into a plain .pth
6. `eval` base vs merged, and `generate` an answer with the adapter applied on the fly
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rwkv_disha.choices import MODEL_VERSIONS
from rwkv_disha.config import opt
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.fsio import atomic_write_text, check_output_path

_SYL = ["ka", "lo", "mi", "zu", "ren", "ta", "vo", "shi", "pe", "nor", "ql", "dax", "fi", "mu", "bel"]
_COLOURS = ["red", "blue", "green", "amber", "violet", "teal", "silver", "golden"]
_FOODS = ["apples", "clover", "river fish", "honey", "pine nuts", "mushrooms", "rice", "figs"]
_HOMES = ["the northern hills", "a quiet lake", "the old forest", "a sandy shore", "the high meadow"]


def make_corpus(n_creatures: int = 40, seed: int = 0) -> list[dict]:
    """Conversations in the chat form `prepare` reads; each creature gets three facts."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n_creatures:
        names.add("".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))).capitalize())
    rows = []
    for name in sorted(names):
        colour, food, home = rng.choice(_COLOURS), rng.choice(_FOODS), rng.choice(_HOMES)
        qa = [
            (f"What colour is {name}?", f"{name} is {colour}."),
            (f"What does {name} eat?", f"{name} eats {food}."),
            (f"Where does {name} live?", f"{name} lives near {home}."),
        ]
        for q, a in qa:
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        rows.append({"text": f"{name} is a {colour} creature that eats {food} and lives near {home}."})
    rng.shuffle(rows)
    return rows


@dataclass
class Config:
    out: str = opt("demo_out", "folder for every file the demo writes (an earlier demo's files are replaced)")
    version: str = opt(
        "x070", "version of the tiny base: x070 (RWKV-7), x060 (RWKV-6), x052 (RWKV-5.2)", MODEL_VERSIONS
    )
    n_layer: int = opt(2, "blocks of the tiny base model")
    n_embd: int = opt(128, "width of the tiny base model (a multiple of 64, the head size)")
    epochs: int = opt(5, "training epochs")
    epoch_steps: int = opt(60, "micro-batches per epoch")
    r: int = opt(32, "Bone rank (at most n_embd)")
    lr: float = opt(1e-2, "peak learning rate")
    seed: int = opt(0, "seed for the corpus, the model and training")


HEAD_SIZE = 64
VOCAB_SIZE = 65536  # the World tokenizer's, so prepare's tokens fit the base


def validate(cfg: Config) -> dict[str, Path]:
    """Every option and output path checked before anything is written; returns the demo's paths."""
    if cfg.version not in MODEL_VERSIONS:
        raise RWKVDishaError(f"--version must be one of {', '.join(MODEL_VERSIONS)}, got {cfg.version!r}")
    for name in ("n_layer", "epochs", "epoch_steps"):
        if getattr(cfg, name) < 1:
            raise RWKVDishaError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if cfg.n_embd < HEAD_SIZE or cfg.n_embd % HEAD_SIZE:
        raise RWKVDishaError(
            f"--n_embd must be a positive multiple of {HEAD_SIZE} (the head size), got {cfg.n_embd}"
        )
    if not 1 <= cfg.r <= cfg.n_embd:
        raise RWKVDishaError(
            f"--r must be in 1..{cfg.n_embd} (Bone's r is at most the layer width), got {cfg.r}"
        )
    _check_lr(cfg.lr)
    if not 0 <= cfg.seed < 2**32:
        raise RWKVDishaError(f"--seed must be in [0, 2**32), got {cfg.seed}")
    if not cfg.out.strip():  # Path("") is the current folder: the demo would scatter files there
        raise RWKVDishaError("--out is required: the folder the demo writes into, such as demo_out")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise RWKVDishaError(f"--out {out} is a file: give a folder (the demo writes several files into it)")
    paths = {
        "corpus": out / "corpus.jsonl",
        "base": out / "base.pth",
        "data": out / "data" / "demo",
        "proj": out / "train",
        "merged": out / "merged.pth",
    }
    for key in ("corpus", "base", "merged"):
        check_output_path(paths[key], "--out")
    for folder in (paths["data"].parent, paths["proj"]):
        if folder.exists() and not folder.is_dir():
            raise RWKVDishaError(f"--out {out}: {folder} is a file where the demo needs a folder")
    _check_base(cfg, paths["base"])
    return paths


def _check_lr(lr: float) -> None:
    """--lr becomes train's --lr_init (and lr / 3 its --lr_final): refused here, under demo's own flag name,
    before anything is written, where train would refuse it (or fail in torch) after init and prepare."""
    from rwkv_disha.train.checks import check_float32

    if not (math.isfinite(lr) and lr > 0):
        raise RWKVDishaError(f"--lr must be a finite number > 0, got {lr}")
    check_float32("--lr", lr, positive=True)


def _check_base(cfg: Config, base: Path) -> None:
    """The tiny base's shape and size, checked as `init` will check it (before the corpus is written)."""
    from rwkv_disha.model import init

    init.validate(
        init.Config(
            output=str(base), version=cfg.version, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
            vocab_size=VOCAB_SIZE, head_size=HEAD_SIZE, seed=cfg.seed, overwrite=True,
        )
    )  # fmt: skip


def _step(title: str) -> float:
    print(f"\n=== {title}", file=sys.stderr, flush=True)
    return time.time()


def _cli(args: list[str], quiet: bool = False) -> str:
    """Run one rwkv-disha command in-process; return what it printed on stdout. The demo owns its
    folder, so a command that refuses to replace files (``--overwrite``) is told to."""
    import importlib
    from dataclasses import fields

    from rwkv_disha.cli import COMMANDS, parse_config

    name = args[0]
    try:
        if "overwrite" in {f.name for f in fields(importlib.import_module(COMMANDS[name][0]).Config)}:
            args = [*args, "--overwrite", "1"]
        module, cfg = parse_config(name, args[1:])
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = int(module.run(cfg) or 0)
    except RWKVDishaError as e:
        raise RWKVDishaError(f"demo step `rwkv-disha {name}` failed: {e}") from None
    if not quiet:
        sys.stderr.write(buf.getvalue())
    if rc != 0:
        raise RWKVDishaError(f"demo step failed: rwkv-disha {name} (exit {rc})")
    return buf.getvalue()


def _train(cfg: Config, base: Path, data: Path, proj: Path) -> Path:
    train_args = [
        "train", "--load_model", str(base), "--proj_dir", str(proj), "--data_file", str(data),
        "--data_type", "binidx", "--dataload", "pad", "--loss_mask", "qa", "--ctx_len", "64",
        "--micro_bsz", "8", "--epoch_steps", str(cfg.epoch_steps), "--epoch_count", str(cfg.epochs),
        "--epoch_save", "1", "--lr_init", str(cfg.lr), "--lr_final", str(cfg.lr / 3), "--warmup_steps", "10",
        "--accelerator", "cpu", "--devices", "1", "--precision", "fp32", "--strategy", "auto",
        "--peft", "disha", "--disha_config", json.dumps({"mode": "bone", "load": "", "r": cfg.r}),
        "--train_parts", "time", "ln", "--random_seed", str(cfg.seed), "--progress_bar", "0",
    ]  # fmt: skip
    _cli(train_args)
    return proj / f"rwkv-{cfg.epochs - 1}.pth"


def _evaluate(rows: list[dict], base: Path, merged: Path, adapter: Path, data: Path) -> dict:
    ev = ["--data_file", str(data), "--ctx_len", "64", "--loss_mask", "qa", "--max_samples", "64"]
    before = json.loads(_cli(["eval", "--load_model", str(base), *ev], quiet=True))
    after = json.loads(_cli(["eval", "--load_model", str(merged), *ev], quiet=True))
    question = rows[0]["messages"][0]["content"] if "messages" in rows[0] else "What colour is Kalo?"
    expected = rows[0]["messages"][1]["content"] if "messages" in rows[0] else ""
    gen = ["generate", "--load_model", str(base), "--peft_checkpoint", str(adapter), "--chat",
           "--prompt", question, "--temperature", "0", "--max_tokens", "24"]  # fmt: skip
    answer = _cli(gen, quiet=True).strip()
    return dict(before=before, after=after, question=question, expected=expected, answer=answer)


def _report(cfg: Config, paths: dict[str, Path], res: dict, seconds: float) -> str:
    before, after, data, proj = res["before"], res["after"], paths["data"], paths["proj"]
    return "\n".join([
        "",
        f"rwkv-disha demo finished in {seconds:.0f} s",
        f"  answer-token loss   base {before['loss']:.3f}  ->  Bone-tuned {after['loss']:.3f} "
        f"(ppl {before['ppl']:.0f} -> {after['ppl']:.1f})",
        f"  Q: {res['question']}",
        f"  A (greedy, adapter on the fly): {res['answer']}",
        f"  (training data says: {res['expected']})",
        "",
        "  files:",
        f"    corpus            {paths['corpus']}",
        f"    base model        {paths['base']}",
        f"    binidx data       {data}.bin / .idx (+ answer mask {data}.mask.bin / .idx)",
        f"    adapters          {proj}/rwkv-0.pth ... rwkv-{cfg.epochs - 1}.pth (+ .json sidecars)",
        f"    logs              {proj}/train_log.txt, metrics.csv, loss.png",
        f"    merged model      {paths['merged']}  (plain .pth: RWKV Runner / rwkv / Ai00 converter)",
        "",
        "  with a real model, e.g. RWKV-x070-World-0.4B (24 layers, 1024 wide) on a GPU:",
        "    rwkv-disha prepare --input my.jsonl --output data/my",
        "    rwkv-disha train --load_model RWKV-x070-World-0.4B.pth --proj_dir out --data_file data/my \\",
        "      --ctx_len 2048 --micro_bsz 4 --epoch_steps 1200 --epoch_count 4 \\",
        "      --lr_init 2e-5 --lr_final 2e-5 \\",
        "      --accelerator gpu --precision bf16 --grad_cp 1 --peft disha \\",
        '      --disha_config \'{"mode":"bone","load":"","r":64}\'',
        "    rwkv-disha merge --base_model RWKV-x070-World-0.4B.pth --peft_checkpoint out/rwkv-3.pth \\",
        "      --output out/my-model.pth",
    ])  # fmt: skip


def run(cfg: Config) -> int:
    paths = validate(cfg)
    t_all = time.time()

    _step("1/6 corpus")
    rows = make_corpus(seed=cfg.seed)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(paths["corpus"], text, "demo corpus")
    print(f"wrote {paths['corpus']}: {len(rows)} records", file=sys.stderr)

    _step("2/6 init a tiny base model")
    init = ["init", "--version", cfg.version, "--output", str(paths["base"]), "--n_layer", str(cfg.n_layer),
            "--n_embd", str(cfg.n_embd), "--vocab_size", str(VOCAB_SIZE),
            "--seed", str(cfg.seed)]  # fmt: skip
    _cli(init)

    _step("3/6 prepare binidx")
    corpus, data = paths["corpus"], paths["data"]
    _cli(["prepare", "--input", str(corpus), "--output", str(data), "--ctx_len", "128", "--workers", "1"])

    _step("4/6 train Bone")
    adapter = _train(cfg, paths["base"], data, paths["proj"])

    _step("5/6 merge")
    merged = paths["merged"]
    _cli(
        [
            "merge",
            "--base_model",
            str(paths["base"]),
            "--peft_checkpoint",
            str(adapter),
            "--output",
            str(merged),
        ]
    )

    _step("6/6 evaluate and generate")
    res = _evaluate(rows, paths["base"], merged, adapter, data)
    print(_report(cfg, paths, res, time.time() - t_all))
    return 0
