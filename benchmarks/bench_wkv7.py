"""WKV-7 kernel benchmark (issue 2): chunked torch kernel vs the per-step loop, forward + backward.

.venv/bin/python benchmarks/bench_wkv7.py          # B=1 T=512 H=12 N=64 fp32, CPU
.venv/bin/python benchmarks/bench_wkv7.py --device cuda --ops fla,torch,loop

`rwkv-disha bench --what kernel`: the ops run in interleaved rounds (the order rotates every round) and the
speed-up is the median over rounds of the paired ratio (loop time / torch time in the same round), so a
shared machine's drifting load cancels; a best-of-N ratio swung from 1.6x to 32.7x between two runs.
"""

import sys

from rwkv_disha.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--what", "kernel", *sys.argv[1:]]))
