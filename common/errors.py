"""User-facing errors: bad input gets one clear line and a non-zero exit, never a traceback.

Exit codes: 0 done; 2 bad input (UserError); 3 training diverged (NonFiniteTrainingError: the
checkpoints written before stay as they were); 75 stopped by SIGTERM/SIGINT after saving a
checkpoint (common/preemption.py); anything else is a bug, with its traceback.
"""

import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2  # argparse's convention
EXIT_DIVERGED = 3


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
