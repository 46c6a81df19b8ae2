"""Turn a Config dataclass into a command line, with an optional YAML file underneath.

Precedence: dataclass defaults < `--config file.yaml` < `--name value` on the command line.
Every field becomes `--name`; its help text comes from `field(metadata={"help": ...})` and an
optional `metadata={"choices": [...]}` restricts the values. Unknown keys and values of the wrong
type are rejected with a message that names the key and suggests the closest valid one.
"""

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

from common.errors import UserError


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
            raise UserError(f"config key '{key}' expects a list of {scalar.__name__}, got {value!r}")
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
            f"config key '{key}' expects {scalar.__name__}, got {value!r}; fix the value in the YAML or on the command line"
        ) from None
    if choices and converted not in choices:
        raise UserError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {converted!r}")
    return converted


def _unknown_key_error(key: str, known: list[str], where: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(known)}"
    return UserError(f"unknown config key '{key}' in {where}{hint}")


def parse_config(cls, argv: list[str] | None = None, description: str | None = None):
    """Build an instance of the dataclass `cls` from defaults, `--config` YAML and the command line."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", type=str, default=None, help="YAML file of overrides (the command line wins)")
    for name, f in fields.items():
        scalar, is_list, _ = _field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = f"list of {scalar.__name__}, comma separated" if is_list else scalar.__name__
        parser.add_argument(
            f"--{name}",
            default=argparse.SUPPRESS,
            metavar=kind.upper() if not f.metadata.get("choices") else "{" + ",".join(map(str, f.metadata["choices"])) + "}",
            help=f"{f.metadata.get('help', '')} (default: {default!r})",
        )
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        name = flag.lstrip("-").split("=")[0]
        if flag.startswith("--"):
            raise _unknown_key_error(name, list(fields), "the command line")
        raise UserError(f"unexpected argument '{flag}'; options take the form --name value (see --help)")

    values = {}
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; check the --config path")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {path} is not valid YAML{where}; fix its syntax") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {path} must be a mapping of key: value, got {type(loaded).__name__}")
        for key, value in loaded.items():
            if key not in fields:
                raise _unknown_key_error(str(key), list(fields), str(path))
            values[key] = value
    cli = {k: v for k, v in vars(args).items() if k != "config"}
    values.update(cli)

    converted = {}
    for key, value in values.items():
        scalar, is_list, optional = _field_type(cls, fields[key])
        converted[key] = _convert(key, value, scalar, is_list, optional, fields[key].metadata.get("choices"))
    return cls(**converted)


def save_config(config, path: Path) -> None:
    """Write the resolved config as YAML, loadable again with `--config`."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
