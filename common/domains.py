"""The values a Config setting may take (both training scripts and both predict scripts declare them beside each
field; common/config.py checks them): numeric ranges, non-empty strings, module names, Accelerate trackers."""

import dataclasses
import math
import re
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Domain:
    """The values a setting may take: `describe` reads "must be <describe>" in errors and --help.

    Numeric domains also keep their bounds (`low`, `high`; an open end excluded), so that tests can
    draw values inside and outside them.
    """

    describe: str
    accepts: Callable[[object], bool]
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def between(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Domain:
    """Finite numbers from `low` to `high`, both included unless `low_open`/`high_open`."""

    def accepts(v):
        return _number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    if high == math.inf:
        describe = f"{'>' if low_open else '>='} {_show(low)}"
    else:
        describe = f"in {'(' if low_open else '['}{_show(low)}, {_show(high)}{')' if high_open else ']'}"
    return Domain(describe, accepts, low, high, low_open, high_open)


def at_least(low: float) -> Domain:
    return between(low)


def above(low: float) -> Domain:
    return between(low, low_open=True)


FRACTION = between(0, 1)  # [0, 1]
BELOW_ONE = between(0, 1, high_open=True)  # [0, 1): a decay, a dropout
ABOVE_ZERO = between(0, 1, low_open=True)  # (0, 1]: a learning rate, a factor that must not be zero
NON_EMPTY = Domain("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
IDENTIFIER = Domain("a module name (letters, digits and _)",
                    lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v) is not None)


def _tracker_names() -> list[str]:
    from accelerate.tracking import get_available_trackers

    return sorted(str(t) for t in get_available_trackers())


TRACKER = Domain(f"none, all or an installed Accelerate tracker "
                 f"(here: {', '.join(_tracker_names()) or 'none installed'})",
                 lambda v: v in ("none", "all") or v in _tracker_names())
