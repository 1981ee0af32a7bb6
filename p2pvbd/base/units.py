"""Human sizes ("20G", "1.5T", "64K") to bytes and back.

The rule, stated once for every command and setting: K, M, G, T, P are powers of 1024 (KiB, MiB, … mean
the same); "KB", "MB", … are refused, because half the world reads them as powers of 1000 and a disk 7%
smaller than meant is found out too late; a bare number is bytes. Decimals are fine when they make whole
bytes ("1.5G")."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(iB|B)?\s*$", re.IGNORECASE)
SIZE_RULE = "K, M, G, T are powers of 1024 (KiB, MiB, … too); a bare number is bytes; decimals are fine (1.5G)"


def parse_size(text: str) -> int:
    """Bytes from e.g. '512', '64K', '1.5G', '20GiB'; ValueError with the rule otherwise."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (expected e.g. 64K, 1.5G, 20G: {SIZE_RULE})")
    number, suffix, unit = m.group(1), m.group(2).upper(), m.group(3)
    if unit and unit.upper() == "B" and suffix:
        raise ValueError(f"{text!r} is ambiguous (powers of 1000 or 1024?): write {number}{suffix} or "
                         f"{number}{suffix}iB, powers of 1024")
    if unit and unit.upper() == "IB" and not suffix:
        raise ValueError(f"not a size: {text!r} (expected e.g. 64K, 1.5G, 20G: {SIZE_RULE})")
    try:
        value = Decimal(number) * _SUFFIXES[suffix]
    except InvalidOperation as e:  # pragma: no cover - the pattern admits only decimal numbers
        raise ValueError(f"not a size: {text!r}") from e
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: float) -> str:
    """Shortest binary-suffixed rendering, e.g. 20 GiB, 1.5 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or float(n).is_integer() else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
