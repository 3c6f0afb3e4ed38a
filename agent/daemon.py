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
from pathlib import Path
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler

from agent.config import AgentConfig, load_config_and_digest
from agent.engine import Engine
from agent.errors import DrawbridgeError
from agent.localsock import LocalServer
from agent.metrics import AgentCollector, DurationHistogram, Health, MetricsServer, make_registry
from agent.probes_bridge import ProbeService, verification_from, verifier_for
from agent.results import ChangeResult
from agent.rpc import Dispatcher
from agent.sdnotify import notify, reloading, watchdog_interval
from agent.state import DesiredState, Provisional, VerificationResult

log = logging.getLogger("drawbridge.agent")


class Daemon:
    def __init__(self, config: AgentConfig, engine: Engine | None = None,
                 probes: ProbeService | None = None, *, config_path: Path | None = None,
                 config_digest: str = "") -> None:
        self.config = config
        self.config_path = config_path
        self.probes = probes or ProbeService(config.probes)
        self.apply_durations = DurationHistogram()
        self.health = Health()
        self.engine = engine or Engine(config, config_digest=config_digest)
        # the daemon enforces confirmation deadlines, and keeps the configs a provisional
        # reload may have to return to
        self.engine.deadlines_enforced = True
        self.engine.on_config_rollback = self._config_rollback
        self._configs: dict[str, AgentConfig] = {self.engine.config_digest: config}
        # this daemon's probes verify every change, and every apply is timed for metrics
        self.engine.verifier = verifier_for(config, self.probes)
        self.engine.kernel.on_apply = self.apply_durations.observe
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
        self._wake = threading.Event()
        self._reload_asked = False
        self._server: LocalServer | None = None
        self._reconciled_at = time.monotonic()

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
        self._reconciled_at = time.monotonic()
        self.health.in_sync = True if repair is None else repair.in_sync
        if repair is not None:
            log.warning(
                "drift repaired", extra={"event": "drift_repaired", "drift": list(repair.problems),
                                         "profile": repair.profile, "in_sync": repair.in_sync},
            )

    def probe_sweep(self) -> None:
        """Run every probe; if the verdict on the current state changed, record it.
        Without probes the verdict is the reconcile loop's read-back alone."""
        started = time.time()
        try:
            state = self.engine.store.load()
            results = self.probes.run(isolated=state.isolated)
        except DrawbridgeError as exc:
            log.error("probe sweep failed: %s", exc, extra={"event": "probe_sweep_failed"})
            return
        in_sync = (self.health.in_sync if self.health.in_sync is not None
                   else "readback" not in state.verification.failing)
        checked = [r for r in results if r.expected != "any"]
        self.record_verification(state, verification_from(checked, in_sync, time.time()),
                                 started=started)

    def record_verification(self, seen: DesiredState, verdict: VerificationResult, *,
                            started: float | None = None) -> bool:
        """Store a sweep's verdict on `seen` unless a change came in since (the change
        verified itself) or a verdict was recorded after the sweep `started` (the state
        file is written before a change is applied: a sweep can read the new state while
        the kernel still holds the old one). Writes only when the verdict differs."""
        old = seen.verification
        if (old.status, old.failing) == (verdict.status, verdict.failing):
            return False
        store = self.engine.store
        try:
            with store.locked(timeout=5.0):
                current = store.load()
                if current.generation != seen.generation or current.profile != seen.profile:
                    return False
                checked_at = current.verification.checked_at
                if started is not None and checked_at is not None and checked_at >= started:
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

    def expire_once(self) -> None:
        """Roll back a provisional change nobody confirmed in time."""
        try:
            result = self.engine.expire()
        except DrawbridgeError as exc:
            log.error("rollback failed: %s", exc, extra={"event": "rollback_failed"})
            return
        if result is not None:
            log.warning("unconfirmed change rolled back: %s", result.note or result.action,
                        extra={"event": "rolled_back", "profile": result.profile,
                               "state": result.state})

    def watchdog_ping(self) -> None:
        """Tell systemd we live, but only while the reconcile loop makes progress: a loop
        stuck in libnftables or a probe must get the daemon restarted."""
        interval = watchdog_interval() or 0.0
        if time.monotonic() - self._reconciled_at < max(4 * interval,
                                                       3 * self.config.reconcile_interval):
            notify("WATCHDOG=1")

    def reload(self) -> None:
        """SIGHUP / `systemctl reload`: run the config file's current content, or refuse it
        and keep the old one (always with enforcement: one transaction)."""
        if self.config_path is None:
            log.warning("reload asked, but the daemon was not started from a file")
            return
        reloading()
        try:
            config, digest = load_config_and_digest(self.config_path)
            if digest == self.engine.config_digest:
                log.info("config unchanged (%s)", digest, extra={"event": "reload_unchanged"})
                return
            self._configs[digest] = config
            result = self.engine.reload(config, digest)
        except DrawbridgeError as exc:
            log.error("config reload refused, the running config stays: %s", exc,
                      extra={"event": "reload_refused"})
            self.engine.store.journal(action="reload", actor="agent", reason="config reload",
                                      result="refused", error=str(exc),
                                      config_digest=self.engine.config_digest)
            return
        finally:
            notify("READY=1")
        self._adopt(config)
        log.info("config reloaded: %s", digest, extra={
            "event": "reloaded", "config_digest": digest,
            "provisional": result.provisional is not None})

    def _config_rollback(self, due: Provisional) -> ChangeResult | None:
        old = self._configs.get(due.config_digest or "")
        if old is None:
            log.error("no previous config %s to return to", due.config_digest)
            return None
        result = self.engine.reload(old, due.config_digest or "", reason="reload not "
                                    "confirmed in time: previous config", confirm=False,
                                    action="rollback")
        self._adopt(old)
        return result

    def _adopt(self, config: AgentConfig) -> None:
        """What else follows the config: probes, job intervals (metrics listen address
        and the socket stay until a restart)."""
        self.config = config
        self.probes.probes = tuple(config.probes)
        self.engine.verifier = verifier_for(config, self.probes)
        for job, seconds in (("reconcile", config.reconcile_interval),
                             ("probes", config.probe_interval),
                             ("resolve", config.resolve_interval)):
            if self.scheduler.get_job(job) is not None:
                self.scheduler.reschedule_job(job, trigger="interval", seconds=seconds)

    def resolve_hosts(self) -> None:
        self.engine.hosts.refresh()
        for host, why in self.engine.hosts.failures().items():
            log.warning("management host %s: %s", host, why,
                        extra={"event": "resolve_failed", "host": host})

    def start(self) -> None:
        """Enforce first (a deadline that passed while the daemon was down, then the
        desired state: after a reboot the kernel may hold nothing of ours), serve, and only
        then do the slow work: compiling every profile, resolving hostnames, probing."""
        self.engine.store.ensure_dir()
        self.expire_once()
        self.reconcile_once()
        self._server = LocalServer(self.engine.store.socket_path, self.dispatcher)
        self._server.start()
        self._start_metrics()
        soon = datetime.now().astimezone() + timedelta(seconds=0.1)
        self.scheduler.add_job(self._warm_up, "date", id="warm_up", run_date=soon)
        self.scheduler.add_job(
            self.reconcile_once, "interval", id="reconcile",
            seconds=self.config.reconcile_interval,
            misfire_grace_time=max(1, int(self.config.reconcile_interval)),
        )
        self.scheduler.add_job(self.expire_once, "interval", id="expire", seconds=1.0)
        if (interval := watchdog_interval()) is not None:
            self.scheduler.add_job(self.watchdog_ping, "interval", id="watchdog",
                                   seconds=interval)
        if self.engine.hosts.hosts:
            self.scheduler.add_job(
                self.resolve_hosts, "interval", id="resolve",
                seconds=self.config.resolve_interval, next_run_time=soon,
                misfire_grace_time=max(1, int(self.config.resolve_interval)))
        self.scheduler.add_job(
            self.probe_sweep, "interval", id="probes", seconds=self.config.probe_interval,
            misfire_grace_time=max(1, int(self.config.probe_interval)),
            next_run_time=datetime.now().astimezone() + timedelta(seconds=0.1),
        )
        self.scheduler.start()
        notify("READY=1")
        log.info("agent running", extra={"event": "started", "gateway": self.config.gateway,
                                          "socket": str(self.engine.store.socket_path),
                                          "probes": len(self.config.probes)})

    def _warm_up(self) -> None:
        try:
            self.engine.warm_up()
        except DrawbridgeError as exc:
            log.error("profile check failed: %s", exc, extra={"event": "warm_up_failed"})

    def stop(self) -> None:
        notify("STOPPING=1")
        self.scheduler.shutdown(wait=False)
        if self._server is not None:
            self._server.stop()
        if self.metrics is not None:
            self.metrics.stop()
        log.info("agent stopped; ruleset left as it is", extra={"event": "stopped"})

    def run_forever(self) -> None:
        def _stop(signum: int, frame: FrameType | None) -> None:
            del frame
            log.info("signal %d", signum)
            self._stop.set()
            self._wake.set()

        def _reload(signum: int, frame: FrameType | None) -> None:
            del signum, frame
            self._reload_asked = True
            self._wake.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGHUP, _reload)
        self.start()
        try:
            while not self._stop.is_set():
                self._wake.wait()
                self._wake.clear()
                if self._reload_asked and not self._stop.is_set():
                    self._reload_asked = False
                    self.reload()
        finally:
            self.stop()
