"""TOML file, then command-line overrides, into a JobConfig; and `--help` from the same schema.

Command-line forms (those tyro accepted, so every existing command works):
    --section.key VALUE   --section.key=VALUE           scalars, typed by the key's annotation
    --section.key   --section.no-key   --section.no_key booleans (also --section.key=false)
    --section.key NAME VALUE [NAME VALUE ...]           tables; each VALUE typed by its look
Lists only from the TOML. Dashes in names read as underscores. The literal None unsets a key whose
type allows it. Every mistake is one ConfigError line naming the key, value or file."""

import ast
import inspect
import os
import re
import textwrap
import types
from dataclasses import fields
from typing import Literal, Union, get_args, get_origin

import tomllib

from longctx.base import ConfigError
from longctx.config.schema import JobConfig

TRUE, FALSE = ("true", "True"), ("false", "False")


def keys(section) -> dict:
    """name -> field of a section class or object: the keys a user may set."""
    return {f.name: f for f in fields(section)}


SECTIONS = {f.name: f.type for f in fields(JobConfig)}


# ---- types -------------------------------------------------------------------------------------

def expected(annotation) -> str:
    """What a value of this annotation is, in words (for errors and --help)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("unset (None)" if a is type(None) else expected(a) for a in args)
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return "a table of names to values (true/false, numbers or strings)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[annotation]


def _plural(annotation) -> str:
    if get_origin(annotation) is list:
        return f"lists of {_plural(get_args(annotation)[0])}"
    return {int: "integers", float: "numbers", str: "strings"}[annotation]


def conforms(value, annotation) -> bool:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    if annotation is type(None):
        return value is None
    if annotation is float:  # TOML's 1 for 1.0
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _typed_value(value, annotation, key: str, where: str):
    """A TOML (or already typed) value, checked against the key's annotation; ints of float keys become floats."""
    if not conforms(value, annotation):
        raise ConfigError(f"{key}={value!r} must be {expected(annotation)} ({where})")
    return float(value) if annotation is float else value


def _by_look(text: str):
    """A table value from the command line: an integer, a number, true/false, else the string."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return True if text in TRUE else False if text in FALSE else text


def _from_text(text: str, annotation, key: str):
    """One command-line value, parsed as the key's annotation asks."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType) and type(None) in args:
        if text == "None":
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is bool:
        value = True if text.lower() == "true" else False if text.lower() == "false" else text
    elif annotation in (int, float):
        try:
            value = annotation(text)
        except ValueError:
            value = text
    else:
        value = text
    return _typed_value(value, annotation, key, f"--{key}")


# ---- the command line --------------------------------------------------------------------------

def _field_of(flag: str):
    """'--section.key' (dashes allowed) -> (section, key, field, negated), or one line naming the valid names."""
    name = flag[2:].replace("-", "_")
    section, _, key = name.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section in {flag!r}; valid sections: {', '.join(SECTIONS)}")
    if not key:
        raise ConfigError(f"{flag} names a section, not a key; e.g. --{section}.KEY (see --help)")
    valid = keys(SECTIONS[section])
    negated = key.startswith("no_") and key[3:] in valid and valid[key[3:]].type is bool
    key = key[3:] if negated else key
    if key not in valid:
        raise ConfigError(f"unknown config key --{section}.{key}; valid keys of [{section}]: {', '.join(sorted(valid))}")
    return section, key, valid[key], negated


def _flags(args: list[str]):
    """Each override as (flag, inline value or None, the words after it up to the next flag)."""
    i = 0
    while i < len(args):
        if not args[i].startswith("--"):
            raise ConfigError(f"unexpected argument {args[i]!r}: overrides are --section.key VALUE (see --help)")
        flag, eq, inline = args[i].partition("=")
        j = i + 1
        while j < len(args) and not args[j].startswith("--"):
            j += 1
        yield flag, inline if eq else None, args[i + 1:j]
        i = j


