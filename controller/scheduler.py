"""The controller's background work, on APScheduler: status polls, the restore plan
driver, audit checkpoints, and the refusal summaries.

Each job runs one at a time (a slow round never piles up; missed runs coalesce).
The first poll and the first plan tick start right away: a freshly started
controller connects to its fleet and resumes the plans it was driving before the
first command needs it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from controller.service import Controller

log = logging.getLogger("drawbridge.controller.scheduler")


class Poller:
    """Every job of a running controller (the name stays: it started with the polls)."""

    def __init__(self, ctl: Controller, interval_seconds: float, *, polls: bool = True) -> None:
        self.ctl = ctl
        self.interval = interval_seconds
        self.polls = polls
        self.scheduler = BackgroundScheduler(job_defaults={
            "coalesce": True, "max_instances": 1,
            "misfire_grace_time": max(1, int(interval_seconds)),
        })

    def poll(self) -> None:
        try:
            reach = self.ctl.poll_once()
        except Exception:  # a failed round must not stop the next one
            log.exception("status poll failed")
            return
        down = sorted(name for name, up in reach.items() if not up)
        if down:
            log.info("poll: %d reachable, unreachable: %s", len(reach) - len(down),
                     ", ".join(down))

    @staticmethod
    def _guarded(what: str, fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception:  # the next run must still come
                log.exception("%s failed", what)
        return run

    def start(self) -> None:
        now = dt.datetime.now(dt.UTC)
        ctl, cfg = self.ctl, self.ctl.config
        if self.polls:
            self.scheduler.add_job(self.poll, "interval", id="poll", seconds=self.interval,
                                   next_run_time=now)
        self.scheduler.add_job(self._guarded("plan driver", ctl.plans.driver.tick), "interval",
                               id="plans", seconds=cfg.plans.interval_seconds,
                               next_run_time=now)
        if cfg.audit.checkpoint_interval_seconds:
            self.scheduler.add_job(
                self._guarded("checkpoint", lambda: ctl.checkpoints.make("interval")),
                "interval", id="checkpoint", seconds=cfg.audit.checkpoint_interval_seconds)
        self.scheduler.add_job(self._guarded("refusal summaries", ctl.refusals.flush),
                               "interval", id="refusals",
                               seconds=max(1.0, cfg.audit.refusal_window_seconds / 4))
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
