"""`drawbridge-agent run`: the reconcile loop, probe sweeps, metrics, the local socket.

Stopping the daemon never touches the ruleset: isolation outlives the process
(and the kernel expires exceptions on its own).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import datetime, timedelta
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler

from agent.config import AgentConfig
from agent.engine import Engine
from agent.errors import DrawbridgeError
from agent.localsock import LocalServer
from agent.metrics import AgentCollector, DurationHistogram, Health, MetricsServer, make_registry
from agent.probes_bridge import ProbeService, verification_from, verifier_for
from agent.rpc import Dispatcher
from agent.state import DesiredState, VerificationResult

log = logging.getLogger("drawbridge.agent")


class Daemon:
    def __init__(self, config: AgentConfig, engine: Engine | None = None,
                 probes: ProbeService | None = None) -> None:
        self.config = config
        self.probes = probes or ProbeService(config.probes)
        self.apply_durations = DurationHistogram()
        self.health = Health()
        self.engine = engine or Engine(config)
        # this daemon's probes verify every change, and every apply is timed for metrics
        self.engine.verifier = verifier_for(config, self.probes)
        self.engine.on_apply = self.apply_durations.observe
        self.dispatcher = Dispatcher(self.engine, probe=self.probes.handler(self.engine.store))
        # A slow run must never pile up: one instance at a time, missed runs coalesce.
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        self.collector = AgentCollector(
            gateway=config.gateway, store=self.engine.store, counters=self.engine.nft.counters,
            probes=self.probes.latest, last_sweep=lambda: self.probes.last_sweep_at,
            drift_repairs=lambda: self.engine.stats.drift_repairs,
            bypass_paths=lambda: len(self.engine.stats.bypass),
            unresolved=lambda: len(self.engine.hosts.failures()),
            apply=self.apply_durations, health=self.health,
            probe_order=[p.name for p in config.probes],
        )
        self.registry = make_registry(self.collector)
        self.metrics: MetricsServer | None = None
        self._stop = threading.Event()
        self._server: LocalServer | None = None

    # -- jobs ------------------------------------------------------------------------------

    def reconcile_once(self) -> None:
        try:
            repair = self.engine.reconcile()
        except DrawbridgeError as exc:
            self.health.reconcile_ok = False
            log.error("reconcile failed: %s", exc, extra={"event": "reconcile_failed"})
            return
        self.health.reconcile_ok = True
        self.health.reconcile_at = time.time()
        self.health.in_sync = True if repair is None else repair.in_sync
        if repair is not None:
            log.warning(
                "drift repaired", extra={"event": "drift_repaired", "drift": list(repair.problems),
                                         "profile": repair.profile, "in_sync": repair.in_sync},
            )

    def probe_sweep(self) -> None:
        """Run every probe; if the verdict on the current state changed, record it.
        Without probes the verdict is the reconcile loop's read-back alone."""
        try:
            state = self.engine.store.load()
            results = self.probes.run(isolated=state.isolated)
        except DrawbridgeError as exc:
            log.error("probe sweep failed: %s", exc, extra={"event": "probe_sweep_failed"})
            return
        in_sync = (self.health.in_sync if self.health.in_sync is not None
                   else "readback" not in state.verification.failing)
        checked = [r for r in results if r.expected != "any"]
        self.record_verification(state, verification_from(checked, in_sync, time.time()))

    def record_verification(self, seen: DesiredState, verdict: VerificationResult) -> bool:
        """Store a sweep's verdict on `seen` unless a change came in since (the change
        verified itself). Writes only when the verdict differs. True if written."""
        old = seen.verification
        if (old.status, old.failing) == (verdict.status, verdict.failing):
            return False
        store = self.engine.store
        try:
            with store.locked(timeout=5.0):
                current = store.load()
                if current.generation != seen.generation or current.profile != seen.profile:
                    return False
                store.save(current.model_copy(update={"verification": verdict}))
                store.journal(action="verify", actor="agent", reason="probe sweep",
                              profile=current.profile, result=verdict.status,
                              failing=list(verdict.failing), generation=current.generation)
        except DrawbridgeError as exc:  # busy lock, unwritable state dir
            log.warning("could not record verification: %s", exc)
            return False
        level = logging.INFO if verdict.status == "verified" else logging.WARNING
        log.log(level, "verification changed: %s", verdict.status,
                extra={"event": "verification_changed", "status": verdict.status,
                       "failing": list(verdict.failing)})
        return True

    # -- lifecycle ---------------------------------------------------------------------------

    def _start_metrics(self) -> None:
        if not self.config.metrics.enabled:
            return
        server = MetricsServer(self.registry, self.config.metrics.host, self.config.metrics.port)
        try:
            server.start()
        except OSError as exc:
            # isolation matters more than its metrics: keep enforcing, say so loudly
            log.error("cannot serve metrics on %s: %s", self.config.metrics.listen, exc,
                      extra={"event": "metrics_failed"})
            return
        self.metrics = server
        log.info("metrics on %s", self.config.metrics.listen, extra={"event": "metrics_started"})

    def resolve_hosts(self) -> None:
        self.engine.hosts.refresh()
        for host, why in self.engine.hosts.failures().items():
            log.warning("management host %s: %s", host, why,
                        extra={"event": "resolve_failed", "host": host})

    def start(self) -> None:
        self.engine.store.ensure_dir()
        self.resolve_hosts()  # at most resolve_timeout; the cached answers hold meanwhile
        try:
            self.engine.warm_up()
        except DrawbridgeError as exc:
            log.error("profile check failed: %s", exc, extra={"event": "warm_up_failed"})
        self.reconcile_once()  # at start: after a reboot the kernel holds nothing of ours
        self._start_metrics()
        self._server = LocalServer(self.engine.store.socket_path, self.dispatcher)
        self._server.start()
        self.scheduler.add_job(
            self.reconcile_once, "interval", id="reconcile",
            seconds=self.config.reconcile_interval,
            misfire_grace_time=max(1, int(self.config.reconcile_interval)),
        )
        if self.engine.hosts.hosts:
            self.scheduler.add_job(
                self.resolve_hosts, "interval", id="resolve",
                seconds=self.config.resolve_interval,
                misfire_grace_time=max(1, int(self.config.resolve_interval)))
        self.scheduler.add_job(
            self.probe_sweep, "interval", id="probes", seconds=self.config.probe_interval,
            misfire_grace_time=max(1, int(self.config.probe_interval)),
            next_run_time=datetime.now().astimezone() + timedelta(seconds=0.1),
        )
        self.scheduler.start()
        log.info("agent running", extra={"event": "started", "gateway": self.config.gateway,
                                          "socket": str(self.engine.store.socket_path),
                                          "probes": len(self.config.probes)})

    def stop(self) -> None:
        self.scheduler.shutdown(wait=False)
        if self._server is not None:
            self._server.stop()
        if self.metrics is not None:
            self.metrics.stop()
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
