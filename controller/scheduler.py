"""State collection: APScheduler polls every gateway's status on an interval.

One poll at a time (a slow round never piles up; missed runs coalesce); the
first round starts right away, so a freshly started controller connects to its
fleet before the first command needs it.
"""

from __future__ import annotations

import datetime as dt
import logging

from apscheduler.schedulers.background import BackgroundScheduler

from controller.service import Controller

log = logging.getLogger("drawbridge.controller.scheduler")


class Poller:
    def __init__(self, ctl: Controller, interval_seconds: float) -> None:
        self.ctl = ctl
        self.interval = interval_seconds
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

    def start(self) -> None:
        self.scheduler.add_job(self.poll, "interval", id="poll", seconds=self.interval,
                               next_run_time=dt.datetime.now(dt.UTC))
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
