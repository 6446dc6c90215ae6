"""Wiring of seqsvc: settings -> store -> allocator -> gRPC servicer.

`python -m seqsvc` binds its port (exiting if it cannot), applies the migrations,
registers as a live instance (exiting if a live process is registered under this
instance's id), claims its share of the sections, then serves; it keeps claiming
and releasing sections as instances join and leave. `python -m seqsvc migrate`
only applies the migrations;
`python -m seqsvc raise-floor --at-least N` raises every key's floor (restores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imcommon.config import ConfigError, load_settings
from imcommon.server import Runtime, StartupError
from imcommon.server import main as serve_main
from seqsvc.allocator import Allocator, Boot, DuplicateInstance
from seqsvc.config import Settings
from seqsvc.repo import LeaseHeld, PgSectionStore, migrate, raise_floor
from seqsvc.servicer import SERVICE_NAME, SeqServicer, add_to_server
from seqsvc.teams import NO_TEAM, UNAUTHENTICATED, Teams, TeamsError, TeamsFileWatch

log = logging.getLogger(__name__)


def instance_id(settings: Settings) -> str:
    """The lease identity: configured, or hostname:port (unique among live processes
    on a host, and stable across a restart on the same port). A restart takes over
    its own lease at once when it can prove its predecessor gone (see `listener`)."""
    if settings.instance_id:
        return settings.instance_id
    host = socket.gethostname()
    if settings.port:
        return f"{host}:{settings.port}"
    return f"{host}:pid{os.getpid()}"


def listener(host: str, port: int) -> str:
    """Names the address this process has bound, uniquely on this machine while it
    is bound: '<boot id>/<network namespace>/<host>:<port>'. Equal names mean the
    same socket address in the same network namespace since the same boot, which
    only one process can listen on (SO_REUSEPORT is off). '' when that cannot be
    established (not Linux, or `host` is a name, whose address could change): an
    empty listener proves nothing."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        netns = os.readlink("/proc/self/ns/net")
    except (ValueError, OSError):
        return ""
    return f"{boot_id}/{netns}/{host}:{port}" if boot_id and netns else ""


def this_boot(settings: Settings, port: int) -> Boot:
    return Boot(nonce=secrets.token_hex(16), listener=listener(settings.host, port))


def advertised_address(settings: Settings, port: int) -> str:
    """Where clients reach this instance (the routing table lists it): the
    configured advertise address, or host:port as bound (the host name for a
    wildcard host)."""
    if settings.advertise_address:
        return settings.advertise_address
    host = settings.host
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.getfqdn()
    return f"{host}:{port}"


def make_allocator(
    settings: Settings, store: PgSectionStore, boot: Boot | None = None, address: str = ""
) -> Allocator:
    return Allocator(
        store,
        sections=settings.sections,
        step=settings.step,
        prefetch_ratio=settings.prefetch_ratio,
        max_step_factor=settings.max_step_factor,
        step_target_s=settings.step_target_s,
        max_batch=settings.max_batch,
        max_reserve=settings.max_reserve,
        max_keys=settings.max_keys,
        wait_timeout_s=settings.wait_timeout_s,
        store_timeout_s=settings.store_timeout_s,
        retry_min_s=settings.retry_min_s,
        retry_max_s=settings.retry_max_s,
        lease_s=settings.lease_s,
        standby_poll_s=settings.standby_poll_s,
        routing_poll_s=settings.routing_poll_s,
        instance_id=instance_id(settings),
        address=address,
        boot=boot,
        unsafe_serve_past_lease=settings.test_unsafe_serve_past_lease,
    )


def open_serve_log(path: str, allocator: Allocator) -> Callable[[], None]:
    """Appends every serving window of `allocator` to `path` as a JSON line
    {instance, section, epoch, from, until} (wall clock seconds; the last line of a
    (section, epoch) holds its final `until`). Returns the close function."""
    out = open(path, "a", buffering=1)  # noqa: SIM115 (closed by the returned function)
    me = allocator.instance_id

    def write(section: int, epoch: int, since: float, until: float) -> None:
        offset = time.time() - time.monotonic()
        out.write(
            json.dumps(
                {"instance": me, "section": section, "epoch": epoch,
                 "from": since + offset, "until": until + offset}
            ) + "\n"
        )  # fmt: skip

    allocator.on_window = write
    return out.close


