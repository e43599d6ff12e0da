"""YAML loading that remembers where every key and list item stood in the file.

PyYAML's safe loader builds plain dicts and lists; ours builds `LocatedDict` / `LocatedList`
that also carry the line of each key and item, so validation can say "file:42: key: problem".
Duplicate keys, which PyYAML silently resolves to the last one, are reported as problems.
"""

from __future__ import annotations

from typing import Any

import yaml


class LocatedDict(dict):
    line: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.lines: dict[Any, int] = {}


class LocatedList(list):
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
                YamlProblem(line, f"key {key!r} appears twice (first on line {mapping.lines[key]})")
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
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else 0
        raise YamlProblem(line, f"YAML syntax: {error.problem or error}") from None
    except yaml.YAMLError as error:
        raise YamlProblem(0, f"YAML: {error}") from None
    finally:
        loader.dispose()
    return data, loader.duplicates
