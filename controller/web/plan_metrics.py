"""`drawbridge_plan_stage_info`: the stages of the latest restore plan and their states,
built at scrape time from the plan source (the stored plans: DbPlanSource)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.web.sources import STAGE_STATES, PlanView


class PlanStageCollector(Collector):
    """One series per stage of the most recent plan, value 1, labelled with its state;
    plus `drawbridge_plan_stages{state}`, how many of its stages are in each state."""

    def __init__(self, latest: Callable[[], PlanView | None]) -> None:
        self.latest = latest

    def collect(self) -> Iterable[Metric]:
        plan = self.latest()
        if plan is None:
            return
        info = GaugeMetricFamily(
            "drawbridge_plan_stage_info",
            "Stages of the latest restore plan: 1 per stage, its state in the label",
            labels=["plan_id", "plan", "stage", "index", "state"])
        counts = dict.fromkeys(STAGE_STATES, 0)
        for i, stage in enumerate(plan.stages, start=1):
            info.add_metric([plan.plan_id, plan.name, stage.name, str(i), stage.state], 1.0)
            counts[stage.state] = counts.get(stage.state, 0) + 1
        yield info
        by_state = GaugeMetricFamily("drawbridge_plan_stages",
                                     "Stages of the latest restore plan by state",
                                     labels=["plan_id", "state"])
        for state, n in counts.items():
            by_state.add_metric([plan.plan_id, state], float(n))
        yield by_state

    def describe(self) -> list[Metric]:
        return []  # no database read at registration time
