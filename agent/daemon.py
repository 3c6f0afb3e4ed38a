"""`drawbridge-agent run`: the reconcile loop, the local socket, scheduled work.

Stopping the daemon never touches the ruleset: isolation outlives the process
(and the kernel expires exceptions on its own).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler

from agent.config import AgentConfig
from agent.engine import Engine
from agent.errors import DrawbridgeError
from agent.localsock import LocalServer
from agent.rpc import Dispatcher

log = logging.getLogger("drawbridge.agent")


class Daemon:
    def __init__(self, config: AgentConfig, engine: Engine | None = None) -> None:
        self.config = config
        self.engine = engine or Engine(config)
        self.dispatcher = Dispatcher(self.engine)
        # A slow run must never pile up: one instance at a time, missed runs coalesce.
        self.scheduler = BackgroundScheduler(job_defaults={
            "coalesce": True, "max_instances": 1,
            "misfire_grace_time": max(1, int(config.reconcile_interval)),
        })
        self._stop = threading.Event()
        self._server: LocalServer | None = None

    def reconcile_once(self) -> None:
        try:
            repair = self.engine.reconcile()
        except DrawbridgeError as exc:
            log.error("reconcile failed: %s", exc, extra={"event": "reconcile_failed"})
            return
        if repair is not None:
            log.warning(
                "drift repaired", extra={"event": "drift_repaired", "drift": list(repair.problems),
                                         "profile": repair.profile, "in_sync": repair.in_sync},
            )

    def start(self) -> None:
        self.engine.store.ensure_dir()
        self.reconcile_once()  # at start: after a reboot the kernel holds nothing of ours
        self._server = LocalServer(self.engine.store.socket_path, self.dispatcher)
        self._server.start()
        self.scheduler.add_job(self.reconcile_once, "interval", id="reconcile",
                               seconds=self.config.reconcile_interval)
        self.scheduler.start()
        log.info("agent running", extra={"event": "started", "gateway": self.config.gateway,
                                          "socket": str(self.engine.store.socket_path)})

    def stop(self) -> None:
        self.scheduler.shutdown(wait=False)
        if self._server is not None:
            self._server.stop()
        log.info("agent stopped; ruleset left as it is", extra={"event": "stopped"})

    def run_forever(self) -> None:
        def _signal(signum: int, frame: FrameType | None) -> None:
            del frame
            log.info("signal %d", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        try:
            self._stop.wait()
        finally:
            self.stop()
