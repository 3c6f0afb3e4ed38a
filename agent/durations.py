"""Durations people type: 90s, 15m, 4h, 2d (standard library only)."""

from __future__ import annotations

import re


def parse_duration(text: str) -> int:
    """'90s', '15m', '4h', '2d' or plain seconds, as whole seconds."""
    match = re.fullmatch(r"\s*(\d{1,7})\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 4h or 2d")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return int(match.group(1)) * unit
