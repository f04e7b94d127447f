"""Bad data met mid-run inside a DataLoader worker (--num_workers 1): one `error:` line, exit status 2, and
the process ends. Data over FULL_CHECK_TOKENS is scanned in windows when the dataset is built, then checked
sample by sample; the test turns the scan off to meet the error in a worker."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from rwkv_disha.data.binidx import write_binidx
from rwkv_disha.errors import RWKVDishaError

RUN = """
import sys
import rwkv_disha.data.dataset as dataset
dataset._token_range = lambda source: (0, 0)  # as if the start's scan had missed the bad id
from rwkv_disha.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_error_in_a_worker_is_one_line_and_the_process_ends(tmp_path, make_checkpoint):
    base = make_checkpoint(1, 64, 256)
    write_binidx(tmp_path / "oov", [np.array([1, 2, 3, 300, 0], np.int32)] * 8)  # 300 >= vocab 256
    argv = [
        "train", "--load_model", str(base), "--proj_dir", str(tmp_path / "run"), "--data_file",
        str(tmp_path / "oov"), "--data_type", "binidx", "--ctx_len", "16", "--micro_bsz", "2",
        "--epoch_steps", "2", "--epoch_count", "1", "--accelerator", "cpu", "--precision", "fp32",
        "--strategy", "auto", "--progress_bar", "0", "--num_workers", "1",
    ]  # fmt: skip
    # the workers ignore SIGTERM, multiprocessing's way to end them at exit: this used to hang there
    proc = subprocess.run(
        [sys.executable, "-c", RUN, *argv], capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors == [
        f"error: token id 300 in {tmp_path / 'oov'} is outside the vocabulary (vocab_size 256); "
        "the data was tokenized for another model"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_the_message_of_an_error_rebuilt_from_a_worker_is_the_original_line():
    """torch re-raises it in the main process as RWKVDishaError("Caught ... Original Traceback ...")."""
    wrapped = (
        "Caught RWKVDishaError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise RWKVDishaError(\n'
        "rwkv_disha.errors.RWKVDishaError: token id 300 is outside the vocabulary\n"
    )
    assert str(RWKVDishaError(wrapped)) == "token id 300 is outside the vocabulary"
    assert str(RWKVDishaError("Caught nothing")) == "Caught nothing"
