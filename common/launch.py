"""Run setup and teardown, for both training scripts (and the predict scripts' folder lock and output checks).

    accelerator = make_accelerator(cfg.mixed_precision, ...)  # CPU fallback, FSDP2 on CPU, no silent fallbacks
    with RunFolder(accelerator, cfg.output_dir) as folder:    # one run per folder, let go at the end
        resume = preflight(accelerator, cfg, run_dirs)        # every check before the first write
        ...                                                   # data, model, checkpoint loaded: nothing written
        start_run(accelerator, cfg, folder, RUN_OUTPUTS, ...) # the first write: config.yaml
        if train(...): exit_preempted(accelerator, step)      # a signal: the checkpoint is saved, exit 75
        finish(accelerator, preemption)                       # the final phase done, exit 0
"""

import dataclasses
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import gather_object
from filelock import FileLock, Timeout

from common.checkpoint import check_fits, newest_intact, resolve_resume
from common.config import RunConfig, save_config
from common.distributed import check_one_view, confirm_shared, refuse_silent_fallbacks, use_fsdp_on_cpu
from common.errors import UserError
from common.preemption import EXIT_PREEMPTED, Preemption
from common.run_log import peak_memory_mb

RUN_MARKER = "config.yaml"  # a folder holding this file holds a run
LOCK = ".lock"  # in a run folder: an OS file lock (a kill -9 releases it)
HOLDER = ".lock.holder"  # who holds it, for a second run's error line


