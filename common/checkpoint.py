"""Atomic checkpoints and resume.

Layout under `output_dir/checkpoints/`:

    step_00000120/            one complete checkpoint
        model.safetensors, optimizer.bin, random_states_*.pkl   (accelerator.save_state)
        train_state_rank0.pt  (this rank's loop state: step, EMA, guard, ... ; loaded with weights_only=True)
        meta.json             (written last: a folder without it is incomplete and ignored)
    LATEST                    the name of the newest complete checkpoint
    BEST                      the name of the checkpoint saved with `best=True` (kept when pruning)

A checkpoint is written to a hidden temporary folder and renamed into place, so a kill during a
save never leaves a broken "latest". Every process calls `save_checkpoint` and `load_checkpoint`
(save_state gathers across ranks and each rank stores its own RNG and shard state); only the main
process renames, writes LATEST and prunes.
"""

import json
import os
import shutil
from pathlib import Path

import torch

from common.errors import UserError

LATEST = "LATEST"
BEST = "BEST"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first, read from meta.json, not folder names."""
    found = []
    for folder in root.iterdir() if root.is_dir() else []:
        meta = folder / "meta.json"
        if folder.is_dir() and not folder.name.startswith(".") and meta.is_file():
            try:
                found.append((json.loads(meta.read_text())["step"], folder))
            except (ValueError, KeyError):
                continue
    return sorted(found)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, keep_last: int = 2,
                    best: bool = False) -> Path:
    """Save model, optimizer, RNG (via save_state) and `state` ({name: object with state_dict()}).

    Keeps the newest `keep_last` checkpoints plus the one marked `best` (by the loop's own
    validation metric), so that a run can always be restarted from its best point.
    """
    root = Path(output_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save({name: obj.state_dict() for name, obj in state.items()},
               tmp / f"train_state_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {"step": step, "num_processes": accelerator.num_processes}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
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


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, from LATEST if it points at one, else the highest step on disk."""
    root = Path(output_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "meta.json").is_file():
            return candidate
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


def resolve_resume(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """Turn `--resume_from` (None, 'latest' or a path) into a checkpoint folder, or None to start fresh."""
    if not resume_from:
        return None
    if resume_from == "latest":
        return find_latest_checkpoint(output_dir)  # None: nothing saved yet, so start from scratch
    path = Path(resume_from)
    if not (path / "meta.json").is_file():
        raise UserError(f"--resume_from {path} is not a complete checkpoint folder (no meta.json); "
                        f"pass 'latest' or a folder under {Path(output_dir) / 'checkpoints'}")
    return path


def load_checkpoint(accelerator, path: Path, state: dict) -> dict:
    """Restore what save_checkpoint wrote into the prepared objects and `state`; returns meta.json."""
    meta = json.loads((path / "meta.json").read_text())
    own = path / f"train_state_rank{accelerator.process_index}.pt"
    if meta["num_processes"] != accelerator.num_processes or not own.is_file():
        raise UserError(f"checkpoint {path} was written by {meta['num_processes']} processes; "
                        f"resume it with the same number of processes (now {accelerator.num_processes})")
    accelerator.load_state(str(path))
    saved = torch.load(own, map_location="cpu", weights_only=True)
    for name, obj in state.items():
        obj.load_state_dict(saved[name])
    return meta
