"""Benchmark `rwkv-disha prepare`: tokens/s on >= 50 MB of generated jsonl, 1 worker vs all cores.

    .venv/bin/python benchmarks/bench_prepare.py            # 50 MB, workers 1 and all cores
    .venv/bin/python benchmarks/bench_prepare.py --mb 200 --workers 1 2 4

The corpus is synthetic (made-up English-like words, CJK characters, some emoji; 10% of the records
are chat records, which also write the answer-mask sidecar), generated from a fixed seed in a
temporary directory, so no third-party text is involved and every run sees the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path


def make_words(rng: random.Random) -> tuple[list[str], list[str]]:
    cons, vows = "bcdfghjklmnprstvwz", "aeiouy"
    latin = {
        "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(1, 4))) for _ in range(8000)
    }
    cjk = ["".join(chr(rng.randint(0x4E00, 0x6FFF)) for _ in range(rng.randint(1, 3))) for _ in range(4000)]
    return sorted(latin), cjk


def paragraph(rng: random.Random, latin: list[str], cjk: list[str], n_words: int) -> str:
    if rng.random() < 0.7:
        words = rng.choices(latin, k=n_words)
        words[0] = words[0].capitalize()
        text = " ".join(words)
        if rng.random() < 0.2:
            text += " " + rng.choice("😀🎉🚀✨")
        return text + "."
    return "".join(rng.choices(cjk, k=n_words // 2)) + "。"


def generate(path: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """Write >= ``megabytes`` MB of jsonl; returns (records, bytes)."""
    rng = random.Random(seed)
    latin, cjk = make_words(rng)
    target = int(megabytes * 1_000_000)
    size = records = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            if rng.random() < 0.1:
                rec = {
                    "messages": [
                        {"role": "user", "content": paragraph(rng, latin, cjk, rng.randint(5, 40))},
                        {"role": "assistant", "content": paragraph(rng, latin, cjk, rng.randint(20, 200))},
                    ]
                }
            else:
                paras = [paragraph(rng, latin, cjk, rng.randint(20, 150)) for _ in range(rng.randint(1, 8))]
                rec = {"text": "\n\n".join(paras)}
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            records += 1
    return records, size


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main() -> int:
    from rwkv_disha.data.prepare import Config, prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0, help="jsonl size to generate, in MB (default 50)")
    ap.add_argument("--workers", type=int, nargs="*", default=None, help="worker counts (default: 1 and all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ncpu = cpu_count()
    counts = args.workers or sorted({1, ncpu})
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        src = Path(tmp) / "corpus.jsonl"
        t0 = time.perf_counter()
        records, nbytes = generate(src, args.mb, args.seed)
        print(f"generated {records:,} records, {nbytes / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
        print(f"python {platform.python_version()}, {platform.machine()}, {ncpu} cores available")
        rows = []
        for w in counts:
            cfg = Config(input=[str(src)], output=str(Path(tmp) / f"out{w}"), workers=w, progress=False)
            stats = prepare(cfg)
            rows.append((w, stats))
        base = rows[0][1].tokens_per_second
        print()
        print("| workers | documents | tokens | seconds | tokens/s | MB/s (input) | speed-up |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for w, s in rows:
            print(
                f"| {w} | {s.documents:,} | {s.tokens:,} | {s.seconds:.1f} | {s.tokens_per_second:,.0f} "
                f"| {nbytes / 1e6 / s.seconds:.1f} | {s.tokens_per_second / base:.2f}x |"
            )
        outs = [(Path(tmp) / f"out{w}.bin").read_bytes() for w, _ in rows]
        assert all(o == outs[0] for o in outs), "outputs differ between worker counts"
        print("\noutputs are byte-identical across worker counts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