def make_accelerator(mixed_precision: str | None, grad_accum_steps: int = 1, report_to: str = "none",
                     project_dir: str | None = None) -> Accelerator:
    """The Accelerator the scripts run with, on whatever `accelerate launch` (or plain python) set up."""
    try:
        accelerator = Accelerator(cpu=not torch.cuda.is_available(),  # `--multi_gpu` on a CPU: gloo processes
                                  mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum_steps,
                                  log_with=None if report_to == "none" else report_to, project_dir=project_dir,
                                  dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    except ValueError as err:
        raise UserError(f"{err}; choose another --mixed_precision (bf16 works on CPU)") from None
    use_fsdp_on_cpu(accelerator)  # fsdp.yaml on CPU processes: Accelerate's real FSDP2 path, not DDP
    refuse_silent_fallbacks(accelerator)
    return accelerator


class RunFolder:
    """One run or prediction per folder at a time, from `with` to its end.

    The main process takes an OS lock on folder/.lock (a kill -9 releases it; it holds across machines on
    one shared filesystem); while another process holds it, every process refuses together, naming that
    process and its host. A folder that does not exist yet is locked by start_run, which makes it. A write
    that fails inside a training run is given the newest intact checkpoint and the command that goes on.
    """

    def __init__(self, accelerator, folder: str | Path, flag: str = "--output_dir"):
        self.accelerator = accelerator
        self.folder = Path(folder)
        self.flag = flag
        self.lock = FileLock(self.folder / LOCK, timeout=0)
        self.script = None  # the training script, once start_run has written the run's config

    def __enter__(self) -> "RunFolder":
        self.acquire()
        return self

    def acquire(self) -> None:
        problem = None
        if self.accelerator.is_main_process and not self.lock.is_locked and self.folder.is_dir():
            try:
                self.lock.acquire()
            except Timeout:
                try:
                    holder = json.loads((self.folder / HOLDER).read_text())
                    who = f"process {holder['pid']} on {holder['host']}, since {holder['since']}"
                except (OSError, ValueError, KeyError, TypeError):
                    who = "a process still starting up"
                problem = (f"{self.folder} is in use by another run or prediction ({who}); wait for it to end or "
                           f"stop it, or pass another {self.flag}")
            except OSError:
                pass  # a folder this user cannot write into: nobody like it can write there either
        if problem := next(filter(None, gather_object([problem])), None):
            raise UserError(problem)

    def __exit__(self, kind, err, traceback) -> None:
        if isinstance(err, OSError) and self.script and err.filename:  # for common/errors.py's line
            parents = Path(err.filename).parents
            model_dir = next((p for p in parents if (p / "checkpoints").is_dir() or p == self.folder), self.folder)
            newest = newest_intact(model_dir)
            kept = f"the newest intact checkpoint is {newest}" if newest else "no checkpoint was saved yet"
            err.fix = (f"{kept}; make room, then continue with python {self.script} --config "
                       f"{self.folder / RUN_MARKER} --resume_from latest (or your launch command with --resume_from "
                       f"latest)")
        if self.lock.is_locked:
            if self.script:
                (self.folder / HOLDER).unlink(missing_ok=True)
            self.lock.release()


def check_writable(folder: Path, flag: str) -> None:
    """The folder, or the nearest one above it that exists (where it would be made), must be writable."""
    existing = next(p for p in [folder, *folder.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {existing} (not a writable folder); pick another {flag}")


def preflight(accelerator, cfg: RunConfig, run_dirs: list[Path]) -> list[Path | None]:
    """What bad input can fail about the output folder, checked before anything is written: may the run write
    there, which checkpoint each of `run_dirs` (one per model) resumes from, does it fit these settings, does
    every process see the same folder. Returns those checkpoints (None: start afresh)."""
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file, not a folder; pick another --output_dir")
    if (output_dir / RUN_MARKER).exists() and not (cfg.resume_from or cfg.overwrite):
        raise UserError(f"{output_dir} already holds a run; pass --resume_from latest to continue it, --overwrite "
                        f"true to replace it, or a new --output_dir")
    check_writable(output_dir, "--output_dir")
    resume_paths = [resolve_resume(run_dir, cfg.resume_from) for run_dir in run_dirs]
    for run_dir, path in zip(run_dirs, resume_paths):
        if path is None and cfg.resume_from == "latest":
            accelerator.print(f"no checkpoint in {run_dir}; starting from scratch")
        if path is not None:
            check_fits(accelerator, path, cfg)
    check_one_view(output_dir, next(filter(None, resume_paths), None))  # several machines: one filesystem
    return resume_paths


def start_run(accelerator, cfg: RunConfig, folder: RunFolder, outputs: list[str], fresh: bool, project: str):
    """The first write of a run, once every check has passed (so bad input changes nothing): the folder is made
    and locked, a fresh run in a folder that held one (--overwrite) removes its `outputs` (names or glob
    patterns; nothing else is touched), then the resolved config is written and the trackers start."""
    output_dir = Path(cfg.output_dir)
    created = not output_dir.exists()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    folder.acquire()  # a new folder: locked as it is made
    folder.script = Path(sys.modules[type(cfg).__module__].__file__).name  # the script whose Config it is
    if accelerator.is_main_process:
        earlier_run = fresh and (output_dir / RUN_MARKER).exists()
        for old in {p for pattern in outputs for p in output_dir.glob(pattern)} if earlier_run else ():
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        (output_dir / HOLDER).write_text(json.dumps(holder) + "\n")
        save_config(cfg, output_dir / RUN_MARKER)
    accelerator.wait_for_everyone()
    confirm_shared(accelerator, output_dir / RUN_MARKER, created)  # several machines: one filesystem
    if cfg.report_to != "none":
        config = {k: str(v) if isinstance(v, list) else v for k, v in dataclasses.asdict(cfg).items()}
        accelerator.init_trackers(project, config=config)


def run_facts(accelerator, state, guard, seed: int, started: float) -> dict:
    """What results.json says of a run besides its scores: steps, time, speed, memory, setup, fallback, seed."""
    speed = state.train_samples / state.train_seconds if state.train_seconds else None
    return {"epochs_run": state.epoch, "optimizer_steps": state.step, "wall_seconds": time.perf_counter() - started,
            "train_samples_per_second": speed, "peak_memory_mb": peak_memory_mb(accelerator.device),
            "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type.value),
            "mixed_precision": accelerator.mixed_precision, "fell_back_to_fp32_at_step": guard.fallback_step,
            "seed": seed}


def exit_preempted(accelerator, step: int) -> None:
    """A signal stopped training and the loop saved a checkpoint: say how to continue, exit 75."""
    accelerator.end_training()
    accelerator.print(f"stopped by a signal at step {step} with a checkpoint saved; continue with --resume_from "
                      f"latest (exit code {EXIT_PREEMPTED})", flush=True)
    sys.exit(EXIT_PREEMPTED)


def finish(accelerator, preemption: Preemption) -> None:
    """The end of a run that finished: trackers closed, signals back to their defaults."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    preemption.uninstall()
    if preemption.requested:
        accelerator.print("the signal came after training: the final evaluation and outputs were finished (exit 0)")
