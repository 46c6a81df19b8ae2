"""What a user sees when something goes wrong, for every script: one `error: <problem>; <fix>` line and an
exit code, never a traceback.

Exit codes: 0 done; 2 bad input (UserError); 3 training diverged (NonFiniteTrainingError: the checkpoints
written before stay as they were); 74 a write failed (no space, a quota, an I/O error, a read-only
filesystem); 75 stopped by SIGTERM/SIGINT after saving a checkpoint (common/preemption.py); anything
else is a bug, with its traceback.
"""

import errno
import sys

EXIT_BAD_INPUT = 2  # argparse's convention
EXIT_DIVERGED = 3
EXIT_IO_ERROR = 74  # EX_IOERR, from sysexits.h
# A failed write: the disk or quota is full, the device failed, the filesystem is read-only, the file is too
# large, or the permission was taken away mid-run (a permission problem found up front is a UserError).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


class UserError(Exception):
    """Something the user can fix (a path, a file's contents, a config key). The message says how."""


class NonFiniteTrainingError(RuntimeError):
    """Updates stay non-finite in fp32 after the fallback: the run cannot make progress."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (short enough for an `error:` line)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def warn(message: str, every_process: bool = False) -> None:
    """A legal but surprising setting, or a skipped input: one `warning:` line on stderr (main process only,
    unless what is warned about was seen by this process alone)."""
    from accelerate import PartialState

    if every_process or PartialState().is_main_process:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def exit_on_user_error(main) -> None:
    """Run `main`; a UserError, a NonFiniteTrainingError or a failed write becomes one `error:` line and its
    exit code. A failed write names the file and what the system said; a training run's folder
    (common/launch.py's RunFolder) adds the newest intact checkpoint and the command that continues."""
    try:
        main()
    except (UserError, NonFiniteTrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT if isinstance(err, UserError) else EXIT_DIVERGED)
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        fix = getattr(err, "fix", "make room (or fix the permissions), then run it again")
        print(f"error: cannot write {err.filename or 'an output'} ({err.strerror}); {fix}", file=sys.stderr)
        sys.exit(EXIT_IO_ERROR)
