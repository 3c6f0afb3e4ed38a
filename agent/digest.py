"""Which config a gateway runs: the first 16 hex digits of the config file's SHA-256
(standard library only: the boot path compares it before loading anything else)."""

from __future__ import annotations

import hashlib


def config_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]
