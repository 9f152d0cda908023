"""A typed configuration engine: frozen dataclasses read from YAML files, dicts and `key=value` overrides.

It knows no key of any particular config. A schema is a root class deriving from `ConfigRoot`, whose fields
are top-level keys and sections (frozen dataclasses deriving from `Section`, one level deep), each key
declared with `setting(default, help, bounds)` and each section with `subsection(cls, help)`:

    @dataclass(frozen=True)
    class Optim(Section):
        '''The optimizer.'''
        SECTION: ClassVar[str] = "optim"
        lr: float = setting(1e-3, "peak learning rate", gt=0)

    @dataclass(frozen=True)
    class Job(ConfigRoot):
        seed: int = setting(0, "random seed", ge=0)
        optim: Optim = subsection(Optim, "the optimizer")

From the schema alone the engine provides:

- validation whenever an instance is built, from Python or from a file: each value is type-checked and
  normalised (int -> float, list -> tuple), its bounds applied, then the class's own `_check()` runs; every
  error is a `ConfigError` naming the dotted key (`optim.lr`), the value and what is allowed;
- conversions: `Job.from_dict`, `to_dict`, `to_yaml`, `get("optim.lr")`, and for a loader that merges
  defaults < a YAML file < overrides: `read_file`, `read_override` and `build`;
- an unknown key answered with the nearest valid one (plus the root's ALIASES: other tools' names);
- help: `dotted_keys`, `describe_keys` and `format_keys` (type, default and help of every key), and
  `format_config` (every value, those that differ from the default marked).

Key types: str, bool, int, float, Literal of strings, tuple[X, ...] and tuple[X, Y], unions of those and None.
Standard library only, plus PyYAML imported when YAML is read or written.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar, Union

# Spellings accepted for booleans (case-insensitive) in overrides and quoted YAML strings.
_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")
# Spellings of None for Optional keys in overrides (`data.eval=null`); quote the value to mean the string.
_NULL = ("null", "none", "~")


class ConfigError(ValueError):
    """An invalid configuration. `key` is the dotted key at fault when there is one (else None)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key

    def __reduce__(self):  # picklable (e.g. raised in a spawned rank) despite the keyword argument
        return (type(self), (self.args[0], self.key))


# --------------------------------------------------------------------------------------------------------------
# Declaring a schema: keys with a default, one line of help and optional bounds; sections; the root
# --------------------------------------------------------------------------------------------------------------


def setting(default: Any, help: str, *, gt=None, ge=None, lt=None, le=None) -> Any:
    """A key: a dataclass field with its help line and numeric bounds (applied to each element of a tuple)."""
    bounds = {name: value for name, value in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if value is not None}
    return field(default=default, metadata={"help": help, **bounds})


def subsection(cls: type, help: str) -> Any:
    """A section of the root: a field defaulting to `cls()`, with its help line."""
    return field(default_factory=cls, metadata={"help": help})


class Section:
    """Base of every section: type-checks and normalises each field, applies bounds, then `_check()`.

    Subclasses are frozen dataclasses with a `SECTION` class variable: their field name in the root, the
    prefix of their dotted keys (empty for the root itself).
    """

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            self._settle(f, hints[f.name])
        self._check()

    def _settle(self, f: dataclasses.Field, tp: Any) -> None:
        """Check one field's value against its type `tp` and bounds, storing the normalised value."""
        key = self._key(f.name)
        value = getattr(self, f.name)
        normalised = _convert(value, tp, key, text=False)
        _check_bounds(normalised, f.metadata, key)
        if normalised is not value:
            object.__setattr__(self, f.name, normalised)  # frozen: int -> float, list -> tuple

    def _check(self) -> None:
        """Rules beyond a field's type and bounds (several fields together); raise ConfigError."""

    def _key(self, name: str) -> str:
        return _join(self.SECTION, name)


_Root = TypeVar("_Root", bound="ConfigRoot")


