"""Run logging, for both training scripts: metrics.jsonl and the trackers, the running loss between log lines,
atomic JSON files and folders, memory readings."""

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import sys
from pathlib import Path

import torch


@contextlib.contextmanager
def writing(path: Path, tmp: Path | None = None):
    """Around a write into `path` that torch, safetensors or transformers make: a failure they report in their own
    words (a full disk is a RuntimeError in torch's zip writer, a SafetensorError in Rust's) becomes the OSError it
    is, naming `path`, so that it ends the run as a failed write (exit 74); `tmp`, a half-written folder, is removed."""
    try:
        yield
    except BaseException as err:
        code = err.errno if isinstance(err, OSError) else _errno_in(err, path) if isinstance(err, Exception) else None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if code is None or isinstance(err, OSError) and err.filename:
            raise
        raise OSError(code, os.strerror(code), str(path)) from err


# How torch's zip writer and Rust's std::io say that a write failed (they carry no errno of their own).
WRITE_FAILED = re.compile(r"iostream error|unexpected pos|file write failed|failed writing|write_all|Os \{")


def _errno_in(err: Exception, path: Path) -> int | None:
    """The errno that `err` (or an exception it arose from) carries in its words (Rust: "os error 28"); for a failed
    write without one, ENOSPC if the filesystem is full now, else EIO. None if nothing says a write failed."""
    words, cause = [], err
    while cause is not None:
        words.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    text = " ".join(words)
    if match := re.search(r"os error (\d+)|code: (\d+)", text):
        return int(match.group(1) or match.group(2))
    if not WRITE_FAILED.search(text):
        return None
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    return errno.ENOSPC if shutil.disk_usage(existing).free < 2**20 else errno.EIO


def umask_mode() -> int:
    """The permissions this process's umask gives a new file (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def follow_umask(path: Path) -> None:
    """Give `path` (a file, or every file below a folder) the umask's permissions, as every other output has: some
    writers (safetensors among them) create their files 0600, which a teammate on a shared cluster cannot read."""
    mode = umask_mode()
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]:
        if file.stat().st_mode & 0o777 != mode:
            file.chmod(mode)


def replace_folder(tmp: Path, final: Path) -> None:
    """Put a fully written folder in place of `final`; the old one stays whole until the new one is complete. Its
    files get the umask's permissions first (`follow_umask`)."""
    follow_umask(tmp)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line a hard kill cut short."""
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return None


class MetricsLog:
    """Appends one JSON line per record to output_dir/metrics.jsonl and forwards it to the trackers."""

    def __init__(self, accelerator, output_dir: Path, step_offset: int | None = None):
        self.accelerator = accelerator
        self.path = output_dir / "metrics.jsonl"
        if accelerator.is_main_process:
            output_dir.mkdir(exist_ok=True)  # a fold's folder, inside the run's
        if accelerator.is_main_process and step_offset is not None and self.path.exists():
            # Resuming: drop records the interrupted run wrote after its last checkpoint.
            kept = [line for line in self.path.read_text(errors="replace").splitlines()
                    if _step_of(line) is not None and _step_of(line) <= step_offset]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif accelerator.is_main_process and step_offset is None:
            self.path.write_text("")

    def log(self, metrics: dict, step: int) -> None:
        self.accelerator.log(metrics, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by PyTorch on CUDA; peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == "darwin" else kib / 2**10  # macOS reports bytes


class RunningMean:
    """Sums of some per-batch values since the last log line, kept on the device: no host sync per step."""

    def __init__(self, size: int, device):
        self.sums, self.batches = torch.zeros(size, device=device), 0

    def add(self, *values: torch.Tensor) -> None:
        self.sums += torch.stack([v.detach().reshape(()) for v in values])
        self.batches += 1

    def pop_mean(self, accelerator) -> list[float]:
        """The means over every process since the last call (a host sync: call it only where the loop logs)."""
        mean = (accelerator.reduce(self.sums, "mean") / max(1, self.batches)).tolist()
        self.sums.zero_()
        self.batches = 0
        return mean
