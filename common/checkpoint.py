"""Atomic, verified checkpoints and resume, on the same or another number of processes (both training scripts;
predict_dual_task.py's model file).

Layout under `output_dir/checkpoints/`:

    step_00000120/            one complete checkpoint
        model.safetensors, optimizer.bin, random_states_*.pkl   (accelerator.save_state; FSDP2: sharded folders)
        train_state.pt        (the loop's state: step, EMA, guard, best weights ... as whole tensors; loaded with
                               weights_only=True)
        meta.json             (written last: the step, the number of processes, the run's settings, how far into
                               its epoch the loop was, and the size and SHA-256 of every other file; a folder without
                               it is ignored)
    LATEST                    the name of the newest complete checkpoint
    BEST                      the name of the checkpoint saved with `best=True` (kept when pruning)

A checkpoint is written to a hidden temporary folder and renamed into place, so a kill during a
save never leaves a broken "latest". Every process calls `save_checkpoint` and `load_checkpoint`
(save_state gathers across ranks, each rank stores its own RNG and shard state, and the EMA gathers its
shards); only the main process writes train_state.pt, renames, writes LATEST and prunes. With several
machines, `output_dir` must be on a filesystem that every machine sees.

Resuming checks before it loads anything: every file against its recorded size and checksum (a
disk that filled up, a copy cut short), and the settings that must not change within a run
(`metadata={"same_on_resume": True}` on a Config field: the model's shape, the data split) against
the ones the checkpoint was written with. `--resume_from latest` skips a damaged newest checkpoint
for the newest intact one and says so (a warning line); a damaged checkpoint named by path is refused
with the name of the newest intact one.

Elastic resume: a checkpoint continues on another number of processes (or batch size) of the same kind of
launch (sharded or not): the model and optimizer through Accelerate (DDP's files are whole; FSDP2's are
resharded by torch.distributed.checkpoint), the loop state from its whole tensors. The position in the epoch is
kept in samples (the loop's state "train_state" counts its micro-batches in `batches_done`), so that the rest of
the epoch's shuffled samples are each seen once. The global batch must stay the same (split into other
--batch_size x processes x --grad_accum_steps): the run's steps and LR schedule count it.
"""

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate.utils import DistributedType

from common.errors import UserError, first_line, warn
from common.run_log import follow_umask, replace_folder, writing

LATEST = "LATEST"
BEST = "BEST"
META = "meta.json"
TRAIN_STATE = "train_state.pt"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_meta(folder: Path) -> dict | None:
    """meta.json as a dict with an integer step, or None if it is missing or garbled."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and isinstance(meta.get("step"), int) and isinstance(meta.get("num_processes"), int)
    return meta if ok else None


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first, read from meta.json, not folder names."""
    found = []
    for folder in root.iterdir() if root.is_dir() else []:
        if folder.is_dir() and not folder.name.startswith(".") and (meta := _read_meta(folder)) is not None:
            found.append((meta["step"], folder))
    return sorted(found)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_records(folder: Path) -> dict:
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != META}


def _state_of(obj) -> dict:  # a dataclass's fields as they are (not deep-copied: they are saved at once)
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) \
        else obj.state_dict()


