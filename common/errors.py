"""User-facing errors: bad input gets one clear line and a non-zero exit, never a traceback."""

import sys
from collections.abc import Callable

# Exit codes the scripts document. 2 follows argparse's convention for bad input.
EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Something the user can fix (a path, a file's contents, a config key). The message says how."""


def exit_on_user_error(main: Callable[[], object]) -> None:
    """Run `main`, turning a UserError into `error: <message>` on stderr and exit code 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
