"""Turn a Config dataclass into a command line, with an optional YAML file underneath (every script's Config).

Precedence: dataclass defaults < `--config file.yaml` < `--name value` on the command line.
Fields are declared with `setting(default, help, domain)`: every field becomes `--name`, and its
values are limited by `choices=[...]` or a `Domain` (common/domains.py: `at_least(1)`, `between(0, 1)`, ...:
for a list, each item), declared beside the field and checked here by `check_domains`, which a
Config calls in its `__post_init__` (beside the rules that tie fields together): so a value outside
its domain is refused when the config is built, before a run writes anything. Unknown keys and values of the wrong
type are rejected with a message that names the key and suggests the closest valid one.
"""

import argparse
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path

import yaml

from common.domains import Domain
from common.errors import UserError


def setting(default, help: str, domain: Domain | None = None, choices: list | None = None,
            same_on_resume: bool = False):
    """A Config field: its default, help text, the values it may take, and whether a resumed run must keep it."""
    metadata = {"help": help, "domain": domain, "choices": choices, "same_on_resume": same_on_resume}
    metadata = {k: v for k, v in metadata.items() if v}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_domains(config) -> None:
    """Refuse the first field whose value (each item, for a list) is outside its choices or domain."""
    for f in dataclasses.fields(config):
        value, choices, domain = getattr(config, f.name), f.metadata.get("choices"), f.metadata.get("domain")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is None:
                continue  # an optional setting left unset
            if choices and item not in choices:
                raise UserError(f"--{f.name} {item!r} is not one of {', '.join(map(str, choices))}; "
                                f"fix it on the command line or in the --config YAML")
            if domain and not domain.accepts(item):
                finite = "a finite number " if isinstance(item, float) and not math.isfinite(item) else ""
                raise UserError(f"--{f.name} {item!r} is not allowed: it must be {finite}{domain.describe}; "
                                f"fix it on the command line or in the --config YAML")


def _field_type(cls, field: dataclasses.Field) -> tuple[type, bool, bool]:
    """Return (scalar type, is_list, is_optional) for a field annotated with simple types."""
    hint = typing.get_type_hints(cls)[field.name]
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def _convert(key: str, value, scalar: type, is_list: bool, optional: bool, choices):
    """Convert a YAML or command-line value to the field's type, or raise a UserError."""
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise UserError(f"config key '{key}' cannot be empty; give a {scalar.__name__}")
    if is_list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise UserError(f"config key '{key}' expects a list of {scalar.__name__}, got {value!r}; write it as "
                            f"a,b,c or a YAML list")
        return [_convert(key, item, scalar, False, False, choices) for item in items if item != ""]
    try:
        if scalar is bool:
            if isinstance(value, bool):
                converted = value
            elif str(value).lower() in ("true", "yes", "1", "on"):
                converted = True
            elif str(value).lower() in ("false", "no", "0", "off"):
                converted = False
            else:
                raise ValueError
        elif scalar is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            converted = int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        elif scalar is float:
            if isinstance(value, bool):
                raise ValueError
            converted = float(value)
        else:
            if isinstance(value, (dict, list)):
                raise ValueError
            converted = scalar(value)
    except (TypeError, ValueError):
        raise UserError(
            f"config key '{key}' expects {scalar.__name__}, got {value!r}; fix the value in the YAML or on the "
            f"command line"
        ) from None
    if choices and converted not in choices:
        close = difflib.get_close_matches(str(converted), [str(c) for c in choices], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {converted!r}{hint}")
    return converted


def _unknown_key_error(key: str, known: list[str], where: str, moved: dict[str, str]) -> UserError:
    if key in moved:  # a setting that moved to another command
        return UserError(f"--{key} is not a setting of this script any more; {moved[key]}")
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?); see --help for the keys" if close else \
        f"; the valid keys are {', '.join(known)}"
    return UserError(f"unknown config key '{key}' in {where}{hint}")


def parse_config(cls, argv: list[str] | None = None, description: str | None = None, moved: dict | None = None):
    """Build an instance of the dataclass `cls` from defaults, `--config` YAML and the command line. `moved`: keys
    that were settings once, each with the line that says where its job went (refused with that line)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
        exit_on_error=False,  # its errors become our one `error:` line, not a usage block
    )
    parser.add_argument("--config", type=str, default=None, help="YAML file of overrides (the command line wins)")
    for name, f in fields.items():
        scalar, is_list, _ = _field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = f"list of {scalar.__name__}, comma separated" if is_list else scalar.__name__
        domain = f"; {'each ' if is_list else ''}{f.metadata['domain'].describe}" if "domain" in f.metadata else ""
        choices = f.metadata.get("choices")
        parser.add_argument(
            f"--{name}",
            default=argparse.SUPPRESS,
            metavar="{" + ",".join(map(str, choices)) + "}" if choices else kind.upper(),
            help=f"{f.metadata.get('help', '')} (default: {default!r}{domain})".replace("%", "%%"),
        )
    try:
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as err:
        raise UserError(f"{err}; give each option a value (one that starts with '-' as --name=-value), see "
                        f"--help") from None
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        name = flag.lstrip("-").split("=")[0]
        if flag.startswith("--"):
            raise _unknown_key_error(name, list(fields), "the command line", moved or {})
        raise UserError(f"unexpected argument '{flag}'; options take the form --name value (see --help)")

    values = {}
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise UserError(f"config file {path} {what}; check the --config path")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
        except UnicodeDecodeError:
            raise UserError(f"config file {path} is not UTF-8 text; pass a YAML file of key: value lines") from None
        except OSError as err:
            raise UserError(f"cannot read config file {path} ({err.strerror}); check its permissions") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {path} is not valid YAML{where}; fix its syntax") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {path} must be a mapping of key: value, got {type(loaded).__name__}; write "
                            f"one key: value per line")
        for key, value in loaded.items():
            if key not in fields:
                raise _unknown_key_error(str(key), list(fields), str(path), moved or {})
            values[key] = value
    cli = {k: v for k, v in vars(args).items() if k != "config"}
    values.update(cli)

    converted = {}
    for key, value in values.items():
        scalar, is_list, optional = _field_type(cls, fields[key])
        converted[key] = _convert(key, value, scalar, is_list, optional, fields[key].metadata.get("choices"))
    return cls(**converted)  # its __post_init__ checks every domain and the rules between fields


def save_config(config, path: Path) -> None:
    """Write the resolved config as YAML, loadable again with `--config`."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
