"""A failed write (a full disk, a quota, an I/O error, a read-only filesystem) ends a run with exit code 74 and one
line naming the file, what the system said, the newest intact checkpoint and the command that continues from it; the
half-written temporary checkpoint is removed; once there is room, resuming ends with the very weights of an
uninterrupted run. The disk fills up at the Nth file a run writes (Python's open() and safetensors' Rust writer
alike), for both training scripts."""

import builtins
import contextlib
import errno
import io
import os
import re
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file
from test_bad_input import run  # script.main in this process, through exit_on_user_error: code, stdout, stderr

import train_dual_task
import train_llava
from common.errors import EXIT_IO_ERROR
from common.run_log import writing

SMALL = ["--conv_channels", "8", "--hidden_size", "8", "--gru_layers", "1", "--batch_size", "64", "--log_every", "1",
         "--epochs", "2", "--checkpoint_every", "4", "--dropout", "0"]
SAFETENSORS_WRITERS = ["accelerate.utils.other", "peft.peft_model", "transformers.modeling_utils"]


class FullDisk:
    """From the `nth` file written under `folder` on, every write there fails with ENOSPC, as on a full disk."""

    def __init__(self, folder: Path, nth: int):
        self.folder, self.nth, self.count = Path(folder).absolute(), nth, 0

    def _check(self, file) -> None:
        if isinstance(file, (str, os.PathLike)) and self.folder in Path(file).absolute().parents:
            self.count += 1
            if self.count >= self.nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))

    def __enter__(self):
        real_open, real_save = builtins.open, safetensors.torch.save_file

        def open_(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                self._check(file)
            return real_open(file, mode, *args, **kwargs)

        def save_file(tensors, filename, *args, **kwargs):
            self._check(filename)
            return real_save(tensors, filename, *args, **kwargs)

        self.patches = contextlib.ExitStack()
        mp = self.patches.enter_context(pytest.MonkeyPatch.context())
        mp.setattr(builtins, "open", open_)
        mp.setattr(io, "open", open_)
        for module in SAFETENSORS_WRITERS:
            mp.setattr(f"{module}.safe_save_file", save_file)
        return self

    def __exit__(self, *exc):
        self.patches.close()


def assert_failed_write_then_resume_ends_like(script, args, out: Path, nth: int, expected: dict, weights: str):
    with FullDisk(out, nth) as disk:
        outcome = run(script, *args, "--output_dir", out)
    assert disk.count >= nth, f"the run wrote only {disk.count} files"
    errors = outcome.error_lines
    assert outcome.code == EXIT_IO_ERROR and len(errors) == 1 and "Traceback" not in outcome.stderr, \
        outcome.stderr[-3000:]
    match = re.fullmatch(rf"error: cannot write (\S+) \(No space left on device\); (?:the newest intact checkpoint is "
                         rf"(\S+)|no checkpoint was saved yet); make room, then continue with python {script.__name__}"
                         rf"\.py --config {re.escape(str(out))}/config.yaml --resume_from latest \(or your launch "
                         rf"command with --resume_from latest\)", errors[0])
    assert match, errors[0]
    assert out in Path(match[1]).parents or Path(match[1]) == out
    assert not list(out.rglob(".tmp*")) and not list(out.rglob(".*.tmp")), "a half-written folder was left"
    if match[2]:  # the checkpoint named is whole: it is what --resume_from latest takes
        assert (Path(match[2]) / "meta.json").is_file()
    outcome = run(script, *args, "--output_dir", out, "--resume_from", "latest")
    assert outcome.code == 0, outcome.stderr[-3000:]
    resumed = load_file(out / weights)
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)


@pytest.fixture(scope="module")
def dual_uninterrupted(small_cmapss, tmp_path_factory):
    out = tmp_path_factory.mktemp("dual") / "run"
    with FullDisk(out, 10**9) as disk:
        outcome = run(train_dual_task, "--data", f"{small_cmapss}/FD001", *SMALL, "--output_dir", out)
    assert outcome.code == 0, outcome.stderr[-3000:]
    return load_file(out / "model.safetensors"), disk.count


