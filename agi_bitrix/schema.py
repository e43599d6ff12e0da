"""Settings declared once: a dataclass field whose metadata says where it stands in the YAML.

Each setting is one line, read top to bottom the way Alertmanager declares a route field with its
checks beside it:

    deadline: float = number("deadline", 2.0, 0, 30)
    rate_burst: int = integer("rate_limit.burst", 40, 1, 100_000)

The key is relative to the section the dataclass is read from; a dot steps into a sub-mapping.
The default is the dataclass default; the bounds, the unit and a custom check sit beside it.
The checker (agi_bitrix.checking) reads a section from these declarations, and the keys a
section may hold come from them (`keys`), so nothing is written twice. A field without a
declaration is not in the file: the code that reads the section sets it.

This module depends on nothing else in the package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NUMBER = "number"  # int or float within bounds, kept as float
INTEGER = "integer"
FLAG = "flag"  # true or false
TEXT = "text"  # a string; a YAML number is taken as its text
ITEMS = "items"  # a list, or a single value read as a list of one; `check` is applied to each item
ANY = "any"  # the YAML value as it is, for `check` to judge
SECTION = "section"  # a mapping read as another declared dataclass
OWN = "own"  # read by the section's own code (the routing rules: agi_bitrix.routing.compiler)


@dataclass(frozen=True)
class Setting:
    key: str
    kind: str
    low: float = 0
    high: float = 0
    unit: str = "seconds"  # what a number counts, for messages
    zero_is_off: bool = False  # numbers: 0 is allowed besides (low, high] and switches the feature off
    # Custom check: takes the value in effect (the default when the key is absent or of the wrong
    # kind) and returns it, possibly converted; raises ValueError(message) when it is unusable,
    # and the default is used. ITEMS: called per item; a bad item is left out.
    check: Callable[..., Any] | None = None
    # Names of earlier fields of the same dataclass whose values `check` takes after the value.
    needs: tuple[str, ...] = ()
    # Names of the fields `check` fills: it returns a tuple of their values (one key, several fields).
    sets: tuple[str, ...] = ()
    settings: type | None = None  # SECTION: the declared dataclass of the sub-mapping
    # A change takes effect only after a restart: a reload keeps the value the process started with,
    # because the part that uses it is made once (a listener, a pool, the outbox). On a SECTION it
    # is said of the section's presence; its keys carry their own marks. `restart_changes` finds
    # them on reload; the settings reference shows them.
    restart: bool = False


_METADATA_KEY = "agi_bitrix.setting"


def _declare(default: Any, setting: Setting) -> Any:
    metadata = {_METADATA_KEY: setting}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def number(key: str, default: float, low: float, high: float, *, unit: str = "seconds",
           zero_is_off: bool = False, check: Callable[..., Any] | None = None,
           needs: tuple[str, ...] = (), restart: bool = False) -> Any:
    """A number of `unit` above `low` and at most `high` (with zero_is_off, 0 too)."""
    return _declare(default, Setting(key, NUMBER, low, high, unit, zero_is_off, check, needs, restart=restart))


def integer(key: str, default: int, low: int, high: int, *, restart: bool = False) -> Any:
    """A whole number from `low` to `high`."""
    return _declare(default, Setting(key, INTEGER, low, high, restart=restart))


def flag(key: str, default: bool, *, restart: bool = False) -> Any:
    return _declare(default, Setting(key, FLAG, restart=restart))


def text(key: str, default: Any = dataclasses.MISSING, *, check: Callable[..., Any] | None = None,
         sets: tuple[str, ...] = (), needs: tuple[str, ...] = (), restart: bool = False) -> Any:
    """Text; without a default the field is required and the section's reader supplies it."""
    return _declare(default, Setting(key, TEXT, check=check, needs=needs, sets=sets, restart=restart))


def items(key: str, default: Any, *, check: Callable[[Any], Any], restart: bool = False) -> Any:
    return _declare(default, Setting(key, ITEMS, check=check, restart=restart))


