"""Run setup and teardown, written once for train_dual_task.py and train_llava.py (and the predict scripts' checks).

    accelerator = make_accelerator(cfg.mixed_precision, ...)  # CPU fallback, FSDP2 on CPU, no silent fallbacks
    resume = preflight(accelerator, cfg, run_dirs)   # every check before the first write; the checkpoints to resume
    ...                                              # data, model, checkpoint loaded: still nothing written
    start_run(accelerator, cfg, RUN_OUTPUTS, ...)    # the first write: config.yaml (an --overwrite'n run goes now)
    if train(...): exit_preempted(accelerator, step) # a signal: the checkpoint is saved, exit 75
    finish(accelerator, run.preemption)              # after training: the final phase was finished, exit 0
"""

import dataclasses
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import gather_object
from filelock import FileLock, Timeout

from common.checkpoint import check_checkpoint_fits, newest_intact_checkpoint, resolve_resume
from common.config import save_config
from common.distributed import (
    check_one_view_of_output_dir,
    confirm_output_dir_is_shared,
    refuse_silent_fallbacks,
    use_fsdp_on_cpu,
)
from common.errors import UserError, warn
from common.preemption import EXIT_PREEMPTED, Preemption
from common.run_log import MetricsLog, peak_memory_mb

RUN_MARKER = "config.yaml"  # a folder holding this file holds a run
LOCK, HOLDER = ".lock", ".lock.holder"  # in a run folder: an OS file lock (a kill -9 releases it), and who holds it
_held: list[FileLock] = []  # the run-folder locks this process holds
_notes: list[Path] = []  # the holder notes this process wrote (a killed run's stale note is left as it is)
_training: dict = {}  # the training run under way in this process: its script, for the line after a failed write


def make_accelerator(mixed_precision: str | None, project_dir: str | None = None, gradient_accumulation_steps: int = 1,
                     report_to: str = "none") -> Accelerator:
    """The Accelerator the scripts run with, on whatever `accelerate launch` (or plain python) set up."""
    try:
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # lets `accelerate launch --multi_gpu` run gloo processes on CPU
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=gradient_accumulation_steps,
            log_with=None if report_to == "none" else report_to,
            project_dir=project_dir,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
    except ValueError as err:
        raise UserError(f"{err}; choose another --mixed_precision (bf16 works on CPU)") from None
    use_fsdp_on_cpu(accelerator)  # fsdp.yaml on CPU processes: Accelerate's real FSDP2 path, not DDP
    refuse_silent_fallbacks(accelerator)
    return accelerator


def preflight(accelerator, cfg, run_dirs: list[Path]) -> list[Path | None]:
    """Everything about the output folder that bad input can fail, checked before anything is written: may the run
    write there, which checkpoint each of `run_dirs` (folders under --output_dir, one per model) resumes from, does
    it fit these settings, and does every process see the same folder. Returns those checkpoints (None: fresh)."""
    lock_run_dir(accelerator, Path(cfg.output_dir))  # first: a folder in use is refused as such, before other checks
    _training["script"] = Path(sys.modules[type(cfg).__module__].__file__).name  # the script that defines Config
    output_dir = check_output_dir(cfg.output_dir, resuming=cfg.resume_from is not None, overwrite=cfg.overwrite)
    resume_paths = [resolve_resume(run_dir, cfg.resume_from) for run_dir in run_dirs]
    for run_dir, path in zip(run_dirs, resume_paths):
        if path is None and cfg.resume_from == "latest":
            accelerator.print(f"no checkpoint in {run_dir}; starting from scratch")
    for path in filter(None, resume_paths):
        check_checkpoint_fits(accelerator, path, cfg)
    check_one_view_of_output_dir(output_dir, next(filter(None, resume_paths), None))  # several machines: one filesystem
    return resume_paths


def lock_run_dir(accelerator, folder: Path, flag: str = "--output_dir") -> None:
    """One run or prediction per folder at a time. The main process takes an OS lock on `folder` (a file lock on
    folder/.lock: a kill -9 releases it, and it holds across machines on one shared filesystem); if another process
    holds it, every process refuses together, naming that process and its host. A folder that does not exist yet is
    locked by start_run, which creates it. Held until `release_run_dirs` (finish, the next run in this process) or
    the end of the process."""
    release_run_dirs()
    problem = _lock(folder, flag) if accelerator.is_main_process and folder.is_dir() else None
    if problem := next(filter(None, gather_object([problem])), None):
        raise UserError(problem)


