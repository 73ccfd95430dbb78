"""The config machinery: field checks that name the field and the allowed values, cache-dit's
config methods (``update`` / ``empty`` / ``reset``, partial configs and their merge), structural
fields (marked on the dataclass field), and named choices."""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Sequence

from ..errors import ConfigError


def fail(field: str, allowed: str, got: Any) -> None:
    raise ConfigError(f"{field} must be {allowed}, got {got!r}")


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(name, f"an int >= {minimum}", value)


def check_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(name, "a finite number", value)


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(name, "True or False", value)


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        fail(name, "one of " + ", ".join(map(repr, allowed)), value)


class ConfigBase:
    """cache-dit's config methods. ``update`` sets the given fields in place (None skipped, unknown
    names refused); ``empty`` / ``reset`` make a *partial* config, whose given fields alone override a
    base when merged (a ``ParamsModifier``, ``refresh_context``)."""

    def update(self, **changes: Any):
        _check_names(type(self), changes, f"{type(self).__name__}.update")
        for name, value in changes.items():
            if value is not None:
                setattr(self, name, value)
        self.__post_init__()
        return self

    def empty(self, **fields: Any):
        _check_names(type(self), fields, f"{type(self).__name__}.empty")
        partial = dataclasses.replace(self, **fields)
        partial._given = frozenset(fields)
        return partial

    reset = empty

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def changes(self) -> dict[str, Any]:
        """What this config changes when merged onto another: its given fields if partial, else every
        field that is not None (cache-dit's merge)."""
        given = getattr(self, "_given", None)
        if given is not None:
            return {name: getattr(self, name) for name in given}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


def _check_names(cls: type, fields: dict, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(known)}")


def merged(base, override):
    """``base`` with ``override``'s changes applied (neither is modified); ``base`` when no override.

    A full override of another config class replaces the base whole (FoCa after TaylorSeer, a
    ``DBPruneConfig`` or ``FirstBlockCacheConfig`` after a ``DBCacheConfig``, and back). A partial override
    (``reset(...)``, flat keyword fields) keeps the base's class; a field that class does not have is a
    ``ConfigError``."""
    if override is None:
        return base
    partial = getattr(override, "_given", None) is not None
    if base is None or (not partial and type(override) is not type(base)):
        return dataclasses.replace(override)
    cls = type(base)
    names = {f.name for f in dataclasses.fields(cls)}
    changes = override.changes()
    foreign = sorted(set(changes) - names)
    if foreign:
        raise ConfigError(f"{', '.join(foreign)}: not field(s) of {cls.__name__}, the config in force; give a full "
                          f"{type(override).__name__} to change the config class")
    values = {name: getattr(base, name) for name in names}
    values.update(changes)
    return cls(**values)


def coerce(value: Any, cls: type, field: str):
    """Accept a config object, a dict of its fields, or None (defaults)."""
    if value is None:
        return None
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for klass in (cls, *cls.__subclasses__()) for f in dataclasses.fields(klass)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"{field}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        try:
            # a class may pick a subclass from the fields (DBCacheConfig does, by cache_type)
            return cls.from_fields(value) if hasattr(cls, "from_fields") else cls(**value)
        except TypeError as e:  # a subclass's field given for the base class
            raise ConfigError(f"{field}: {e}") from None
    raise ConfigError(f"{field} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


class Choice(str, enum.Enum):
    """An option with a few named values; :meth:`parse` also takes the spellings users write."""

    @classmethod
    def parse(cls, value: Any, field: str):
        if isinstance(value, cls):
            return value
        aliases = cls._aliases()
        for key, member in aliases:
            if value is key or (isinstance(value, str) and value == key):
                return member
        allowed = ", ".join(repr(k) for k, _ in aliases)
        raise ConfigError(f"{field} must be one of {allowed}, got {value!r}")

    @classmethod
    def _aliases(cls) -> list[tuple[Any, "Choice"]]:
        return [(m.value, m) for m in cls]


def validated(config):
    """``config`` checked again where it is used: config objects are mutable dataclasses, and a field
    set after construction (``cfg.residual_diff_threshold = float("nan")``) skipped the check."""
    if config is not None:
        config.__post_init__()
    return config


def structural(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING):
    """A config field compiled into the graph (Fn / Bn, the calibrator's kind and order ...): changing it
    needs a new compile. The other fields are numbers loaded into a state tensor."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"structural": True})


def structural_fields(config) -> list[str]:
    """The names of ``config``'s structural fields, in declaration order."""
    return [f.name for f in dataclasses.fields(config) if f.metadata.get("structural")]
