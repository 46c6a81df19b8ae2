"""The file a predict script writes (predict_dual_task.py, predict_llava.py): may it be written? Only reads."""

from pathlib import Path

from common.errors import UserError
from common.launch import check_writable


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
