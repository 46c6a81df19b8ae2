"""Run logging: the output folder, metrics.jsonl, Accelerate trackers, JSON results, memory readings."""

import json
import os
import resource
import sys
from pathlib import Path

import torch

from common.errors import UserError

RUN_MARKER = "config.yaml"  # a folder holding this file holds a run


def prepare_output_dir(output_dir: str | Path, resuming: bool, overwrite: bool) -> Path:
    """Create the output folder; refuse to mix a new run into a folder that holds another one."""
    path = Path(output_dir)
    if (path / RUN_MARKER).exists() and not (resuming or overwrite):
        raise UserError(
            f"{path} already holds a run; pass --resume_from latest to continue it, --overwrite to "
            f"replace its outputs, or a new --output_dir"
        )
    if path.exists() and not path.is_dir():
        raise UserError(f"--output_dir {path} is a file, not a folder; pick another --output_dir")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """Appends one JSON line per record to output_dir/metrics.jsonl and forwards it to the trackers."""

    def __init__(self, accelerator, output_dir: Path, step_offset: int | None = None):
        self.accelerator = accelerator
        self.path = output_dir / "metrics.jsonl"
        if accelerator.is_main_process and step_offset is not None and self.path.exists():
            # Resuming: drop records the interrupted run wrote after its last checkpoint.
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step_offset]
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
