"""The one error every configuration check raises, whichever package owns the config."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is out of its allowed range (the message names the field, the
    value and what is allowed)."""


def check_field(cfg: object, name: str, ok: bool, allowed: str) -> None:
    """Raise :class:`ConfigError` ``<Class>.<name> = <value> is invalid: expected <allowed>``
    unless ``ok``."""
    if not ok:
        raise ConfigError(f"{type(cfg).__name__}.{name} = {getattr(cfg, name)!r} is invalid: "
                          f"expected {allowed}")


def is_int(value: object) -> bool:
    """An int that is not a bool (YAML's ``true`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = ["ConfigError", "check_field", "is_int"]
