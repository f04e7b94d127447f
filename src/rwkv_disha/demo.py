"""`rwkv-disha demo`: the whole pipeline on CPU in a few minutes, from nothing.

1. write a small chat corpus (templated Q&A about invented creatures; generated, no third-party text)
2. `init` a tiny RWKV-7 base with the 65536-token World vocabulary
3. `prepare` it into binidx (+ the answer mask for --loss_mask qa)
4. `train` Bone adapters for a few epochs
5. `merge` the last adapter into a plain .pth
6. `eval` base vs merged, and `generate` an answer with the adapter applied on the fly
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rwkv_disha.config import opt
from rwkv_disha.errors import RWKVDishaError

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
    out: str = opt("demo_out", "folder for every file the demo writes")
    n_layer: int = opt(2, "blocks of the tiny base model")
    n_embd: int = opt(128, "width of the tiny base model")
    epochs: int = opt(5, "training epochs")
    epoch_steps: int = opt(60, "micro-batches per epoch")
    r: int = opt(32, "Bone rank")
    lr: float = opt(1e-2, "peak learning rate")
    seed: int = opt(0, "seed for the corpus, the model and training")


def _step(title: str) -> float:
    print(f"\n=== {title}", file=sys.stderr, flush=True)
    return time.time()


def _cli(args: list[str], quiet: bool = False) -> str:
    """Run one rwkv-disha command in-process; return what it printed on stdout."""
    from rwkv_disha.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(args)
    if not quiet:
        sys.stderr.write(buf.getvalue())
    if rc != 0:
        raise RWKVDishaError(f"demo step failed: rwkv-disha {' '.join(args[:1])} (exit {rc})")
    return buf.getvalue()


def run(cfg: Config) -> int:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()

    _step("1/6 corpus")
    rows = make_corpus(seed=cfg.seed)
    corpus = out / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {corpus}: {len(rows)} records", file=sys.stderr)

    _step("2/6 init a tiny base model")
    base = out / "base.pth"
    _cli(
        [
            "init",
            "--output",
            str(base),
            "--n_layer",
            str(cfg.n_layer),
            "--n_embd",
            str(cfg.n_embd),
            "--vocab_size",
            "65536",
            "--seed",
            str(cfg.seed),
        ]
    )

    _step("3/6 prepare binidx")
    data = out / "data" / "demo"
    _cli(["prepare", "--input", str(corpus), "--output", str(data), "--ctx_len", "128", "--workers", "1"])

    _step("4/6 train Bone")
    proj = out / "train"
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
    adapter = proj / f"rwkv-{cfg.epochs - 1}.pth"

    _step("5/6 merge")
    merged = out / "merged.pth"
    _cli(["merge", "--base_model", str(base), "--peft_checkpoint", str(adapter), "--output", str(merged)])

    _step("6/6 evaluate and generate")
    ev = ["--data_file", str(data), "--ctx_len", "64", "--loss_mask", "qa", "--max_samples", "64"]
    before = json.loads(_cli(["eval", "--load_model", str(base), *ev], quiet=True))
    after = json.loads(_cli(["eval", "--load_model", str(merged), *ev], quiet=True))
    question = rows[0]["messages"][0]["content"] if "messages" in rows[0] else "What colour is Kalo?"
    expected = rows[0]["messages"][1]["content"] if "messages" in rows[0] else ""
    answer = _cli(
        [
            "generate",
            "--load_model",
            str(base),
            "--peft_checkpoint",
            str(adapter),
            "--chat",
            "--prompt",
            question,
            "--temperature",
            "0",
            "--max_tokens",
            "24",
        ],
        quiet=True,
    ).strip()

    report = [
        "",
        "rwkv-disha demo finished in %.0f s" % (time.time() - t_all),
        f"  answer-token loss   base {before['loss']:.3f}  ->  Bone-tuned {after['loss']:.3f} "
        f"(ppl {before['ppl']:.0f} -> {after['ppl']:.1f})",
        f"  Q: {question}",
        f"  A (greedy, adapter on the fly): {answer}",
        f"  (training data says: {expected})",
        "",
        "  files:",
        f"    corpus            {corpus}",
        f"    base model        {base}",
        f"    binidx data       {data}.bin / .idx (+ answer mask {data}.mask.bin / .idx)",
        f"    adapters          {proj}/rwkv-0.pth ... rwkv-{cfg.epochs - 1}.pth (+ .json sidecars)",
        f"    logs              {proj}/train_log.txt, metrics.csv, loss.png",
        f"    merged model      {merged}  (plain RWKV-7 .pth: RWKV Runner / rwkv package / Ai00 converter)",
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
    ]
    print("\n".join(report))
    return 0
