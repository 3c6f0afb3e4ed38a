"""Controller metrics on the API port's /metrics.

Counters and the latency histogram live in a registry owned by the running
controller (no global default registry); fleet gauges are built fresh at every
scrape from the state table, as prometheus/client_python recommends for
state that lives elsewhere.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.states import GatewayState

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class FleetCollector(Collector):
    def __init__(self, snapshot: Callable[[], tuple[list[str], dict[str, GatewayState]]],
                 audit_records: Callable[[], int]) -> None:
        self.snapshot = snapshot
        self.audit_records = audit_records

    def collect(self) -> Iterable[Metric]:
        names, states = self.snapshot()
        by_state: Tally[str] = Tally({"open": 0, "isolated": 0, "unknown": 0})
        by_verification: Tally[str] = Tally({"verified": 0, "unverified": 0, "unknown": 0})
        up = GaugeMetricFamily("drawbridge_controller_gateway_up",
                               "1 if the controller reached the gateway's agent at the last try",
                               labels=["gateway"])
        isolated = GaugeMetricFamily("drawbridge_controller_gateway_isolated",
                                     "1 if the gateway was isolated at the last look",
                                     labels=["gateway"])
        verified = GaugeMetricFamily("drawbridge_controller_gateway_verified",
                                     "1 if the gateway's current state was verified",
                                     labels=["gateway"])
        pending = 0
        for name in names:
            st = states.get(name) or GatewayState(name=name)
            state = st.state if st.state in ("open", "isolated") else "unknown"
            by_state[state] += 1
            ok = bool(st.in_sync) and st.verification in ("verified", "unknown") \
                if st.state == "open" else bool(st.in_sync) and st.verification == "verified"
            vkey = "unknown" if st.state is None else ("verified" if ok else "unverified")
            by_verification[vkey] += 1
            up.add_metric([name], 1.0 if st.reachable else 0.0)
            isolated.add_metric([name], 1.0 if st.state == "isolated" else 0.0)
            verified.add_metric([name], 1.0 if ok else 0.0)
            pending += st.pending is not None
        gw = GaugeMetricFamily("drawbridge_controller_gateways",
                               "Gateways in the inventory by last known state",
                               labels=["state"])
        for key, value in sorted(by_state.items()):
            gw.add_metric([key], value)
        ver = GaugeMetricFamily("drawbridge_controller_gateways_verification",
                                "Gateways by whether their last known state was verified",
                                labels=["status"])
        for key, value in sorted(by_verification.items()):
            ver.add_metric([key], value)
        yield gw
        yield ver
        yield up
        yield isolated
        yield verified
        yield GaugeMetricFamily("drawbridge_controller_pending_changes",
                                "Accepted state changes waiting for an unreachable gateway",
                                value=pending)
        yield GaugeMetricFamily("drawbridge_controller_audit_records",
                                "Records in the audit log", value=self.audit_records())


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.commands = Counter(
            "drawbridge_controller_commands", "Commands by verb and overall result",
            ["verb", "result"], registry=self.registry)
        self.gateway_results = Counter(
            "drawbridge_controller_gateway_results",
            "Per-gateway results of commands, by verb and outcome",
            ["verb", "outcome"], registry=self.registry)
        self.latency = Histogram(
            "drawbridge_controller_command_duration_seconds",
            "Time from accepting a command to the last gateway's result",
            ["verb"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.refusals = Counter(
            "drawbridge_controller_refusals", "API requests refused, by reason",
            ["reason"], registry=self.registry)
        self.polls = Counter(
            "drawbridge_controller_polls", "Status polls by result", ["result"],
            registry=self.registry)
        self.refusals_aggregated = Counter(
            "drawbridge_controller_refusals_aggregated",
            "Refused requests counted into a summary record instead of one record each",
            registry=self.registry)
        self.audit_alarm = Gauge(
            "drawbridge_controller_audit_tamper_alarm",
            "1 while a tamper alarm holds the audit log (writes refused until an admin "
            "acknowledges it)", registry=self.registry)
        self.audit_alarms = Counter(
            "drawbridge_controller_audit_tamper_alarms",
            "Tamper alarms raised (the chain did not hold the head the controller wrote)",
            registry=self.registry)
        self.checkpoint_seq = Gauge(
            "drawbridge_controller_audit_checkpoint_seq",
            "The audit seq of the last signed checkpoint this controller made",
            registry=self.registry)
        self.checkpoint_misses = Counter(
            "drawbridge_controller_audit_checkpoint_misses",
            "Checkpoints a gateway did not record", ["gateway"], registry=self.registry)
        self.plan_steps = Counter(
            "drawbridge_controller_plan_steps", "Restore plan driver steps by kind",
            ["step"], registry=self.registry)

    def attach(self, collector: Collector) -> None:
        self.registry.register(collector)
