"""Reading YAML that an admin wrote: every problem, with its line, in file order.

The loader remembers where every key and list item stood: PyYAML's safe loader builds plain
dicts and lists, ours builds `LocatedDict` / `LocatedList` that also carry the line of each key
and item. Duplicate keys, which PyYAML silently resolves to the last one, are problems.

The `Checker` walks such a tree collecting problems instead of stopping at the first, reported as
`file:line: key: message` so an admin sees every mistake at once. Unknown keys are problems, with
a suggestion when a known key is close: a typo must never silently switch something off. It reads
a settings dataclass declared with agi_bitrix.schema; custom sections (the routing rules, the
`agi-bitrix test` cases) use its primitives.

This module depends only on agi_bitrix.schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml

from agi_bitrix import schema
from agi_bitrix.schema import Setting

# Limits on what an admin's file may cost to read. A config is a few kilobytes; 22,000 rules
# are about 1.6 MB and 264,000 nodes, so these leave room for any real one. YAML aliases let
# 1 KB stand for billions of nodes (each level of anchors multiplies), so the nodes are
# counted as they would be built, before anything is built.
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_NODES = 1_000_000
MAX_DEPTH = 100  # PyYAML composes and builds nested nodes by recursion
# A value quoted in a problem is cut to this many characters, and an admin sees the first
# MAX_SHOWN_PROBLEMS problems of a file: a message never prints a whole file.
QUOTED_CHARS = 80
MAX_MESSAGE_CHARS = 500
MAX_SHOWN_PROBLEMS = 100


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        # The key path can hold a key from the file, of any length; a message quotes values cut
        # to QUOTED_CHARS, and is cut too in case one does not.
        key, message = _cut(self.key, 2 * QUOTED_CHARS), _cut(self.message, MAX_MESSAGE_CHARS)
        return f"{where}: {key}: {message}" if key else f"{where}: {message}"


class ConfigError(Exception):
    """The problems of a file: the first MAX_SHOWN_PROBLEMS in `problems`, all of them in `count`."""

    def __init__(self, problems: list[Problem]) -> None:
        self.count = len(problems)
        if self.count > MAX_SHOWN_PROBLEMS:
            first = problems[:MAX_SHOWN_PROBLEMS]
            problems = [*first, Problem(first[0].file, 0, "", f"{self.count - len(first)} more problem(s) not shown")]
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


class _Brief(reprlib.Repr):
    """repr() that stops early in big values: the file's mappings and lists are dict and list subclasses,
    which reprlib would otherwise print whole."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = QUOTED_CHARS + 2
        self.maxlist = self.maxdict = 8
        self.maxlevel = 3

    def repr1(self, x: Any, level: int) -> str:
        if isinstance(x, dict):
            return self.repr_dict(x, level)
        if isinstance(x, list):
            return self.repr_list(x, level)
        return super().repr1(x, level)


_BRIEF = _Brief()


def quoted(value: Any) -> str:
    """A value from the file as a problem quotes it: its repr, at most QUOTED_CHARS characters."""
    if isinstance(value, str):
        return _cut(repr(value[:QUOTED_CHARS + 1]), QUOTED_CHARS)
    return _cut(_BRIEF.repr(value), QUOTED_CHARS)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


class LocatedDict(dict[Any, Any]):
    line: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.lines: dict[Any, int] = {}


class LocatedList(list[Any]):
    line: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[int] = []


