"""common/launch.py's RunFolder: one run per output folder. The same command started twice (two terminals, a job
array with one --output_dir, a requeue that overlaps the old job) must not run twice into one folder: the second
stops before it writes anything, with one line naming the folder and the process and host that hold it; a kill -9
of the holder releases the folder; predicting into a folder in use is refused the same way."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate import PartialState
from test_bad_input import snapshot  # every file under a folder with its bytes

from common.errors import UserError
from common.launch import HOLDER, LOCK, RunFolder

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--conv_channels", "8", "--hidden_size", "8", "--gru_layers", "1", "--batch_size", "64", "--log_every", "1"]


def hold(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`, as a run does: it takes the lock and notes who it is."""
    code = ("import sys, time; from accelerate import PartialState; from pathlib import Path; "
            "from common.launch import RunFolder, HOLDER; import json, os, socket; "
            "held = RunFolder(PartialState(), Path(sys.argv[1])); held.acquire(); "
            "Path(sys.argv[1], HOLDER).write_text(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), "
            "'since': 'now'})); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_folder_held_by_another_process_is_refused_by_name_until_a_kill_9_frees_it(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = hold(folder)
    try:
        with pytest.raises(UserError, match=rf"^{folder} is in use by another run or prediction \(process "
                                            rf"{holder.pid} on {socket.gethostname()}, since now\); wait for it to end "
                                            rf"or stop it, or pass another --output_dir$"):
            RunFolder(PartialState(), folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunFolder(PartialState(), folder):  # the OS let go of the killed holder's lock
        pass
    with RunFolder(PartialState(), folder):  # and this process may lock it again (the earlier lock was let go)
        pass
    assert sorted(p.name for p in folder.iterdir()) == [LOCK, HOLDER]  # the killed holder's note stays, harmless


def test_the_same_command_started_twice_runs_once_and_the_second_writes_nothing(tmp_path, small_cmapss):
    out = tmp_path / "run"
    # A run that cannot end by itself while the test runs (small data trains fast, and early stopping would end it).
    command = [sys.executable, "train_dual_task.py", "--data", f"{small_cmapss}/FD001", *SMALL,
               "--early_stopping_patience", "100000", "--epochs", "100000", "--output_dir", str(out)]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "LATEST").exists():  # training, with a checkpoint to resume from
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        holder, config = json.loads((out / HOLDER).read_text()), (out / "config.yaml").read_bytes()
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        for args, flag in (([], "--output_dir"), (["--resume_from", "latest"], "--output_dir"),
                           (["--overwrite", "true"], "--output_dir")):
            second = subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
            assert second.returncode == 2 and second.stdout == "", second.stderr
            assert second.stderr.splitlines() == [
                f"error: {out} is in use by another run or prediction (process {first.pid} on "
                f"{socket.gethostname()}, since {holder['since']}); wait for it to end or stop it, or pass another "
                f"{flag}"], second.stderr
            assert (out / "config.yaml").read_bytes() == config and (out / "checkpoints" / "LATEST").exists()
        predict = subprocess.run([sys.executable, "predict_dual_task.py", "--run_dir", str(out), "--data",
                                  str(small_cmapss / "test_FD001.txt"), "--output", str(tmp_path / "p.csv")],
                                 cwd=REPO, capture_output=True, text=True, timeout=120)
        assert predict.returncode == 2 and "is in use by another run or prediction" in predict.stderr
        assert "--run_dir" in predict.stderr and not (tmp_path / "p.csv").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The killed run's folder is free again: it resumes from its checkpoint.
    before = snapshot(out / "checkpoints")
    resumed = subprocess.run([*command[:-4], "--epochs", "1", "--output_dir", str(out), "--resume_from", "latest",
                              "--max_steps", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (out / HOLDER).exists() and before  # a finished run lets go, note and all