def _load_state_into(obj, state: dict) -> None:
    if dataclasses.is_dataclass(obj):
        for key, value in state.items():
            setattr(obj, key, value)
    else:
        obj.load_state_dict(state)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, keep_last: int = 2,
                    best: bool = False, config=None) -> Path:
    """Save model, optimizer, RNG (via save_state) and `state` ({name: a dataclass, or an object with state_dict()}).

    Keeps the newest `keep_last` checkpoints plus the one marked `best` (by the loop's own
    validation metric), so that a run can always be restarted from its best point. `config` (the
    run's Config) is recorded so that a resume with settings that do not fit is refused.
    """
    root = Path(output_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        warn_if_it_may_not_fit(root)
    accelerator.wait_for_everyone()
    with writing(tmp, tmp=tmp):  # a failed write (a full disk) removes the half-written folder, then exits 74
        accelerator.save_state(str(tmp))
        loop_state = {name: _state_of(obj) for name, obj in state.items()}  # on every process: the EMA gathers
        if accelerator.is_main_process:
            torch.save(loop_state, tmp / TRAIN_STATE)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            meta = {"step": step, "num_processes": accelerator.num_processes, "sharded": _sharded(accelerator)}
            if config is not None:
                meta["config"] = dataclasses.asdict(config)
                batches_done = getattr(state.get("train_state"), "batches_done", 0)
                meta["samples_into_epoch"] = batches_done * config.batch_size * accelerator.num_processes
            meta["files"] = _file_records(tmp)
            (tmp / META).write_text(json.dumps(meta, indent=1))
            replace_folder(tmp, final)
    if accelerator.is_main_process:
        _write_text_atomic(root / LATEST, final.name)
        if best:
            _write_text_atomic(root / BEST, final.name)
        protected = {final.resolve()}
        if (root / BEST).is_file():
            protected.add((root / (root / BEST).read_text().strip()).resolve())
        complete = _complete_checkpoints(root)
        for _, folder in complete[: max(0, len(complete) - keep_last)]:
            if folder.resolve() not in protected:
                shutil.rmtree(folder, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def warn_if_it_may_not_fit(root: Path) -> None:
    """Warn before a checkpoint is written when the filesystem has less room than the last one took."""
    newest = _complete_checkpoints(root)[-1:]
    if newest:
        size = sum(p.stat().st_size for p in newest[0][1].rglob("*") if p.is_file())
        free = shutil.disk_usage(root).free
        if free < size:
            warn(f"{root} has {free / 2**20:,.1f} MB free and the last checkpoint took {size / 2**20:,.1f} MB: the "
                 f"next may not fit; make room before it fails")


def newest_intact_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint under output_dir/checkpoints whose files all match their checksums, or None."""
    complete = _complete_checkpoints(Path(output_dir) / "checkpoints")
    return next((folder for _, folder in reversed(complete) if checkpoint_problem(folder) is None), None)


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, from LATEST if it points at one, else the highest step on disk."""
    root = Path(output_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(errors="replace").strip()
        if candidate.name and _read_meta(candidate) is not None:
            return candidate
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (garbled meta.json, a file missing, cut short or altered), or None."""
    meta = _read_meta(folder)
    if meta is None:
        return f"its {META} is missing or garbled"
    for name, record in meta.get("files", {}).items():  # checkpoints from before checksums: nothing to compare
        path = folder / name
        if not path.is_file():
            return f"its file {name} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"its file {name} has {path.stat().st_size:,} bytes, {record['bytes']:,} were written"
        if _sha256(path) != record["sha256"]:
            return f"its file {name} does not match the checksum it was written with"
    return None


def resolve_resume(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """Turn `--resume_from` (None, 'latest' or a path) into an intact checkpoint folder, or None to start fresh."""
    if not resume_from:
        return None
    root = Path(output_dir) / "checkpoints"
    def step_of(folder: Path) -> int:  # from meta.json; for a garbled one, from the folder's name
        meta, digits = _read_meta(folder), folder.name.removeprefix("step_")
        return meta["step"] if meta else int(digits) if digits.isdigit() else -1

    candidates = sorted((folder for folder in (root.iterdir() if root.is_dir() else [])
                         if folder.is_dir() and not folder.name.startswith(".") and (folder / META).exists()),
                        key=lambda f: (step_of(f), f.name), reverse=True)  # newest first
    if resume_from == "latest":
        for folder in candidates:
            if (problem := checkpoint_problem(folder)) is None:
                return folder
            warn(f"checkpoint {folder} is damaged ({problem}); trying the one before it")
        if candidates:
            raise UserError(f"every checkpoint in {root} is damaged; start a new run in another --output_dir")
        return None  # nothing saved yet: start from scratch
    path = Path(resume_from)
    if not (path / META).is_file():
        raise UserError(f"--resume_from {path} is not a complete checkpoint folder (no {META}); "
                        f"pass 'latest' or a folder under {root}")
    if (problem := checkpoint_problem(path)) is not None:
        intact = next((f for f in candidates if f.resolve() != path.resolve() and checkpoint_problem(f) is None), None)
        fix = f"pass --resume_from {intact} (the newest intact checkpoint)" if intact else "start a new run"
        raise UserError(f"checkpoint {path} is damaged: {problem}; {fix}")
    return path


def _sharded(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def _global_batch(config, num_processes: int) -> int:
    return config.batch_size * num_processes * config.grad_accum_steps


def _check_global_batch(path: Path, was, was_processes: int, config, processes: int) -> None:
    """The global batch (--batch_size x processes x --grad_accum_steps) is the unit of the run's steps, its LR
    schedule and its position in the epoch: a resume may split it otherwise, on any number of processes, not change
    it. The error line names flags that keep it on this number of processes, if there are any."""
    old, new = _global_batch(was, was_processes), _global_batch(config, processes)
    if old == new:
        return
    if old % processes:
        fix = f"resume on a number of processes that divides {old:,}"
    elif old // processes % config.batch_size == 0:
        fix = f"e.g. --grad_accum_steps {old // processes // config.batch_size} with --batch_size {config.batch_size}"
    else:
        fix = f"e.g. --batch_size {old // processes} --grad_accum_steps 1"
    raise UserError(f"checkpoint {path} was trained with a global batch of {old:,} (--batch_size {was.batch_size} x "
                    f"{was_processes} processes x --grad_accum_steps {was.grad_accum_steps}), this run's would be "
                    f"{new:,}; its steps and LR schedule count that batch: keep it, {fix}")


def check_checkpoint_fits(accelerator, path: Path, config=None) -> dict:
    """Refuse, reading only meta.json, a checkpoint this run cannot continue: from an older version of this code, of
    another kind of launch (sharded or not), with another global batch, or with other values of `config`'s
    `same_on_resume` settings; returns meta.json."""
    meta = _read_meta(path)
    if meta is None:
        raise UserError(f"checkpoint {path} is damaged: its {META} is missing or garbled; resume from another "
                        f"checkpoint")
    if TRAIN_STATE not in meta.get("files", {}) or "sharded" not in meta:
        raise UserError(f"checkpoint {path} was written by an older version of this script, which kept the loop "
                        f"state per process; finish that run with that version, or start a new run")
    if meta["sharded"] != _sharded(accelerator):
        kinds = ("an FSDP launch", "a launch without FSDP (one process or DDP)")
        was, now = kinds[not meta["sharded"]], kinds[not _sharded(accelerator)]
        raise UserError(f"checkpoint {path} was written by {was}, this is {now}; resume it with {was} (any number of "
                        f"processes)")
    if config is not None and "config" in meta:
        _check_global_batch(path, SimpleNamespace(**meta["config"]), meta["num_processes"], config,
                            accelerator.num_processes)
        for f in dataclasses.fields(config):
            saved, asked = meta["config"].get(f.name), getattr(config, f.name)
            if f.metadata.get("same_on_resume") and f.name in meta["config"] and saved != asked:
                raise UserError(f"checkpoint {path} was trained with --{f.name} {saved!r}, this run asks for "
                                f"{asked!r}; resume with --{f.name} {saved!r}, or start a new run in another "
                                f"--output_dir")
    return meta


def load_checkpoint(accelerator, path: Path, state: dict, config=None) -> dict:
    """Restore what save_checkpoint wrote into the prepared objects and `state`, and say so; returns meta.json.

    Refuses, before loading anything, a checkpoint that `check_checkpoint_fits` refuses (`resolve_resume` has
    checked its files). Written by another number of processes (or the same global batch split otherwise), it
    continues where it stopped in the epoch, and one line says how the run continues.
    """
    meta = check_checkpoint_fits(accelerator, path, config)
    try:
        accelerator.load_state(str(path))
        saved = torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
        for name, obj in state.items():
            _load_state_into(obj, saved[name])
    except UserError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(f"checkpoint {path} does not fit this run ({type(err).__name__}: {first_line(err)}); resume "
                        f"with the settings it was written with, or start a new run in another --output_dir") from None
    accelerator.print(f"resumed from {path} at step {meta['step']}")
    if config is not None and "train_state" in state:
        loop, samples = state["train_state"], meta.get("samples_into_epoch", 0)
        loop.batches_done = samples // (config.batch_size * accelerator.num_processes)  # this run's, per process
        accelerator.step = loop.batches_done  # accumulate()'s count; a process new to the run has none saved
        split = (accelerator.num_processes, config.batch_size, config.grad_accum_steps)
        if split != (meta["num_processes"], meta["config"]["batch_size"], meta["config"]["grad_accum_steps"]):
            accelerator.print(
                f"elastic resume: written by {meta['num_processes']} process(es), continued on {split[0]}; the global "
                f"batch stays {_global_batch(config, split[0]):,} (--batch_size {split[1]} x {split[0]} x "
                f"--grad_accum_steps {split[2]}); the epoch goes on from sample {samples:,}, each sample once; not "
                f"bit-identical to an uninterrupted run (sums in another order)")
    return meta


def save_model_atomically(accelerator, model, output_dir: Path) -> None:
    """model.safetensors via a temporary folder and a rename: a kill while saving leaves no half-written file."""
    tmp = output_dir / ".model.tmp"
    with writing(tmp / "model.safetensors", tmp=tmp):
        accelerator.save_model(model, tmp)  # gathers the weights on every process (FSDP); the main process writes
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            follow_umask(tmp / "model.safetensors")  # safetensors writes 0600: readable by its owner only
            os.replace(tmp / "model.safetensors", output_dir / "model.safetensors")
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
