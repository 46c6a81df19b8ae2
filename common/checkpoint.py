"""Atomic, verified checkpoints and resume, on the same or another number of processes (both training scripts).

Under `<run>/checkpoints/`:

    step_00000120/  model.safetensors, optimizer.bin, random_states_*.pkl  (accelerator.save_state; FSDP2: folders)
                    train_state.pt  the loop's state and the objects beside it (EMA, guard, ...) as whole tensors
                    meta.json       written last: the step, the processes, the run's settings, the position in the
                                    epoch in samples, and the size and SHA-256 of every other file
    LATEST, BEST    the newest checkpoint, and the one saved with best=True (kept when pruning)

A checkpoint is written to a hidden folder and renamed into place, so a kill during a save never leaves
a broken one. Every process calls save_checkpoint and load_checkpoint (save_state and the EMA gather);
the main process writes the files of its own. Before a resume loads anything, its files are checked
against their checksums (`--resume_from latest` skips a damaged newest checkpoint for the newest intact
one) and `check_fits` refuses one that this run cannot continue: of another kind of launch, another
global batch (the unit of the steps and the LR schedule), or other `same_on_resume` settings. On another
number of processes the model and optimizer load through Accelerate (DDP's files are whole, FSDP2's
resharded), and the epoch goes on from the sample it stopped at, so each remaining sample is seen once.
"""

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from common.errors import UserError, first_line, warn
from common.run_log import file_sha256, follow_umask, swap_folder, write_atomic, writing

LATEST = "LATEST"
BEST = "BEST"
META = "meta.json"
LOOP = "train_state.pt"


@dataclasses.dataclass
class LoopState:
    """What common/ reads and restores of a training loop's state; each script's TrainState extends it."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batches_done: int = 0  # micro-batches consumed in the current epoch, on each process
    train_samples: int = 0  # over finished epochs, all processes: the throughput in results.json
    train_seconds: float = 0.0


def _meta(folder: Path) -> dict | None:
    """meta.json, or None if it is missing or garbled."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and isinstance(meta.get("step"), int) and isinstance(meta.get("num_processes"), int)
    return meta if ok else None


def _checkpoints(run_dir: Path, complete: bool = False) -> list[Path]:
    """A run's checkpoint folders (with a meta.json; `complete`: a readable one), newest first: by meta.json's
    step, else by the step in the folder's name."""
    def step(folder):
        meta = _meta(folder)
        digits = folder.name.removeprefix("step_")
        return meta["step"] if meta else int(digits) if digits.isdigit() else -1

    root = Path(run_dir) / "checkpoints"
    folders = [f for f in root.iterdir() if f.is_dir() and not f.name.startswith(".")] if root.is_dir() else []
    folders = [f for f in folders if (_meta(f) if complete else (f / META).exists())]
    return sorted(folders, key=lambda f: (step(f), f.name), reverse=True)


def problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint (garbled meta.json, a file missing, cut short or altered), or None."""
    meta = _meta(folder)
    if meta is None:
        return f"its {META} is missing or garbled"
    for name, record in meta.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"its file {name} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"its file {name} has {path.stat().st_size:,} bytes, {record['bytes']:,} were written"
        if file_sha256(path) != record["sha256"]:
            return f"its file {name} does not match the checksum it was written with"
    return None


def newest_intact(run_dir: Path) -> Path | None:
    return next((folder for folder in _checkpoints(run_dir) if problem(folder) is None), None)


def _sharded(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def save_checkpoint(accelerator, run_dir: Path, state: LoopState, objects: dict, cfg, best: bool = False) -> Path:
    """Save the prepared model, optimizer and RNG (save_state), the loop's `state` and `objects` ({name: an
    object with state_dict()}); keep the newest --keep_checkpoints and the best (`best`: by the loop's own
    validation metric), so a run can always go back to its best point."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{state.step:08d}"
    tmp = root / f".tmp_{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        last = _checkpoints(run_dir, complete=True)[:1]
        size = sum(p.stat().st_size for folder in last for p in folder.rglob("*") if p.is_file())
        if (free := shutil.disk_usage(root).free) < size:
            warn(f"{root} has {free / 2**20:,.1f} MB free and the last checkpoint took {size / 2**20:,.1f} MB: the "
                 f"next may not fit; make room before it fails")
    accelerator.wait_for_everyone()
    with writing(tmp, tmp=tmp):  # a failed write (a full disk) removes the half-written folder, then exits 74
        accelerator.save_state(str(tmp))
        saved = {"train_state": vars(state)} | {name: obj.state_dict() for name, obj in objects.items()}
        if accelerator.is_main_process:  # state_dict() on every process: the EMA gathers its shards
            torch.save(saved, tmp / LOOP)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            meta = {"step": state.step, "num_processes": accelerator.num_processes, "sharded": _sharded(accelerator),
                    "config": dataclasses.asdict(cfg), "files": files,
                    "samples_into_epoch": state.batches_done * cfg.batch_size * accelerator.num_processes}
            (tmp / META).write_text(json.dumps(meta, indent=1))
            swap_folder(tmp, final)
    if accelerator.is_main_process:
        write_atomic(root / LATEST, final.name)
        if best:
            write_atomic(root / BEST, final.name)
        kept = {final.name, (root / BEST).read_text().strip() if (root / BEST).is_file() else None}
        for folder in _checkpoints(run_dir, complete=True)[cfg.keep_checkpoints:]:
            if folder.name not in kept:
                shutil.rmtree(folder, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(run_dir: Path, resume_from: str | None) -> Path | None:
    """`--resume_from` (None, 'latest' or a path) as an intact checkpoint folder; None: start afresh."""
    if not resume_from:
        return None
    root = Path(run_dir) / "checkpoints"
    candidates = _checkpoints(run_dir)
    if resume_from == "latest":
        for folder in candidates:
            if (why := problem(folder)) is None:
                return folder
            warn(f"checkpoint {folder} is damaged ({why}); trying the one before it")
        if candidates:
            raise UserError(f"every checkpoint in {root} is damaged; start a new run in another --output_dir")
        return None  # nothing saved yet: start from scratch
    path = Path(resume_from)
    if not (path / META).is_file():
        raise UserError(f"--resume_from {path} is not a complete checkpoint folder (no {META}); pass 'latest' or a "
                        f"folder under {root}")
    if (why := problem(path)) is not None:
        intact = next((f for f in candidates if f.resolve() != path.resolve() and problem(f) is None), None)
        fix = f"pass --resume_from {intact} (the newest intact checkpoint)" if intact else "start a new run"
        raise UserError(f"checkpoint {path} is damaged: {why}; {fix}")
    return path


def check_fits(accelerator, path: Path, cfg) -> None:
    """Refuse, reading only meta.json, a checkpoint this run cannot continue: from an older version of this code,
    of another kind of launch, with another global batch or with other `same_on_resume` settings."""
    meta = _meta(path)
    if LOOP not in meta.get("files", {}) or "sharded" not in meta:
        raise UserError(f"checkpoint {path} was written by an older version of this script, which kept the loop "
                        f"state per process; finish that run with that version, or start a new run")
    if meta["sharded"] != _sharded(accelerator):
        kinds = ("an FSDP launch", "a launch without FSDP (one process or DDP)")
        raise UserError(f"checkpoint {path} was written by {kinds[not meta['sharded']]}, this is "
                        f"{kinds[not _sharded(accelerator)]}; resume it with {kinds[not meta['sharded']]} (any "
                        f"number of processes)")
    was = meta["config"]
    old = was["batch_size"] * meta["num_processes"] * was["grad_accum_steps"]
    processes = accelerator.num_processes
    if old != (new := cfg.batch_size * processes * cfg.grad_accum_steps):
        if old % processes:
            fix = f"resume on a number of processes that divides {old:,}"
        elif old // processes % cfg.batch_size == 0:
            fix = f"e.g. --grad_accum_steps {old // processes // cfg.batch_size} with --batch_size {cfg.batch_size}"
        else:
            fix = f"e.g. --batch_size {old // processes} --grad_accum_steps 1"
        raise UserError(f"checkpoint {path} was trained with a global batch of {old:,} (--batch_size "
                        f"{was['batch_size']} x {meta['num_processes']} processes x --grad_accum_steps "
                        f"{was['grad_accum_steps']}), this run's would be {new:,}; its steps and LR schedule count "
                        f"that batch: keep it, {fix}")
    for f in dataclasses.fields(cfg):
        if f.metadata.get("same_on_resume") and f.name in was and was[f.name] != getattr(cfg, f.name):
            raise UserError(f"checkpoint {path} was trained with --{f.name} {was[f.name]!r}, this run asks for "
                            f"{getattr(cfg, f.name)!r}; resume with --{f.name} {was[f.name]!r}, or start a new run in "
                            f"another --output_dir")


def load_checkpoint(accelerator, path: Path, state: LoopState, objects: dict, cfg) -> None:
    """Restore what save_checkpoint wrote (`resolve_resume` and `check_fits` have passed it) and say so; on another
    number of processes, or the global batch split otherwise, one more line says how it goes on."""
    meta = _meta(path)
    try:  # the loop's objects first: a guard that fell back turns mixed precision off, and with it the GradScaler
        saved = torch.load(path / LOOP, map_location="cpu", weights_only=True)  # whose state the checkpoint lacks
        for key, value in saved["train_state"].items():
            setattr(state, key, value)
        for name, obj in objects.items():
            obj.load_state_dict(saved[name])
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(f"checkpoint {path} does not fit this run ({type(err).__name__}: {first_line(err)}); resume "
                        f"with the settings it was written with, or start a new run in another --output_dir") from None
    accelerator.print(f"resumed from {path} at step {meta['step']}")
    processes = accelerator.num_processes
    state.batches_done = meta["samples_into_epoch"] // (cfg.batch_size * processes)  # this run's micro-batches
    accelerator.step = state.batches_done  # accumulate()'s count: a process new to the run has none saved
    was = meta["config"]
    if (processes, cfg.batch_size, cfg.grad_accum_steps) != (meta["num_processes"], was["batch_size"],
                                                            was["grad_accum_steps"]):
        accelerator.print(f"elastic resume: written by {meta['num_processes']} process(es), continued on {processes}; "
                          f"the global batch stays {cfg.batch_size * processes * cfg.grad_accum_steps:,} (--batch_size "
                          f"{cfg.batch_size} x {processes} x --grad_accum_steps {cfg.grad_accum_steps}); the epoch "
                          f"goes on from sample {meta['samples_into_epoch']:,}, each sample once; not bit-identical "
                          f"to an uninterrupted run (sums in another order)")


def save_model_atomically(accelerator, model, run_dir: Path) -> None:
    """run_dir/model.safetensors through a temporary folder and a rename: a kill leaves no half-written file."""
    tmp = run_dir / ".model.tmp"
    with writing(tmp / "model.safetensors", tmp=tmp):
        accelerator.save_model(model, tmp)  # gathers the weights on every process (FSDP); the main process writes
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            follow_umask(tmp / "model.safetensors")  # safetensors writes 0600: readable by its owner only
            (tmp / "model.safetensors").replace(run_dir / "model.safetensors")
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