class _AllocatorCollector(Collector):
    """Reads the allocator's plain-int counters at scrape time, so the hot path
    only does an integer add."""

    def __init__(self, allocator: Allocator) -> None:
        self._a = allocator

    def collect(self) -> Iterator[Metric]:
        a = self._a
        gauges: list[tuple[str, str, float]] = [
            ("im_seqsvc_serving", "1 while this instance serves the sections", a.serving),
            ("im_seqsvc_epoch", "Highest fencing epoch among the sections held", a.epoch),
            ("im_seqsvc_sections_held", "Sections this instance holds", len(a.held)),
            ("im_seqsvc_routing_version", "Routing table version last read", a.routing.version),
            ("im_seqsvc_keys_in_memory", "Keys whose cur_seq is in memory", a.keys_in_memory),
        ]
        counters: list[tuple[str, str, float]] = [
            ("im_seqsvc_allocated", "Values handed out (Next, NextBatch, Reserve)", a.allocated),
            ("im_seqsvc_evictions", "Keys evicted from memory", a.evictions),
            ("im_seqsvc_store_writes", "Step reservations committed", a.store_writes),
            ("im_seqsvc_store_failures", "Step reservations that failed", a.store_failures),
            ("im_seqsvc_waits", "Calls that waited for a step reservation (boundary waits)",
             a.waits),
            ("im_seqsvc_section_claims", "Sections claimed", a.claims),
            ("im_seqsvc_section_releases", "Sections released (balancing)", a.releases),
            ("im_seqsvc_section_losses", "Sections lost to another instance (lease ran out)",
             a.losses),
        ]  # fmt: skip
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=float(value))
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=float(value))


class _TeamsCollector(Collector):
    """Per-team counters, read at scrape time from the teams' plain ints."""

    def __init__(self, teams: Teams, watch: TeamsFileWatch) -> None:
        self._teams = teams
        self._watch = watch

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "im_seqsvc_team_calls", "Calls admitted, by team", labels=["team"]
        )
        values = CounterMetricFamily(
            "im_seqsvc_team_values",
            "Values charged to the team's quota by admitted calls (Current counts 1)",
            labels=["team"],
        )
        refusals = CounterMetricFamily(
            "im_seqsvc_team_refusals",
            "Calls refused by the namespace check, by team and reason "
            "(unauthenticated, permission_denied, quota)",
            labels=["team", "reason"],
        )
        for team in self._teams:
            calls.add_metric([team.name], team.calls)
            values.add_metric([team.name], team.values)
            for reason, count in team.refusals.items():
                refusals.add_metric([team.name, reason], count)
        refusals.add_metric([NO_TEAM, UNAUTHENTICATED], self._teams.anonymous_refusals)
        yield calls
        yield values
        yield refusals
        yield CounterMetricFamily(
            "im_seqsvc_teams_reload_failures",
            "Changes of the teams file that did not load (the teams in force stayed)",
            value=self._watch.failures,
        )


