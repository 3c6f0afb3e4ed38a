"""A replica's gauges on /metrics: the gateways it holds, and the live replicas."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.errors import ControllerError

if TYPE_CHECKING:
    from controller.replicas import Replicas


class ReplicaCollector(Collector):
    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas

    def collect(self) -> Iterable[Metric]:
        me = self.replicas.me.replica_id
        held = GaugeMetricFamily("drawbridge_controller_leases_held",
                                 "Gateways whose lease this replica holds", labels=["replica"])
        held.add_metric([me], float(len(self.replicas.held())))
        yield held
        try:
            live = sum(r.live for r in self.replicas.overview())
        except ControllerError:
            return  # the database is away: no number rather than a wrong one
        replicas = GaugeMetricFamily("drawbridge_controller_replicas_live",
                                     "Controller replicas with a fresh heartbeat")
        replicas.add_metric([], float(live))
        yield replicas