@pytest.mark.parametrize("share", [0.05, 0.3, 0.6, 0.97])  # the nth of all writes: early, checkpoints, the end
def test_dual_task_full_disk_exits_74_and_resumes_to_the_same_weights(dual_uninterrupted, small_cmapss, tmp_path,
                                                                     share):
    expected, writes = dual_uninterrupted
    args = ["--data", f"{small_cmapss}/FD001", *SMALL]
    assert_failed_write_then_resume_ends_like(train_dual_task, args, tmp_path / "run", max(2, round(share * writes)),
                                              expected, "model.safetensors")


@pytest.fixture(scope="module")
def llava_inputs(tmp_path_factory):
    from tools.make_synthetic_screenshots import make_dataset
    from tools.make_tiny_llava import build_tiny_llava

    root = tmp_path_factory.mktemp("llava_inputs")
    return build_tiny_llava(root / "model"), make_dataset(root / "images", {"train": 24, "val": 16}, seed=0)


def llava_args(llava_inputs):
    model, images = llava_inputs
    return ["--model", model, "--train_data", images / "train.jsonl", "--val_data", images / "val.jsonl",
            "--num_workers", 0, "--batch_size", 4, "--grad_accum_steps", 1, "--epochs", 2, "--checkpoint_every", 3,
            "--lora_dropout", 0, "--log_every", 1]


@pytest.fixture(scope="module")
def llava_uninterrupted(llava_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava") / "run"
    with FullDisk(out, 10**9) as disk:
        outcome = run(train_llava, *llava_args(llava_inputs), "--output_dir", out)
    assert outcome.code == 0, outcome.stderr[-3000:]
    return load_file(out / "adapter" / "adapter_model.safetensors"), disk.count


@pytest.mark.parametrize("share", [0.1, 0.5, 0.95])
def test_llava_full_disk_exits_74_and_resumes_to_the_same_adapter(llava_uninterrupted, llava_inputs, tmp_path, share):
    expected, writes = llava_uninterrupted
    assert_failed_write_then_resume_ends_like(train_llava, llava_args(llava_inputs), tmp_path / "run",
                                              max(2, round(share * writes)), expected,
                                              "adapter/adapter_model.safetensors")


def test_a_library_s_own_words_for_a_full_disk_become_the_os_error(tmp_path):
    """safetensors (Rust) and torch's zip writer report a full disk in their own exceptions; `writing` names the
    file and the errno, removes the half-written folder, and leaves any other exception as it was."""
    tmp = tmp_path / ".tmp_step_00000001"
    tmp.mkdir()
    with pytest.raises(OSError) as err, writing(tmp / "model.safetensors", tmp=tmp):
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                           'left on device" })')
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(tmp / "model.safetensors"))
    assert not tmp.exists()
    with pytest.raises(ValueError, match="a bug"), writing(tmp_path / "x"):
        raise ValueError("a bug")


@pytest.mark.parametrize("free, expected", [(0, errno.ENOSPC), (10**9, errno.EIO)])
def test_torch_s_zip_writer_failing_is_a_full_disk_or_an_io_error(tmp_path, monkeypatch, free, expected):
    """torch.save on a full disk raises "unexpected pos" (seen on a 3 MB tmpfs), with no errno: whether the disk is
    full decides between ENOSPC and EIO."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))
    with pytest.raises(OSError) as err, writing(tmp_path / "train_state.pt"):
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 703680 vs 703568")  # noqa: B904
    assert err.value.errno == expected and err.value.filename == str(tmp_path / "train_state.pt")


def test_a_checkpoint_that_may_not_fit_is_warned_about_before_it_is_written(small_cmapss, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    outcome = run(train_dual_task, "--data", f"{small_cmapss}/FD001", *SMALL, "--max_steps", 9,
                       "--output_dir", tmp_path / "run")
    assert outcome.code == 0, outcome.stderr[-3000:]
    assert re.search(r"warning: .*checkpoints has 0.0 MB free and the last checkpoint took [0-9.]+ MB: the next may "
                     r"not fit; make room before it fails", outcome.stderr), outcome.stderr