async def watch_teams(watch: TeamsFileWatch, poll_s: float, stop: asyncio.Event) -> None:
    """Reloads the teams file when it changes (checked every `poll_s`)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(poll_s):
                await stop.wait()
        watch.poll()


def load_teams(settings: Settings, runtime: Runtime) -> Teams | None:
    """The teams of IM_SEQSVC_TEAMS_FILE, reloaded on SIGHUP and on change; None
    without a file (open service). Raises StartupError if the file does not load."""
    if not settings.teams_file:
        log.warning("no IM_SEQSVC_TEAMS_FILE: every caller may use every key")
        return None
    teams = Teams()
    watch = TeamsFileWatch(settings.teams_file, teams)
    try:
        watch.load()
    except TeamsError as exc:
        raise StartupError(str(exc)) from None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, watch.reload)
    runtime.stack.callback(loop.remove_signal_handler, signal.SIGHUP)
    if settings.teams_poll_s:
        runtime.spawn(
            watch_teams(watch, settings.teams_poll_s, runtime.stop_requested), "seqsvc-teams"
        )
    runtime.metrics.registry.register(_TeamsCollector(teams, watch))
    return teams


def register_metrics(runtime: Runtime, allocator: Allocator) -> None:
    """Allocator counters and gauges (read at scrape time) and the store-write
    latency histogram."""
    runtime.metrics.registry.register(_AllocatorCollector(allocator))
    latency = runtime.metrics.histogram(
        "seqsvc_store_write_seconds", "Latency of one step reservation (PostgreSQL write)"
    )
    allocator.on_store_write = latency.observe


async def migrate_with_retry(settings: Settings, stop: asyncio.Event) -> bool:
    """Applies the migrations, retrying while PostgreSQL is unreachable (so a
    database restart at the same moment does not crash the service). False if
    `stop` was set first."""
    backoff = settings.retry_min_s
    while not stop.is_set():
        try:
            async with asyncio.timeout(settings.store_timeout_s * 5):
                applied = await migrate(settings.database_url)
        except (OSError, TimeoutError, psycopg.OperationalError) as exc:
            log.warning("waiting for PostgreSQL: %s", database_error(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await stop.wait()
            backoff = min(backoff * 2, settings.retry_max_s)
            continue
        if applied:
            log.info("migrations applied", extra={"applied": applied})
        return True
    return False


async def build(settings: Settings, runtime: Runtime) -> None:
    # Listen first: a copy started by mistake on a live instance's address exits
    # here, before it touches the lease; and holding the address is what lets a
    # restart prove its predecessor gone (see `listener`).
    port = runtime.bind()
    # Before the database: a broken teams file is a configuration error, at once.
    teams = load_teams(settings, runtime)
    await migrate_with_retry(settings, runtime.stop_requested)
    store = await runtime.stack.enter_async_context(
        PgSectionStore(settings.database_url, settings.store_timeout_s)
    )
    allocator = make_allocator(
        settings, store, this_boot(settings, port), advertised_address(settings, port)
    )
    if settings.serve_log:
        runtime.stack.callback(open_serve_log(settings.serve_log, allocator))
    runtime.stack.push_async_callback(allocator.close)
    # Stop serving (and release the sections) before the server closes its listener:
    # once another process can bind this address, this one hands out nothing.
    runtime.on_shutdown(allocator.close)
    try:
        started = await allocator.start(runtime.stop_requested)
    except DuplicateInstance as exc:
        raise StartupError(str(exc)) from None
    if started:
        runtime.spawn(allocator.run(), "seqsvc-allocator")
    # Without a renewable lease every call is UNAVAILABLE: say so in health.
    runtime.readiness(lambda: allocator.serving, interval_s=max(0.1, settings.lease_s / 8))
    register_metrics(runtime, allocator)
    add_to_server(SeqServicer(allocator, teams), runtime.server)
    runtime.expose(SERVICE_NAME)


def database_error(exc: BaseException) -> str:
    """One line on why PostgreSQL could not be used (never the URL: it may carry a
    password)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"cannot reach PostgreSQL at IM_SEQSVC_DATABASE_URL ({first}); start one "
        "(`make seqsvc-run` starts PostgreSQL and seqsvc) or fix the URL"
    )


def _migrate_command(settings: Settings) -> int:
    try:
        applied = asyncio.run(migrate(settings.database_url))
    except (OSError, psycopg.Error) as exc:
        sys.stderr.write(f"seqsvc migrate: {database_error(exc)}\n")
        return 1
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def raise_floor_command(argv: list[str]) -> int:
    """`python -m seqsvc raise-floor --at-least N`: every key's next value above N
    (see `repo.raise_floor`). Exit status 0 done, 1 refused (an instance is live),
    2 bad arguments or settings."""
    parser = argparse.ArgumentParser(
        prog="python -m seqsvc raise-floor",
        description="Raise every section's max_seq to at least N, with every seqsvc "
        "instance stopped: after a restore, before seqsvc serves again.",
    )
    parser.add_argument("--at-least", type=int, required=True, metavar="N")
    args = parser.parse_args(argv)
    if not 0 <= args.at_least < 2**62:
        parser.error("--at-least must be between 0 and 2**62")
    try:
        settings = load_settings(Settings)
    except ConfigError as exc:
        sys.stderr.write(f"seqsvc: {exc}\n")
        return 2
    try:
        before, epoch = asyncio.run(
            raise_floor(settings.database_url, args.at_least, settings.sections)
        )
    except LeaseHeld as exc:
        sys.stderr.write(f"seqsvc raise-floor: refused: {exc}\n")
        return 1
    except (OSError, psycopg.Error) as exc:
        sys.stderr.write(f"seqsvc raise-floor: {database_error(exc)}\n")
        return 1
    print(
        f"seqsvc floor: every section's max_seq is now >= {args.at_least} "
        f"(highest before: {before}; fencing epoch {epoch})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["raise-floor"]:
        return raise_floor_command(args[1:])
    return serve_main("seqsvc", Settings, build, argv=argv, commands={"migrate": _migrate_command})
