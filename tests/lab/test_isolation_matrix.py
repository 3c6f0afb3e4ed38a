"""Every row of the flow table in docs/design.md, before isolation, during, and after restore,
with real TCP, UDP and ICMP packets, IPv4 and IPv6."""

from __future__ import annotations

import pytest

from drawbridge_lab.flows import check_flows, flow_matrix, matrix_mismatches
from tests.lab.agent_rig import AgentRig

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("profile", ["internet", "full"])
def test_flow_table(rig: AgentRig, profile: str) -> None:
    flows = flow_matrix(rig.lab, rig.gw)
    assert matrix_mismatches(check_flows(flows), "open") == []

    rig.cli("isolate", "--profile", profile, "--reason", "precaution: NetScaler advisory")
    status = rig.status()
    assert status["state"] == "isolated" and status["profile"] == profile
    assert status["in_sync"] is True
    isolated = check_flows(flows)
    assert matrix_mismatches(isolated, profile) == []
    assert matrix_mismatches(isolated, "open") != []  # the packets really were cut

    rig.cli("restore", "--reason", "investigation closed")
    assert not rig.has_table()
    assert matrix_mismatches(check_flows(flows), "open") == []