def _lock(folder: Path, flag: str) -> str | None:
    """Take the lock on `folder`; what stops it, or None. A folder this user cannot write into is not locked: nobody
    like it can write there either (a read-only copy of a finished run, to predict from)."""
    lock = FileLock(folder / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads((folder / HOLDER).read_text())
            who = f"process {holder['pid']} on {holder['host']}, since {holder['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "a process still starting up"
        return f"{folder} is in use by another run or prediction ({who}); wait for it to end or stop it, or pass " \
               f"another {flag}"
    except OSError:
        return None
    _held.append(lock)
    return None


def release_run_dirs() -> None:
    """Let go of the run-folder locks this process holds (and the note of who holds them)."""
    _training.clear()
    while _notes:
        _notes.pop().unlink(missing_ok=True)
    while _held:
        _held.pop().release()


def after_failed_write(err: OSError) -> str | None:
    """What to do after a failed write of the training run under way (common/errors.py's exit 74): the newest intact
    checkpoint of the model being written, and the command that continues from it. None outside a training run."""
    if not _training or not err.filename:
        return None
    path = Path(err.filename)
    run_dir = next((p for p in path.parents if (p / RUN_MARKER).is_file()), None)
    if run_dir is None:
        return None
    model_dir = next(p for p in path.parents if (p / "checkpoints").is_dir() or p == run_dir)  # the run, or its fold
    newest = newest_intact_checkpoint(model_dir)
    kept = f"the newest intact checkpoint is {newest}" if newest else "no checkpoint was saved yet"
    return (f"{kept}; make room, then continue with python {_training['script']} --config {run_dir / RUN_MARKER} "
            f"--resume_from latest (or your launch command with --resume_from latest)")


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
    check_writable(path, "--output_dir")
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
    check_writable(path.parent, flag)
    return path


def check_writable(folder: Path, flag: str) -> None:
    """The folder, or the nearest one above it that exists (where it would be created), must be writable."""
    existing = next(p for p in [folder, *folder.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {existing} (not a writable folder); pick another {flag}")


def start_run(accelerator, cfg, run_outputs: list[str], fresh: bool, project: str) -> None:
    """The first write of a run, made once every check has passed, so that bad input changes nothing.

    A fresh start in a folder that holds an earlier run (`--overwrite`) removes that run's outputs
    (`run_outputs`: names or glob patterns inside the folder; nothing else in it is touched) so that no
    stale results or checkpoints are mixed with the new ones. Then the resolved config is written and the
    trackers (--report_to) start.
    """
    output_dir = Path(cfg.output_dir)
    created, problem = not output_dir.exists(), None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        problem = None if _held else _lock(output_dir, "--output_dir")  # a new folder: locked as it is made
    if problem := next(filter(None, gather_object([problem])), None):
        raise UserError(problem)
    if accelerator.is_main_process:
        if fresh and (output_dir / RUN_MARKER).exists():
            for old in {p for pattern in run_outputs for p in output_dir.glob(pattern)}:
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old)
                else:
                    old.unlink()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        (output_dir / HOLDER).write_text(json.dumps(holder) + "\n")  # for a second run's error line
        _notes.append(output_dir / HOLDER)
        save_config(cfg, output_dir / RUN_MARKER)
    accelerator.wait_for_everyone()
    confirm_output_dir_is_shared(accelerator, output_dir / RUN_MARKER, created)  # several machines: one filesystem
    if cfg.report_to != "none":
        accelerator.init_trackers(project, config={k: str(v) if isinstance(v, list) else v
                                                   for k, v in dataclasses.asdict(cfg).items()})


@dataclass
class Run:
    """Where one model's training writes and what may stop it: handed to train() beside the model."""

    dir: Path  # its checkpoints/ and metrics.jsonl go here
    log: MetricsLog
    preemption: Preemption
    skipped: set[str] = field(default_factory=set)  # inputs skipped on this process (unreadable images)


def warn_if_short(total_steps: int, steps_per_epoch: int, max_steps: int, untrained: str, unvalidated: str) -> None:
    """Legal but surprising: no training at all (what happens then: `untrained`), or --max_steps ending it before
    the first epoch's validation (`unvalidated`)."""
    if total_steps == 0:
        warn(f"--epochs 0: nothing is trained; {untrained}")
    elif total_steps < steps_per_epoch:
        warn(f"--max_steps {max_steps} ends training before the first epoch ({steps_per_epoch} steps) finishes: "
             f"{unvalidated}")


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
    release_run_dirs()
    accelerator.print(f"stopped by a signal at step {step} with a checkpoint saved; "
                      f"continue with --resume_from latest (exit code {EXIT_PREEMPTED})", flush=True)
    sys.exit(EXIT_PREEMPTED)


def finish(accelerator, preemption: Preemption) -> None:
    """The end of a run that finished: trackers closed, signals back to their defaults."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    release_run_dirs()
    preemption.uninstall()
    if preemption.requested:
        accelerator.print("the signal came after training: the final evaluation and outputs were finished "
                          "(exit code 0)")