class ConfigRoot(Section):
    """Base of a schema's root: its fields are the top-level keys and the sections (see `subsection`).

    What the engine's messages say about this schema, set by the subclass:
    ALIASES:   names other tools give to keys -> our dotted key; only used to suggest a key for an unknown one.
    KEYS_HELP: where every key is listed, added to unknown-key errors in parentheses ("" for nothing).
    LOADERS:   the functions that build a config from data, named when a section is given as something else.
    """

    ALIASES: ClassVar[Mapping[str, str]] = {}
    KEYS_HELP: ClassVar[str] = ""
    LOADERS: ClassVar[str] = "from_dict"

    def _settle(self, f: dataclasses.Field, tp: Any) -> None:
        if not _is_section_type(tp):
            super()._settle(f, tp)
            return
        value = getattr(self, f.name)
        if not isinstance(value, tp):  # a section checked itself when it was built; only its class is left
            key = self._key(f.name)
            raise ConfigError(
                f"{key}: expected a {tp.__name__}, got {_show(value)} ({type(value).__name__}); "
                f"build it with {tp.__name__}(...) or load the config with {self.LOADERS}",
                key,
            )

    @classmethod
    def from_dict(cls: type[_Root], data: Mapping[str, Any], *, source: str = "dict") -> _Root:
        """Build a config from a nested mapping laid out like `to_dict()` (sections may be partial or None;
        `section.key` strings work as top-level keys too). Missing keys keep their defaults; unknown keys and
        bad values raise ConfigError prefixed with `source`."""
        values = _read_mapping(cls, data, source)
        return build(cls, values, dict.fromkeys(values, source))

    def to_dict(self) -> dict[str, Any]:
        """Nested plain data (dicts, lists, str, int, float, bool, None), in field order: the YAML layout."""
        return _plain(self)

    def to_yaml(self) -> str:
        """The whole config as YAML text, each section under its one-line description; reading it back
        (`read_file` + `build`, or `from_dict` of the parsed YAML) gives an equal config."""
        yaml = _yaml()

        class Dumper(yaml.SafeDumper):
            pass

        # Lists inline ([q_proj, v_proj]), mappings as blocks: one key per line.
        Dumper.add_representer(
            list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
        )
        chunks = []
        for name, value in self.to_dict().items():
            text = yaml.dump(
                {name: value}, Dumper=Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100
            )
            if isinstance(value, dict):  # a section: a blank line and its one-line description first
                text = f"\n# {_hints(type(self))[name].__doc__.splitlines()[0]}\n{text}"
            chunks.append(text)
        return "".join(chunks)

    def get(self, key: str) -> Any:
        """The value of a dotted key, e.g. config.get("optimizer.lr"); ConfigError if there is no such key."""
        _check_key(type(self), key, "get")
        node: Any = self
        for part in key.split("."):
            node = getattr(node, part)
        return node