def _override(flag: str, inline: str | None, words: list[str]):
    """One override -> (section, key, typed value, words it left unread)."""
    section, key, f, negated = _field_of(flag)
    name = f"{section}.{key}"
    if negated:
        if inline is not None:
            raise ConfigError(f"--{section}.no-{key} takes no value (or write --{name}=false)")
        return section, key, False, words
    if f.type is bool:
        if inline is not None:
            text, rest = inline, words
        elif words and words[0] in TRUE + FALSE:  # --section.key true
            text, rest = words[0], words[1:]
        else:
            text, rest = "true", words
        return section, key, _from_text(text, bool, name), rest
    if _is_a(f.type, list):
        raise ConfigError(f"{name} is a list: set it in the TOML file (e.g. {key} = [...] under [{section}])")
    if _is_a(f.type, dict):
        pairs = ([inline] if inline is not None else []) + words
        if pairs == ["None"] and conforms(None, f.type):
            return section, key, None, []
        if len(pairs) % 2:
            raise ConfigError(f"--{name} takes NAME VALUE pairs, got {' '.join(pairs)!r}; e.g. --{name} name1 value1 name2 value2")
        table = {pairs[i]: _by_look(pairs[i + 1]) for i in range(0, len(pairs), 2)}
        return section, key, table, []
    if inline is None and not words:
        raise ConfigError(f"--{name} needs a value ({expected(f.type)})")
    text, rest = (inline, words) if inline is not None else (words[0], words[1:])
    return section, key, _from_text(text, f.type, name), rest


def _is_a(annotation, container: type) -> bool:
    """list[...] or dict[...], also when it may be unset (X | None)."""
    return get_origin(annotation) is container or any(get_origin(a) is container for a in get_args(annotation))


def command_line_overrides(args: list[str]) -> dict[str, dict]:
    """{section: {key: value}} of the command line, later flags winning."""
    overrides = {}
    for flag, inline, words in _flags(args):
        section, key, value, rest = _override(flag, inline, words)
        if rest:
            raise ConfigError(f"unexpected argument {rest[0]!r} after --{section}.{key}")
        overrides.setdefault(section, {})[key] = value
    return overrides


# ---- the TOML file -----------------------------------------------------------------------------

def toml_values(path: str) -> dict[str, dict]:
    """{section: {key: value}} of a TOML job file, each key known and each value of its type."""
    if not os.path.isfile(path):
        raise ConfigError(f"--job.config_file {path!r} does not exist; see train_configs/ for examples")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        line = re.search(r"at line (\d+)", str(e))
        raise ConfigError(f"{path}{':' + line.group(1) if line else ''}: TOML syntax error: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the config file {path}: {e}") from None
    values = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} = {table!r} stands outside any [section]; move it under its section")
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown config section [{section}]; valid sections: {', '.join(SECTIONS)}")
        valid = keys(SECTIONS[section])
        for key, value in table.items():
            if key not in valid:
                raise ConfigError(f"{path}: unknown config key {section}.{key}; valid keys of [{section}]: {', '.join(sorted(valid))}")
            values.setdefault(section, {})[key] = _typed_value(value, valid[key].type, f"{section}.{key}", path)
    return values


# ---- both, and --help --------------------------------------------------------------------------

def job_config_from(args: list[str]) -> JobConfig:
    """The defaults, then the TOML of --job.config_file, then every other override."""
    overrides = command_line_overrides(args)
    config = JobConfig()
    config_file = overrides.get("job", {}).get("config_file")
    for values in ([toml_values(config_file)] if config_file is not None else []) + [overrides]:
        for section, table in values.items():
            for key, value in table.items():
                setattr(getattr(config, section), key, value)
    return config


def docstrings(section_class) -> dict[str, str]:
    """key -> the docstring written under its field (the help text), read from the class's source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(section_class))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _shown(value) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


HELP_INTRO = """\
A job is a TOML file of the sections below (train_configs/ holds examples), then command-line
overrides of any key: --section.key VALUE or --section.key=VALUE; booleans as --section.key or
--section.no-key; tables as --section.key NAME VALUE [NAME VALUE ...]; lists only in the TOML;
None unsets a key that may be unset. A bad key or value stops the run with one error line."""


def help_text() -> str:
    lines = ["usage: train.py --job.config_file FILE [--section.key VALUE ...]", "", HELP_INTRO, ""]
    defaults = JobConfig()
    for section, section_class in SECTIONS.items():
        lines.append(f"[{section}]")
        docs = docstrings(section_class)
        for key, f in keys(section_class).items():
            flag = f"--{section}.{key}" + (f" / --{section}.no-{key}" if f.type is bool else "")
            lines.append(f"  {flag}  ({expected(f.type)}; default {_shown(getattr(getattr(defaults, section), key))})")
            lines.extend("      " + line for line in docs[key].splitlines())
        lines.append("")
    return "\n".join(lines)