class YamlProblem(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _Loader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[YamlProblem] = []
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise YamlProblem(line, f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document becomes once every alias is replaced by what it names, counted
    up to just past MAX_NODES; YamlProblem for an alias inside its own anchor (a loop).

    Aliases make the node graph a DAG whose expansion can be exponential: each node's size is
    worked out once, children first, without recursion."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = _children(node)
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = min(MAX_NODES + 1, 1 + sum(sizes[id(child)] for child in children))
            continue
        if id(node) in sizes:
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise YamlProblem(child.start_mark.line + 1, "an alias refers to the anchor it stands in")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LocatedDict:
    loader.flatten_mapping(node)
    mapping = LocatedDict()
    mapping.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise YamlProblem(line, "a mapping key must be a plain value") from None
        if key in mapping:
            loader.duplicates.append(
                YamlProblem(line, f"key {quoted(key)} appears twice (first on line {mapping.lines[key]})")
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = line
    return mapping


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LocatedList:
    sequence = LocatedList()
    sequence.line = node.start_mark.line + 1
    for item in node.value:
        sequence.append(loader.construct_object(item, deep=True))
        sequence.lines.append(item.start_mark.line + 1)
    return sequence


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_located(text: str) -> tuple[Any, list[YamlProblem]]:
    """Parse YAML text; raises YamlProblem for syntax errors, returns duplicate-key problems."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, []
        if _expanded_size(root) > MAX_NODES:
            raise YamlProblem(0, f"more than {MAX_NODES:,} values once YAML aliases (*name) are expanded")
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else 0
        raise YamlProblem(line, f"YAML syntax: {error.problem or error}") from None
    except yaml.YAMLError as error:
        raise YamlProblem(0, f"YAML: {error}") from None
    finally:
        loader.dispose()
    return data, loader.duplicates


def read_file(path: str | Path) -> tuple[str, bytes]:
    """The text of a file and its bytes; ConfigError when it cannot be read or is not UTF-8."""
    file = str(path)
    try:
        with Path(path).open("rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise ConfigError([Problem(file, 0, "", f"cannot read: {error.strerror}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError([Problem(file, 0, "", f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; refused unread")])
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError as error:
        raise ConfigError([Problem(file, 0, "", f"not UTF-8 text ({error.reason} at byte {error.start})")]) from None


_FAILED = object()  # a value its check refused


class Checker:
    """Walks the located YAML of one file, collecting problems instead of stopping at the first."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def load(self, text: str) -> Any:
        """Parse YAML text; a syntax error ends the check (ConfigError), duplicate keys are problems."""
        try:
            data, duplicates = load_located(text)
        except YamlProblem as problem:
            raise ConfigError([Problem(self.file, problem.line, "", problem.message)]) from None
        self.problems.extend(Problem(self.file, d.line, "", d.message) for d in duplicates)
        return data

    def raise_problems(self) -> None:
        if self.problems:
            # In file order, as an admin reads the file; the sort is stable within a line.
            raise ConfigError(sorted(self.problems, key=lambda p: p.line))

    def problem(self, line: int, key: str, message: str) -> None:
        self.problems.append(Problem(self.file, line, key, message))

    # -- declared settings (agi_bitrix.schema) --

    def read(self, settings: type, mapping: LocatedDict, path: str, **given: Any) -> Any:
        """A declared settings dataclass from `mapping`, its fields read in declaration order.

        Fields in `given` are set by the caller's own checks and not read here.
        """
        names = [name for name, _ in schema.declared(settings) if name not in given]
        return settings(**given, **self.values(settings, mapping, path, names))

    def field(self, settings: type, name: str, mapping: LocatedDict, path: str = "") -> Any:
        """One declared field of `settings` from `mapping`."""
        return self.values(settings, mapping, path, [name])[name]

    def values(self, settings: type, mapping: LocatedDict, path: str, names: list[str]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        within: dict[str, LocatedDict] = {}  # sub-mappings by dotted key, each fetched (and checked) once
        for name in names:
            setting = schema.declaration(settings, name)
            *parents, key = setting.key.split(".")
            holder, where = mapping, path
            for depth, parent in enumerate(parents):
                under = ".".join(parents[:depth + 1])
                if under not in within:
                    within[under] = self.section(holder, parent, _join(where, parent), schema.keys(settings, under))
                holder, where = within[under], _join(where, parent)
            values.update(self._value(settings, name, setting, holder, key, where, values))
        return values

    def _value(self, settings: type, name: str, setting: Setting, mapping: LocatedDict, key: str, path: str,
               earlier: dict[str, Any]) -> dict[str, Any]:
        default = schema.default(settings, name)
        if setting.kind == schema.OWN:
            raise TypeError(f"{settings.__name__}.{name} is read by its section's own code")
        if setting.kind == schema.SECTION:
            assert setting.settings is not None
            if key not in mapping and default is not dataclasses.MISSING:
                return {name: default}
            found = self.section(mapping, key, _join(path, key), schema.keys(setting.settings))
            return {name: self.read(setting.settings, found, _join(path, key))}
        if setting.kind == schema.ITEMS:
            assert setting.check is not None
            found_items = self.items(mapping, key, path)
            if found_items is None:
                return {name: default}
            kept = []
            for line, item_path, item in found_items:
                try:
                    kept.append(setting.check(item))
                except ValueError as error:
                    self.problem(line, item_path, str(error))
            return {name: tuple(kept)}
        if setting.sets:  # one key fills several fields; without it they keep their defaults
            value = self._plain(setting, mapping, key, path, _FAILED) if key in mapping else _FAILED
            filled = _FAILED if value is _FAILED else self._checked(setting, value, mapping, key, path, ())
            return {} if filled is _FAILED else dict(zip(setting.sets, cast(tuple[Any, ...], filled), strict=True))
        value = self._plain(setting, mapping, key, path, default)
        if setting.check is not None:
            checked = self._checked(setting, value, mapping, key, path, tuple(earlier[n] for n in setting.needs))
            value = default if checked is _FAILED else checked
        return {name: value}

    def _plain(self, setting: Setting, mapping: LocatedDict, key: str, path: str, default: Any) -> Any:
        if setting.kind == schema.NUMBER:
            return self._number(mapping, key, path, default, setting)
        if setting.kind == schema.INTEGER:
            return self._integer(mapping, key, path, default, int(setting.low), int(setting.high))
        if setting.kind == schema.FLAG:
            return self._flag(mapping, key, path, default)
        if setting.kind == schema.TEXT:
            return self.text(mapping, key, path, default)
        return mapping.get(key, default)  # schema.ANY

    def _checked(self, setting: Setting, value: Any, mapping: LocatedDict, key: str, path: str,
                 needed: tuple[Any, ...]) -> Any:
        assert setting.check is not None
        try:
            return setting.check(value, *needed)
        except ValueError as error:
            self.problem(mapping.lines.get(key, mapping.line), _join(path, key), str(error))
            return _FAILED

    # -- primitives --

    def section(self, parent: Any, key: str, path: str, allowed: tuple[str, ...]) -> LocatedDict:
        """A mapping under `key` (empty when absent), with unknown keys reported."""
        value = parent.get(key) if isinstance(parent, Mapping) else None
        if value is None:
            empty = LocatedDict()
            present = isinstance(parent, LocatedDict) and key in parent
            empty.line = _line(parent, key) if present else 0
            return empty
        if not isinstance(value, LocatedDict):
            self.problem(_line(parent, key), path, f"expected a mapping of {', '.join(allowed)}")
            return LocatedDict()
        self.unknown_keys(value, path, allowed)
        return value

    def unknown_keys(self, mapping: LocatedDict, path: str, allowed: tuple[str, ...]) -> None:
        for key in mapping:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                advice = f"did you mean {hint[0]!r}?" if hint else f"expected one of: {', '.join(allowed)}"
                self.problem(mapping.lines.get(key, mapping.line), _join(path, key), f"unknown key; {advice}")

    def _number(self, mapping: LocatedDict, key: str, path: str, default: Any, setting: Setting) -> Any:
        """A number in (low, high]; with zero_is_off, 0 too."""
        if key not in mapping:
            return default
        value = mapping[key]
        low, high = setting.low, setting.high
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or not (low < value <= high or (setting.zero_is_off and value == 0)):
            bounds = f"from {low:g} to {high:g}" if setting.zero_is_off else f"above {low:g} and at most {high:g}"
            self.problem(mapping.lines[key], _join(path, key),
                         f"expected a number of {setting.unit} {bounds}, got {quoted(value)}")
            return default
        return float(value)

    def _integer(self, mapping: LocatedDict, key: str, path: str, default: Any, low: int, high: int) -> Any:
        if key not in mapping:
            return default
        value = mapping[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.problem(mapping.lines[key], _join(path, key),
                         f"expected a whole number from {low} to {high}, got {quoted(value)}")
            return default
        return value

    def _flag(self, mapping: LocatedDict, key: str, path: str, default: Any) -> Any:
        if key not in mapping:
            return default
        value = mapping[key]
        if not isinstance(value, bool):
            self.problem(mapping.lines[key], _join(path, key), f"expected true or false, got {quoted(value)}")
            return default
        return value

    def text(self, mapping: LocatedDict, key: str, path: str, default: Any = None) -> Any:
        """The text under `key` (a YAML number as its text); `default` when absent or not text."""
        if key not in mapping:
            return default
        value = mapping[key]
        if isinstance(value, bool):
            self.problem(mapping.lines[key], _join(path, key),
                         f"YAML read this as {quoted(value)}; put the value in quotes")
            return default
        if isinstance(value, (int, float, str)):
            return str(value)
        self.problem(mapping.lines[key], _join(path, key), f"expected text, got {_kind(value)}")
        return default

    def items(self, mapping: LocatedDict, key: str, path: str) -> list[tuple[int, str, Any]] | None:
        """A list (or a single value, read as a list of one) as (line, path, item) triples."""
        if key not in mapping:
            return None
        value = mapping[key]
        line = mapping.lines[key]
        if isinstance(value, LocatedList):
            return [(value.lines[i], f"{_join(path, key)}[{i}]", item) for i, item in enumerate(value)]
        if isinstance(value, LocatedDict):
            self.problem(line, _join(path, key), "expected a list or a single value, got a mapping")
            return []
        return [(line, _join(path, key), value)]

    def choices(self, mapping: LocatedDict, key: str, path: str,
                allowed: tuple[str, ...], upper: bool = True) -> frozenset[str] | None:
        found = self.items(mapping, key, path)
        if found is None:
            return None
        chosen = set()
        for line, item_path, item in found:
            text = "" if item is None else str(item)
            text = text.upper() if upper else text
            if isinstance(item, (LocatedDict, LocatedList, bool)) or text not in allowed:
                shown = ", ".join(a or '""' for a in allowed)
                self.problem(line, item_path, f"{quoted(item)} is not one of: {shown}")
            else:
                chosen.add(text)
        return frozenset(chosen)


def _line(parent: Any, key: str) -> int:
    if isinstance(parent, LocatedDict):
        return parent.lines.get(key, parent.line)
    return 0


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _kind(value: Any) -> str:
    if isinstance(value, LocatedDict):
        return "a mapping"
    if isinstance(value, LocatedList):
        return "a list"
    return type(value).__name__
