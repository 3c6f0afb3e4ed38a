"""Who may open how much: the breadth of an exception by role (pure).

The agent refuses what its own gateway never allows (`[exceptions]` in
agent.toml, and 0.0.0.0/0 or ::/0 always); the controller narrows it further
for the operator role, so that an exception stays an exception and never
becomes a restore in all but name without an admin.
"""

from __future__ import annotations

from agent.nettypes import IPNetwork
from controller.auth import Principal, Role
from controller.config import ExceptionSettings
from controller.errors import Forbidden, InputError


def check_breadth(cidr: IPNetwork, principal: Principal, settings: ExceptionSettings) -> None:
    """Refuse /0 for anyone and anything wider than the operator limit for an operator."""
    if cidr.prefixlen == 0:
        raise InputError(f"{cidr} is the whole internet: an exception names one remote "
                         "network (restore the gateway instead)")
    widest = settings.operator_widest_prefix_v4 if cidr.version == 4 \
        else settings.operator_widest_prefix_v6
    if cidr.prefixlen < widest and not principal.can(Role.admin):
        raise Forbidden(f"{principal.user} is an operator: an operator's exception may open at "
                        f"most a /{widest} (IPv{cidr.version}); {cidr} needs an admin")
