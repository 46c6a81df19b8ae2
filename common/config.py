"""Config dataclasses as command lines, for every script: each field a `--flag` and a YAML key.

Precedence: the dataclass defaults < `--config file.yaml` < `--name value`. A field is declared with
`setting(default, help, domain or choices)`; `check_domains` (called by each Config's `__post_init__`)
refuses a value outside its domain (for a list, each item) when the config is built, before a run writes
anything. Unknown keys, values of the wrong type and bad YAML are refused too: one line naming the key
and the fix. `RunConfig` holds what common/ reads of a training script's Config; both Configs extend it.
"""

import argparse
import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

import yaml
from accelerate.tracking import get_available_trackers

from common.errors import UserError, first_line

FIX = "fix it on the command line or in the --config YAML"


@dataclasses.dataclass(frozen=True)
class Domain:
    """The values a setting may take: `describe` ends "it must be ...". A numeric domain keeps its bounds (an
    open end excluded), so that tests can draw values inside and outside it."""

    describe: str
    accepts: Callable[[object], bool]
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False


def between(low: float, high: float = math.inf, *, low_open=False, high_open=False) -> Domain:
    """Finite numbers from `low` to `high`, both included unless `low_open`/`high_open`."""
    def accepts(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    def show(x):
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    describe = f"{'>' if low_open else '>='} {show(low)}"
    if high != math.inf:
        describe = f"in {'(' if low_open else '['}{show(low)}, {show(high)}{')' if high_open else ']'}"
    return Domain(describe, accepts, low, high, low_open, high_open)


FRACTION = between(0, 1)
BELOW_ONE = between(0, 1, high_open=True)  # a decay, a dropout
ABOVE_ZERO = between(0, 1, low_open=True)  # a learning rate, a factor that must not be zero
NON_EMPTY = Domain("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
IDENTIFIER = Domain("a module name (letters, digits and _)",
                    lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v) is not None)
TRACKERS = ["none", "all", *sorted(str(t) for t in get_available_trackers())]  # Accelerate's, installed here
PRECISIONS = ["no", "bf16", "fp16"]
KEEP = {"same_on_resume": True}  # a resumed run must keep this setting (the data, the model's shape)


def setting(default, help: str, domain: Domain | None = None, choices: list | None = None, same_on_resume=False):
    """A Config field: its default, one line of help, the values it may take, whether a resume must keep it."""
    metadata = {"help": help, "domain": domain, "choices": choices, "same_on_resume": same_on_resume}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_domains(config) -> None:
    """Refuse the first field whose value (each item, for a list) is outside its choices or domain."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        choices = f.metadata.get("choices")
        domain = f.metadata.get("domain")
        for item in [i for i in (value if isinstance(value, list) else [value]) if i is not None]:
            if choices and item not in choices:
                close = difflib.get_close_matches(str(item), map(str, choices), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"--{f.name} {item!r} is not one of {', '.join(map(str, choices))}{hint}; {FIX}")
            if domain and not domain.accepts(item):
                finite = "a finite number " if isinstance(item, float) and not math.isfinite(item) else ""
                raise UserError(f"--{f.name} {item!r} is not allowed: it must be {finite}{domain.describe}; {FIX}")


@dataclasses.dataclass
class RunConfig:
    """What common/ reads of a training script's Config (run setup, checkpoints, the guard): both Configs extend
    it, redeclaring a field where their default differs, and call `super().__post_init__()`."""

    output_dir: str = setting("runs/run", "where checkpoints, metrics and results go", NON_EMPTY)
    overwrite: bool = setting(False, "replace the run in output_dir (once the new run passed its checks)")
    resume_from: str | None = setting(None, "'latest' or a checkpoint folder", NON_EMPTY)
    seed: int = setting(42, "seed of the initialisation and the batch order", between(0, 2**32 - 1))
    max_steps: int = setting(0, "stop after this many optimizer steps (0: no limit)", between(0))
    batch_size: int = setting(1, "samples per micro-batch per process", between(1))
    grad_accum_steps: int = setting(1, "micro-batches per optimizer step", between(1))
    max_grad_norm: float = setting(1.0, "gradient clipping norm", between(0, low_open=True))
    mixed_precision: str | None = setting(None, "None: what accelerate launch set", choices=PRECISIONS)
    nan_lr_backoff: float = setting(0.5, "first NaN/Inf update: fp32 from then on, LR times this", ABOVE_ZERO)
    max_nonfinite_in_a_row: int = setting(5, "stop after this many non-finite updates in fp32", between(1))
    log_every: int = setting(10, "log (and check for NaN) every this many optimizer steps", between(1))
    checkpoint_every: int = setting(0, "also checkpoint every this many steps (0: epoch ends)", between(0))
    keep_checkpoints: int = setting(2, "how many recent checkpoints to keep", between(1))
    report_to: str = setting("none", "Accelerate tracker: none, all, tensorboard, ...", choices=TRACKERS)
    num_threads: int = setting(0, "PyTorch CPU threads per process (0: its default)", between(0, 1024))

    def __post_init__(self):
        check_domains(self)

    @classmethod
    def parse(cls, argv: list[str] | None = None):
        """The command line (and its --config YAML) as this Config; --help starts with the script's docstring."""
        return parse_config(cls, argv, sys.modules[cls.__module__].__doc__.split("\n")[0])


def field_type(cls, f: dataclasses.Field) -> tuple[type, bool, bool]:
    """(scalar type, is a list, may be None) of a field annotated `T`, `list[T]` or `T | None`."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


BOOLS = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False, "off": False}


def convert(key: str, value, scalar: type, is_list: bool, optional: bool):
    """A YAML or command-line value as the field's type (a list: a,b,c or a YAML list), or a UserError."""
    if optional and (value is None or isinstance(value, str) and value.lower() in ("none", "null", "")):
        return None
    if is_list and isinstance(value, (str, list)):
        items = value.split(",") if isinstance(value, str) else value
        return [convert(key, item, scalar, False, False) for item in items if item != ""]
    kind = f"a list of {scalar.__name__}, as a,b,c or a YAML list" if is_list else scalar.__name__
    wrong = UserError(f"config key '{key}' expects {kind}, got {value!r}; {FIX}")
    if is_list or value is None or isinstance(value, (dict, list)):
        raise wrong
    if scalar is bool and str(value).lower() in BOOLS:
        return BOOLS[str(value).lower()]
    if scalar is bool or isinstance(value, bool) or scalar is int and isinstance(value, float) and value % 1:
        raise wrong
    try:
        return scalar(value.replace("_", "") if scalar is int and isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise wrong from None


def unknown_key(cls, key: str, where: str) -> UserError:
    known = [f.name for f in dataclasses.fields(cls)]
    moved = getattr(cls, "moved", {})  # settings whose job went to another command: {name: where it went}
    if key in moved:
        return UserError(f"--{key} is not a setting of this script any more; {moved[key]}")
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; the valid keys are {', '.join(known)}"
    if close:
        hint = f" (did you mean '{close[0]}'?); see --help for the keys"
    return UserError(f"unknown config key '{key}' in {where}{hint}")


def read_yaml(cls, path: Path) -> dict:
    """The key: value mapping of a --config file, each key a field of `cls`."""
    if not path.is_file():
        raise UserError(f"config file {path} {'is a folder' if path.is_dir() else 'does not exist'}; check --config")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {path} is not valid YAML text{where} ({first_line(err)}); fix it") from None
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path} must be a mapping of key: value, not a {type(loaded).__name__}; write "
                        f"one key: value per line")
    for key in loaded:
        if key not in {f.name for f in dataclasses.fields(cls)}:
            raise unknown_key(cls, str(key), str(path))
    return loaded


def parse_config(cls, argv: list[str] | None = None, description: str | None = None):
    """An instance of the dataclass `cls` from its defaults, `--config` YAML and the command line."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False, exit_on_error=False)
    parser.add_argument("--config", help="YAML file of overrides (the command line wins)")
    for name, f in fields.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        limits = f.metadata.get("choices") or getattr(f.metadata.get("domain"), "describe", "")
        help = f"{f.metadata.get('help', '')} (default: {default!r}{'; ' * bool(limits)}{limits})"
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS, help=help.replace("%", "%%"))
    try:
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as err:
        raise UserError(f"{err}; give each option a value (one that starts with '-' as --name=-value), see --help"
                        ) from None
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        if not flag.startswith("--"):
            raise UserError(f"unexpected argument '{flag}'; options take the form --name value (see --help)")
        raise unknown_key(cls, flag[2:].split("=")[0], "the command line")
    values = read_yaml(cls, Path(args.config)) if args.config is not None else {}
    values |= {key: value for key, value in vars(args).items() if key != "config"}
    return cls(**{key: convert(key, value, *field_type(cls, fields[key])) for key, value in values.items()})


def save_config(config, path: Path) -> None:
    """The resolved config as YAML, loadable again with `--config`."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
