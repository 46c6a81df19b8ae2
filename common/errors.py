"""User-facing errors, for every script: bad input gets one clear line and a non-zero exit, never a traceback.

Exit codes: 0 done; 2 bad input (UserError); 3 training diverged (NonFiniteTrainingError: the
checkpoints written before stay as they were); 74 a write failed (no space, a quota, an I/O error, a read-only
filesystem: the newest intact checkpoint continues the run); 75 stopped by SIGTERM/SIGINT after saving a
checkpoint (common/preemption.py); anything else is a bug, with its traceback.
"""

import errno
import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2  # argparse's convention
EXIT_DIVERGED = 3
EXIT_IO_ERROR = 74  # EX_IOERR, from sysexits.h
# What a failed write reports: the disk or the quota is full, the device failed, the filesystem is read-only, the file
# is too large, or the permission to write was taken away mid-run (a permission problem found up front is a UserError).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (short enough for an `error:` line)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def warn(message: str, every_process: bool = False) -> None:
    """A legal but surprising setting, or a skipped input: one `warning:` line on stderr (main process only,
    unless what is warned about was seen by this process alone)."""
    from accelerate import PartialState

    if every_process or PartialState().is_main_process:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class UserError(Exception):
    """Something the user can fix (a path, a file's contents, a config key). The message says how."""


class NonFiniteTrainingError(RuntimeError):
    """Updates stay non-finite in fp32 after the fallback: the run cannot make progress."""


def exit_on_user_error(main: Callable[[], object]) -> None:
    """Run `main`; a UserError or NonFiniteTrainingError becomes one `error: <message>` line and its exit code, and so
    does a failed write (exit 74): the file, what the system said, and what to do (for a training run, the newest
    intact checkpoint and the command that continues from it: common/launch.py's `after_failed_write`)."""
    from common.launch import after_failed_write, release_run_dirs  # here: launch.py imports this module

    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except NonFiniteTrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        fix = after_failed_write(err) or "make room (or fix the permissions), then run it again"
        print(f"error: cannot write {err.filename or 'an output'} ({err.strerror}); {fix}", file=sys.stderr)
        sys.exit(EXIT_IO_ERROR)
    finally:
        release_run_dirs()  # the run folder's lock and note (the OS would let go of the lock anyway)
