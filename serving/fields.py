"""Checks of one JSON field of a manifest each: the value, typed, or ManifestError naming
the field (serving.contract builds the Manifest from them). Standard library only."""

from __future__ import annotations

import math
from typing import Any


class ManifestError(ValueError):
    """A manifest that breaks the contract; the message names the field."""

    def __init__(self, key: str, message: str):
        super().__init__(f"'{key}' {message}")
        self.key = key


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ManifestError(key, f"must be a string, got {show(value)}")
    return value


def integer(value: Any, key: str) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 17.0: JSON writers that know only floats
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(key, f"must be an integer, got {show(value)}")
    return value


def dim(value: Any, key: str) -> int:  # "28" too, as hand-written manifests have it
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return integer(value, key)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def real(value: Any, key: str) -> float:
    if not is_number(value):
        raise ManifestError(key, f"must be a number, got {show(value)}")
    return float(value)


def fraction(value: Any, key: str) -> float:
    if not 0.0 <= real(value, key) <= 1.0:
        raise ManifestError(key, f"must be a fraction in 0..1, got {show(value)}")
    return float(value)


def per_channel(value: Any, key: str, channels: int, positive: bool = False) -> tuple[float, ...]:
    """One number per channel: in 0..1 (a training mean), or above 0 (a training std)."""
    ok = (lambda v: v > 0) if positive else (lambda v: 0.0 <= v <= 1.0)
    if not (
        isinstance(value, list)
        and len(value) == channels
        and all(is_number(v) and ok(v) for v in value)
    ):
        what = "positive value(s)" if positive else f"training-{key} value(s) in 0..1"
        shown = show(value)  # a manifest's value, quoted back: clipped
        raise ManifestError(key, f"must list {channels} {what} (one per channel), got {shown}")
    return tuple(float(v) for v in value)


def texts(value: Any, key: str) -> tuple[str, ...]:
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ManifestError(key, f"must be a list of strings, got {show(value)}")
    return tuple(value)


def mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(key, f"must be a JSON object, got {show(value)}")
    return value


def files(value: Any, key: str) -> dict[str, str | None]:
    """filename -> SHA-256 hex digest; None or "" for a file not checked. A digest that is
    not the file's refuses the version at load ("checksum"), whatever its form."""
    files = mapping(value, key)
    for name, digest in files.items():
        if digest is not None and not isinstance(digest, str):
            raise ManifestError(f"{key}.{name}", f"must be a SHA-256 hex digest, got {digest!r}")
    return files
