"""Run logging: the output folder (checked, then started), metrics.jsonl, Accelerate trackers, JSON results, memory readings."""

import json
import os
import resource
import shutil
import sys
from pathlib import Path

import torch

from common.config import save_config
from common.distributed import confirm_output_dir_is_shared
from common.errors import UserError

RUN_MARKER = "config.yaml"  # a folder holding this file holds a run


def check_output_dir(output_dir: str | Path, resuming: bool, overwrite: bool) -> Path:
    """May a run write into this folder? Only reads: refuses with a UserError, creates nothing."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--output_dir {path} is a file, not a folder; pick another --output_dir")
    if (path / RUN_MARKER).exists() and not (resuming or overwrite):
        raise UserError(
            f"{path} already holds a run; pass --resume_from latest to continue it, --overwrite true to "
            f"replace it, or a new --output_dir"
        )
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {existing} (permission denied); pick another --output_dir")
    return path


def check_output_file(path: str | Path, overwrite: bool, inputs: list, flag: str) -> Path:
    """May this file be written? Only reads: never a folder, never an input, an existing file only if asked."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; name the file to write")
    if path.exists() and any(Path(i).exists() and path.resolve() == Path(i).resolve() for i in inputs if i):
        raise UserError(f"{flag} {path} is one of this run's inputs; name another file")
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite true to replace it, or another {flag}")
    existing = next(p for p in [path.parent, *path.absolute().parent.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path} ({existing} is not a writable folder); pick another {flag}")
    return path


def start_run(accelerator, output_dir: Path, config, run_outputs: list[str], fresh: bool) -> None:
    """The first write of a run, made once every check has passed, so that bad input changes nothing.

    A fresh start in a folder that holds an earlier run (`--overwrite`) removes that run's outputs
    (`run_outputs`, names inside the folder; nothing else in it is touched) so that no stale results
    or checkpoints are mixed with the new ones. Then the resolved config is written.
    """
    created = not output_dir.exists()
    if accelerator.is_main_process:
        if fresh and (output_dir / RUN_MARKER).exists():
            for name in run_outputs:
                old = output_dir / name
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old)
                elif old.exists() or old.is_symlink():
                    old.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / RUN_MARKER)
    accelerator.wait_for_everyone()
    confirm_output_dir_is_shared(accelerator, output_dir / RUN_MARKER, created)  # several machines: one filesystem


def replace_folder(tmp: Path, final: Path) -> None:
    """Put a fully written folder in place of `final`; the old one stays whole until the new one is complete."""
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