def anything(key: str, default: Any, *, check: Callable[[Any], Any], sets: tuple[str, ...] = (),
             restart: bool = False) -> Any:
    return _declare(default, Setting(key, ANY, check=check, sets=sets, restart=restart))


def section(key: str, settings: type, *, absent: Any = dataclasses.MISSING, restart: bool = False) -> Any:
    """A sub-mapping read as `settings`; its defaults are what an empty mapping gives.

    `absent` is the value without the key at all, when that differs from an empty mapping (a
    section whose presence switches a feature on). Without `absent` the field is required.
    `restart`: adding or removing the section takes effect only after a restart.
    """
    return _declare(absent, Setting(key, SECTION, settings=settings, restart=restart))


def own(key: str) -> Any:
    """A key that the code reading the section reads itself; declared so the key is known."""
    return _declare(dataclasses.MISSING, Setting(key, OWN))


def declared(settings: type) -> list[tuple[str, Setting]]:
    """(field name, declaration) of every field read from the file, in field order."""
    return [(f.name, f.metadata[_METADATA_KEY]) for f in dataclasses.fields(settings)
            if _METADATA_KEY in f.metadata]


def declaration(settings: type, name: str) -> Setting:
    setting: Setting = _field(settings, name).metadata[_METADATA_KEY]
    return setting


def keys(settings: type, under: str = "") -> tuple[str, ...]:
    """The keys a mapping of `settings` may hold (under a sub-mapping: its keys), in field order."""
    prefix = f"{under}." if under else ""
    found: dict[str, None] = {}
    for _, setting in declared(settings):
        if setting.key.startswith(prefix):
            found[setting.key[len(prefix):].split(".")[0]] = None
    return tuple(found)


def default(settings: type, name: str) -> Any:
    """The declared default of a field (dataclasses.MISSING when it is required)."""
    return _field(settings, name).default


def _field(settings: type, name: str) -> dataclasses.Field[Any]:
    return next(f for f in dataclasses.fields(settings) if f.name == name)


def not_shorter_than(key: str) -> Callable[[float, float], float]:
    """A check for a duration that may not be shorter than the one at `key` (its field given in
    `needs`): a backoff's `max` against its `first`, say."""

    def check(value: float, shortest: float) -> float:
        if value < shortest:
            raise ValueError(f"{value:g} is shorter than {key} ({shortest:g})")
        return value

    return check


def restart_keys(settings: type, under: str = "") -> list[str]:
    """The keys marked `restart`, sections before their keys, in field order."""
    found = []
    for _, setting in declared(settings):
        key = f"{under}{setting.key}"
        if setting.restart:
            found.append(key)
        if setting.kind == SECTION and setting.settings is not None:
            found.extend(restart_keys(setting.settings, f"{key}."))
    return found


def restart_changes(settings: type, old: Any, new: Any, under: str = "") -> list[str]:
    """The keys marked `restart` whose value differs between the instances `old` and `new` of
    `settings` (either may be None: a section that is absent). A section added or removed is
    named once, without its keys; the fields a key `sets` count as that key's value."""
    changed = []
    for name, setting in declared(settings):
        key = f"{under}{setting.key}"
        before, after = _value(settings, old, name), _value(settings, new, name)
        if setting.kind == SECTION and setting.settings is not None:
            absent = default(settings, name)
            if (before == absent) != (after == absent) and setting.restart:
                changed.append(key)
            elif before != after:
                changed.extend(restart_changes(setting.settings, before, after, f"{key}."))
        elif setting.restart and any(_value(settings, old, field) != _value(settings, new, field)
                                     for field in setting.sets or (name,)):
            changed.append(key)
    return changed


def _value(settings: type, instance: Any, name: str) -> Any:
    """The field's value; in an absent section (None), its default: what is in effect without it."""
    if instance is None:
        value = default(settings, name)
        return None if value is dataclasses.MISSING else value
    # A field read but not kept (config.Config.default_country) has no value on the instance.
    return getattr(instance, name, None)
