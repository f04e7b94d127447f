"""Two processes on CPU (DDP over gloo): training runs, and the ranks see disjoint samples."""

import os
import subprocess
import sys

from rwkv_disha.model.load import load_state_dict


def test_ddp_two_cpu_processes_see_disjoint_data(tmp_path, base_path, unique_data, train_args):
    proj = tmp_path / "ddp"
    ddp = ["--devices", "2", "--strategy", "ddp", "--log_samples", "1"]
    argv = train_args(base_path, unique_data, proj, *ddp, epochs=2, steps=5, bsz=2)
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")
    }
    proc = subprocess.run(
        [sys.executable, "-m", "rwkv_disha.cli", *argv], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    firsts = {}
    for rank in (0, 1):
        lines = (proj / f"samples-rank{rank}.txt").read_text().split("\n")
        firsts[rank] = [int(line.split()[0]) for line in lines if line]
        assert len(firsts[rank]) == 2 * 5 * 2  # epochs x steps x micro_bsz, on each rank
    assert set(firsts[0]).isdisjoint(firsts[1])
    assert len(set(firsts[0]) | set(firsts[1])) == 40  # 2 x 20 samples: every document exactly once
    sd = load_state_dict(proj / "rwkv-1.pth")
    assert sd["blocks.0.att.key.disha"].abs().sum() > 0
