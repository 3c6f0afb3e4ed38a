"""The network value types every layer shares (standard library only, so that the boot
path and the renderer load without the config's validation machinery)."""

from __future__ import annotations

import ipaddress
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Proto = Literal["tcp", "udp", "icmp"]
Direction = Literal["in", "out", "both"]
