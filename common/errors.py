"""User-facing errors, for every script: bad input gets one clear line and a non-zero exit, never a traceback.

Exit codes: 0 done; 2 bad input (UserError); 3 training diverged (NonFiniteTrainingError: the
checkpoints written before stay as they were); 75 stopped by SIGTERM/SIGINT after saving a
checkpoint (common/preemption.py); anything else is a bug, with its traceback.
"""

import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2  # argparse's convention
EXIT_DIVERGED = 3


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
    """Run `main`; a UserError or NonFiniteTrainingError becomes one `error: <message>` line and its exit code."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except NonFiniteTrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
