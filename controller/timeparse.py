"""Points in time as people type them: '2h' (ago), '2025-07-23', '2025-07-23T10:00Z', epoch."""

from __future__ import annotations

import datetime as dt
import re
from types import MappingProxyType

from controller.errors import InputError

_AGO = re.compile(r"^\s*(\d{1,7})\s*([smhdw])\s*$")
_UNITS = MappingProxyType({"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400})


def parse_when(text: str, now: float) -> float:
    """Epoch seconds for `text`; naive ISO times are taken as UTC."""
    text = text.strip()
    match = _AGO.fullmatch(text)
    if match:
        return now - int(match.group(1)) * _UNITS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"{text!r} is not a time: use 90m, 2h, 3d (ago), 2025-07-23, "
                         "2025-07-23T10:00Z or epoch seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()
