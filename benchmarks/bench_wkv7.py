"""WKV-7 kernel benchmark (issue 2): chunked torch kernel vs the per-step loop, forward + backward.

.venv/bin/python benchmarks/bench_wkv7.py          # B=1 T=512 H=12 N=64 fp32, CPU
.venv/bin/python benchmarks/bench_wkv7.py --device cuda --ops fla,torch,loop
"""

import sys

from rwkv_disha.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--what", "kernel", *sys.argv[1:]]))
