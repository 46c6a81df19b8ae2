"""What a run writes, for both training scripts: metrics.jsonl (and the trackers), the running loss between log
lines, memory readings, and files and folders written atomically with the umask's permissions; a library's own
words for a failed write become the OSError it is."""

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import resource
import shutil
import sys
from pathlib import Path

import torch

from common.preemption import Preemption

# How torch's zip writer and Rust's std::io say that a write failed (they carry no errno of their own).
WRITE_FAILED = re.compile(r"iostream error|unexpected pos|file write failed|failed writing|write_all|Os \{")


@contextlib.contextmanager
def writing(path: Path, tmp: Path | None = None):
    """Around a write into `path` by torch, safetensors or transformers: a failure in their own words (a full disk is
    a RuntimeError in torch's zip writer, a SafetensorError in Rust's) becomes the OSError it is, naming `path` (a
    failed write: exit 74); with no errno in the words, ENOSPC if the disk is full now, else EIO. `tmp`, a
    half-written folder, is removed."""
    try:
        yield
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        words = " ".join(str(e) for e in (err, err.__cause__, err.__context__) if e is not None)
        numbered = re.search(r"os error (\d+)|code: (\d+)", words)  # Rust's "os error 28"
        if isinstance(err, OSError) or not isinstance(err, Exception) or not (numbered or WRITE_FAILED.search(words)):
            raise
        existing = next(p for p in [path, *path.absolute().parents] if p.exists())
        code = errno.ENOSPC if shutil.disk_usage(existing).free < 2**20 else errno.EIO
        code = int(numbered.group(1) or numbered.group(2)) if numbered else code
        raise OSError(code, os.strerror(code), str(path)) from err


def follow_umask(path: Path) -> None:
    """Give `path` (a file, or every file below a folder) the umask's permissions, as every other output has: some
    writers (safetensors among them) create files 0600, which a teammate cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]:
        file.chmod(0o666 & ~mask)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary one and a rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def swap_folder(tmp: Path, final: Path) -> None:
    """Put a fully written folder in place of `final` (the old one stays whole until then), with the umask's
    permissions."""
    follow_umask(tmp)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None  # a line that a hard kill cut short


class MetricsLog:
    """One JSON line per record in run_dir/metrics.jsonl, forwarded to the trackers too. A resumed run
    (`step_offset`: its checkpoint's step) drops what the interrupted run logged after it, and lines a kill cut."""

    def __init__(self, accelerator, run_dir: Path, step_offset: int | None = None):
        self.accelerator = accelerator
        self.path = run_dir / "metrics.jsonl"
        if accelerator.is_main_process:
            run_dir.mkdir(exist_ok=True)  # a fold's folder, inside the run's
            resumed = step_offset is not None and self.path.exists()
            lines = self.path.read_text(errors="replace").splitlines() if resumed else []
            kept = [line for line in lines if (step := _step_of(line)) is not None and step <= step_offset]
            self.path.write_text("".join(line + "\n" for line in kept))

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
        self.sums = torch.zeros(size, device=device)
        self.batches = 0

    def add(self, *values: torch.Tensor) -> None:
        self.sums += torch.stack([v.detach().reshape(()) for v in values])
        self.batches += 1

    def pop_mean(self, accelerator) -> list[float]:
        """The means over every process since the last call (a host sync: only where the loop logs)."""
        mean = (accelerator.reduce(self.sums, "mean") / max(1, self.batches)).tolist()
        self.sums.zero_()
        self.batches = 0
        return mean


@dataclasses.dataclass
class Run:
    """Where one model's training writes and what may stop it: handed to train() beside the model."""

    dir: Path  # its checkpoints/ and metrics.jsonl go here
    log: MetricsLog
    preemption: Preemption
    skipped: set[str] = dataclasses.field(default_factory=set)  # inputs skipped on this process (bad images)
