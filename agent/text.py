"""Free text people type (reasons, descriptions): what may be in it.

It ends up in journals, the audit log, terminals, CSV and web pages. Control
characters (Unicode category Cc: C0 such as newline and escape, DEL, C1 such as
U+0085 "next line" or U+009B, an 8-bit terminal escape) would split a log line
or drive a terminal; bidi formatting characters (U+202E and friends) make a line
read differently from what it says. Both are refused, never stripped: the
record must be what the person typed.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated

from pydantic import AfterValidator, Field

BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                          "\u2066\u2067\u2068\u2069")
MAX_TEXT = 500


def hostile_characters(text: str) -> list[str]:
    """The refused characters of `text`, as U+XXXX names (empty: the text is fine)."""
    return sorted({f"U+{ord(ch):04X}" for ch in text
                   if unicodedata.category(ch) == "Cc" or ch in BIDI_CONTROLS})


def check_text(value: str) -> str:
    bad = hostile_characters(value)
    if bad:
        raise ValueError(f"contains control or bidi formatting characters ({', '.join(bad)}): "
                         "type plain text on one line")
    return value


def check_reason(value: str) -> str:
    text = check_text(value).strip()
    if not text:
        raise ValueError("a reason is required (say why, for the audit trail)")
    return text


FreeText = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(check_text)]
Reason = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(check_reason)]
