"""Value checks shared by the config classes' validators."""

from __future__ import annotations


def check_positive_sizes(config, names: tuple[str, ...]) -> None:
    """Raise a ValueError naming the first of `names` whose value on `config` is not positive."""
    for name in names:
        value = getattr(config, name)
        if value <= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value}.")