def _join(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def nonempty(section: Section, *names: str) -> None:
    """For `_check()`: ConfigError if one of these string fields is empty or blank (None passes)."""
    for name in names:
        value = getattr(section, name)
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{section._key(name)}: must not be empty, got {value!r}", section._key(name))


# --------------------------------------------------------------------------------------------------------------
# The schema of a root: dotted keys, their types and help
# --------------------------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


class _Leaf(NamedTuple):
    type: Any
    field: dataclasses.Field


@functools.cache
def _schema(root: type[ConfigRoot]) -> tuple[dict[str, _Leaf], tuple[str, ...]]:
    """({dotted key: leaf}, section names), in field order."""
    leaves: dict[str, _Leaf] = {}
    sections: list[str] = []
    for f in dataclasses.fields(root):
        tp = _hints(root)[f.name]
        if _is_section_type(tp):
            sections.append(f.name)
            for sub in dataclasses.fields(tp):
                leaves[f"{f.name}.{sub.name}"] = _Leaf(_hints(tp)[sub.name], sub)
        else:
            leaves[f.name] = _Leaf(tp, f)
    return leaves, tuple(sections)


def dotted_keys(root: type[ConfigRoot]) -> list[str]:
    """Every valid key of `root`, in the order of the tree: top-level keys and sections as declared."""
    return list(_schema(root)[0])


class KeyInfo(NamedTuple):
    """One key of describe_keys(): its dotted name, type (as text), default value and one-line help."""

    key: str
    type: str
    default: Any
    help: str


def describe_keys(root: type[ConfigRoot]) -> list[KeyInfo]:
    """Every key of `root` with its type, default and help (its bounds appended in brackets)."""
    defaults = root()
    infos = []
    for key, leaf in _schema(root)[0].items():
        help = leaf.field.metadata["help"]
        bounds = _bounds_text(leaf.field.metadata)
        infos.append(KeyInfo(key, _type_text(leaf.type), defaults.get(key), f"{help} [{bounds}]" if bounds else help))
    return infos


def format_keys(root: type[ConfigRoot], heading: str) -> str:
    """describe_keys() as readable text under `heading`, grouped by section (each with its one-line doc)."""
    _, sections = _schema(root)
    doc = {name: _hints(root)[name].__doc__.split("\n")[0] for name in sections}
    lines = [heading, ""]
    current = None
    for info in describe_keys(root):
        section = info.key.split(".")[0] if "." in info.key else ""
        if section != current:
            current = section
            lines.append(f"{section}: {doc[section]}" if section else "top level:")
        lines.append(f"  {info.key} ({info.type}, default {_show(info.default)})")
        lines.append(f"      {info.help}")
    return "\n".join(lines)


def format_config(config: ConfigRoot, *, title: str, max_width: int = 80) -> str:
    """Readable text of every key and value, one per line as `key  value`, values that differ from the default
    marked with '*' and the default shown; long strings are shortened to `max_width`. The first line is
    `title (N changed from the default, marked *):`."""
    defaults = type(config)()
    rows = []
    for key in dotted_keys(type(config)):
        value, default = config.get(key), defaults.get(key)
        shown = _shorten(_show(value), max_width)
        if value != default:
            rows.append(("*", key, f"{shown}   (default {_shorten(_show(default), max_width)})"))
        else:
            rows.append((" ", key, shown))
    width = max(len(key) for _, key, _ in rows)
    changed = sum(mark == "*" for mark, _, _ in rows)
    lines = [f"{title} ({changed} changed from the default, marked *):"]
    lines += [f"{mark} {key:<{width}}  {text}" for mark, key, text in rows]
    return "\n".join(lines)


def _shorten(text: str, max_width: int) -> str:
    return text if len(text) <= max_width else text[: max_width - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# Values: type-directed conversion of Python/YAML values and override text
# --------------------------------------------------------------------------------------------------------------


class _Mismatch(Exception):
    """A value that does not fit a type (internal; becomes a ConfigError naming the key)."""


def _members(tp: Any) -> tuple[Any, ...] | None:
    """The members of a Union type (X | Y, Optional[X]), else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _convert(value: Any, tp: Any, key: str, *, text: bool) -> Any:
    """`value` as an instance of `tp`, or ConfigError naming key, value and the expected type.

    text=True: `value` is an override's text (every value is a string; null/none mean None for Optional
    keys; a quoted value is always the string inside the quotes). text=False: a Python or YAML value; strings
    are still parsed for non-string types (YAML reads 3e-4 as a string).
    """
    try:
        return _to(value, tp, text)
    except _Mismatch:
        shown = repr(value) if isinstance(value, str) else f"{_show(value)} ({type(value).__name__})"
        if _literal_only(tp):
            raise ConfigError(f"{key}: {shown} is not allowed; expected {_expected(tp)}", key) from None
        scalar = isinstance(value, (int, float)) and _accepts_str(tp)  # YAML read `2024` or `1e3` as a number
        hint = "; quote it in YAML to make it a string" if scalar else ""
        raise ConfigError(f"{key}: expected {_expected(tp)}, got {shown}{hint}", key) from None


def _to(value: Any, tp: Any, text: bool) -> Any:
    members = _members(tp)
    if members is not None:
        if value is None and type(None) in members:
            return None
        if text and type(None) in members and isinstance(value, str) and value.strip().lower() in _NULL:
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _to(value, member, text)
            except _Mismatch:
                pass
        raise _Mismatch
    origin = typing.get_origin(tp)
    if text and isinstance(value, str) and (tp is str or origin is Literal):
        value = _unquote(value)
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin is tuple:
        return _to_tuple(value, tp, text)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _Mismatch from None
        else:
            raise _Mismatch
        if not math.isfinite(number):
            raise _Mismatch
        return number
    raise TypeError(f"{__name__}: unsupported field type {tp!r}")  # a bug in the schema, not a user's mistake


def _to_tuple(value: Any, tp: Any, text: bool) -> tuple:
    args = typing.get_args(tp)
    if isinstance(value, str):
        items: list[Any] = _split_list(value)
        text = True
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise _Mismatch
    element_types = [args[0]] * len(items) if args[-1] is Ellipsis else list(args)
    if len(items) != len(element_types):
        raise _Mismatch
    return tuple(_to(item, element_type, text) for item, element_type in zip(items, element_types, strict=True))


def _split_list(text: str) -> list[str]:
    """ "[a, b]", "a,b", "[]" -> the items (whitespace around items ignored)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text.strip():
        return []
    return [item.strip() for item in text.split(",")]


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _accepts_str(tp: Any) -> bool:
    members = _members(tp)
    return tp is str or (members is not None and str in members)


def _literal_only(tp: Any) -> bool:
    members = _members(tp)
    candidates = [m for m in members if m is not type(None)] if members is not None else [tp]
    return all(typing.get_origin(m) is Literal for m in candidates)


def _expected(tp: Any) -> str:
    """How an error message names what a type accepts."""
    members = _members(tp)
    if members is not None:
        parts = [_expected(m) for m in members if m is not type(None)]
        if type(None) in members:
            parts.append("null")
        return " or ".join(parts)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if args[-1] is Ellipsis:
            return f"a list of {_expected(args[0]).split(' ', 1)[1]}s, e.g. [a,b]"
        return f"a list of {len(args)} {_expected(args[0]).split(' ', 1)[1]}s, e.g. [x,y]"
    return {
        str: "a string",
        bool: "a boolean (true/false, 1/0, yes/no)",
        int: "an integer",
        float: "a finite float",
    }[tp]


def _type_text(tp: Any) -> str:
    """A type as describe_keys shows it: float, int | null, bool | 'auto', list[str], [float, float], ..."""
    members = _members(tp)
    if members is not None:
        return " | ".join("null" if m is type(None) else _type_text(m) for m in members)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if args[-1] is Ellipsis:
            return f"list[{_type_text(args[0])}]"
        return "[" + ", ".join(_type_text(a) for a in args) + "]"
    return tp.__name__


_BOUND_SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _bounds_text(metadata: Mapping[str, Any]) -> str:
    return " and ".join(f"{_BOUND_SYMBOLS[name]} {metadata[name]}" for name in _BOUND_SYMBOLS if name in metadata)


def _check_bounds(value: Any, metadata: Mapping[str, Any], key: str) -> None:
    if value is None or not any(name in metadata for name in _BOUND_SYMBOLS):
        return
    for item in value if isinstance(value, tuple) else (value,):
        ok = (
            ("gt" not in metadata or item > metadata["gt"])
            and ("ge" not in metadata or item >= metadata["ge"])
            and ("lt" not in metadata or item < metadata["lt"])
            and ("le" not in metadata or item <= metadata["le"])
        )
        if not ok:
            each = "each value " if isinstance(value, tuple) else ""
            raise ConfigError(f"{key}: {each}must be {_bounds_text(metadata)}, got {_show(value)}", key)


def _plain(value: Any) -> Any:
    """Sections -> dicts, tuples -> lists (YAML/JSON-ready)."""
    if isinstance(value, Section):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def _show(value: Any) -> str:
    """A value as YAML would read it: null, true, 3e-4, [a, b], strings unquoted unless ambiguous."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_show(item) for item in value) + "]"
    if isinstance(value, str):
        plain = value and value == value.strip() and "\n" not in value and value.lower() not in _NULL + _TRUE + _FALSE
        return value if plain else repr(value)
    return repr(value)


# --------------------------------------------------------------------------------------------------------------
# Keys: checking, suggestions, merging
# --------------------------------------------------------------------------------------------------------------


def _suggest(root: type[ConfigRoot], key: str) -> list[str]:
    """The valid dotted keys nearest to an unknown `key`: usually one, several when a key name is used by
    several sections (`every_steps`), none when nothing is close."""
    leaves, sections = _schema(root)
    keys = list(leaves)
    section, _, name = key.rpartition(".")
    if name in root.ALIASES:
        return [root.ALIASES[name]]
    if section and section not in sections:  # a misspelt section with a known key name
        fixed = difflib.get_close_matches(section, sections, n=1, cutoff=0.6)
        if fixed and f"{fixed[0]}.{name}" in leaves:
            return [f"{fixed[0]}.{name}"]
    same_name = [k for k in keys if k.rpartition(".")[2] == name]  # a known key in the wrong place: `lr`, `model.lr`
    if same_name:
        return same_name
    if section in sections:  # a typo of a key name of this section
        names = [k.rpartition(".")[2] for k in keys if k.startswith(section + ".")]
        match = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        if match:
            return [f"{section}.{match[0]}"]
    # Whole dotted keys (catches `optimizer.learning_rate` -> `optimizer.lr`), but a shared section prefix alone
    # must not make a match: the key names themselves have to be somewhat alike too.
    for match in difflib.get_close_matches(key, keys, n=5, cutoff=0.6):
        if difflib.SequenceMatcher(None, name, match.rpartition(".")[2]).ratio() >= 0.3:
            return [match]
    return []


def _unknown_key_error(root: type[ConfigRoot], key: str, source: str) -> ConfigError:
    leaves, sections = _schema(root)
    section = key.split(".")[0]
    what = (
        f"unknown section {section!r} in key {key!r}"
        if "." in key and section not in sections
        else f"unknown key {key!r}"
    )
    suggestions = _suggest(root, key)
    if len(suggestions) == 1:
        tail = f"; did you mean {suggestions[0]!r}?"
    elif suggestions:
        tail = f"; did you mean one of {', '.join(map(repr, suggestions))}?"
    elif section in sections:
        tail = f"; {section} has: {', '.join(k.split('.', 1)[1] for k in leaves if k.startswith(section + '.'))}"
    else:
        tops = [k for k in leaves if "." not in k]
        tail = f"; valid top-level keys: {', '.join(tops)}; sections: {', '.join(sections)}"
    where = f" ({root.KEYS_HELP})" if root.KEYS_HELP else ""
    return ConfigError(f"{source}: {what}{tail}{where}", key)


def _check_key(root: type[ConfigRoot], key: str, source: str) -> None:
    """ConfigError, prefixed with `source`, unless `key` is a dotted key of `root` (a section is not a key)."""
    leaves, sections = _schema(root)
    if key in leaves:
        return
    if key in sections:
        example = next(k for k in leaves if k.startswith(key + "."))
        raise ConfigError(
            f"{source}: {key!r} is a section, not a key; set its keys one by one, e.g. {example}=...", key
        )
    raise _unknown_key_error(root, key, source)


def _convert_at(root: type[ConfigRoot], key: str, value: Any, source: str, *, text: bool) -> Any:
    leaf = _schema(root)[0][key]
    try:
        return _convert(value, leaf.type, key, text=text)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}", key) from None


def _flatten(root: type[ConfigRoot], data: Any, source: str, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """A nested mapping -> (dotted key, value) pairs, checking every key against the schema."""
    leaves, sections = _schema(root)
    if not isinstance(data, Mapping):
        where = f"section {prefix!r}" if prefix else "the top level"
        raise ConfigError(
            f"{source}: {where} must be a mapping of keys to values, got {_show(data)} ({type(data).__name__})",
            prefix or None,
        )
    for raw_key, value in data.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"{source}: keys must be strings, got {raw_key!r} in {prefix or 'the top level'}")
        key = _join(prefix, raw_key.strip())
        if key in sections:
            if value is not None:  # `lora:` with nothing under it keeps the section's defaults
                yield from _flatten(root, value, source, key)
        elif key in leaves:
            yield key, value
        elif isinstance(value, Mapping) and value:  # an unknown section: judge it by its first key (`optimiser.lr`)
            first = next(iter(value))
            raise _unknown_key_error(root, f"{key}.{first}" if isinstance(first, str) else key, source)
        else:
            raise _unknown_key_error(root, key, source)


def _read_mapping(root: type[ConfigRoot], data: Any, source: str) -> dict[str, Any]:
    """{dotted key: converted value} of a nested mapping (a later spelling of a key wins)."""
    return {key: _convert_at(root, key, value, source, text=False) for key, value in _flatten(root, data, source)}


def read_file(root: type[ConfigRoot], path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """The keys set by the YAML file at `path`: ({dotted key: converted value}, {dotted key: the file's
    path}), the two arguments of `build`. An empty file sets nothing; every problem is a ConfigError."""
    source = os.fspath(path)
    values = _read_mapping(root, _read_yaml(path), source)
    return values, dict.fromkeys(values, source)


def read_override(root: type[ConfigRoot], key: str, text: str, source: str) -> Any:
    """The value of an override `key=text`, parsed by the key's type (see `_convert`); a ConfigError for an
    unknown key or a bad value starts with `source`."""
    _check_key(root, key, source)
    return _convert_at(root, key, text, source, text=True)


def build(root: type[_Root], values: Mapping[str, Any], origins: Mapping[str, str]) -> _Root:
    """A `root` from {dotted key: converted value} over the defaults. A validation error names where the
    offending key was set (its entry in `origins`: a file, an override, ...)."""
    leaves, sections = _schema(root)
    top: dict[str, Any] = {}
    per_section: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        (per_section[section] if section else top)[name] = value
    hints = _hints(root)
    try:
        built = {name: hints[name](**per_section[name]) for name in sections}
        return root(**top, **built)
    except ConfigError as error:
        origin = origins.get(error.key or "")
        if origin is None:
            raise
        raise ConfigError(f"{origin}: {error}", error.key) from None


# --------------------------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------------------------


def _yaml():
    try:
        import yaml
    except ImportError:  # transformers depends on PyYAML, so this means a broken or unusual environment
        raise ConfigError(
            "reading and writing config files needs PyYAML, which is not installed: pip install pyyaml"
        ) from None
    return yaml


def _read_yaml(path: str | os.PathLike) -> Any:
    yaml = _yaml()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {os.fspath(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {os.fspath(path)!r} cannot be read: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{os.fspath(path)}: not valid YAML: {error}") from None
    return {} if data is None else data  # an empty file (or only comments) keeps every default


__all__ = [
    "ConfigError",
    "ConfigRoot",
    "KeyInfo",
    "Section",
    "build",
    "describe_keys",
    "dotted_keys",
    "format_config",
    "format_keys",
    "nonempty",
    "read_file",
    "read_override",
    "setting",
    "subsection",
]
