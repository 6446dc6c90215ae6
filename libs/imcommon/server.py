"""gRPC server lifecycle shared by every service.

A service provides `build(settings, runtime)`, which opens its resources on
`runtime.stack`, registers its servicers on `runtime.server`, names them with
`runtime.expose()` and starts background work with `runtime.spawn()`; one that
must not touch shared state unless it can serve calls `runtime.bind()` first.
`serve()` does the rest: health (grpc.health.v1) and reflection, keepalive fit for
long-lived streams, and SIGTERM handling:

1. health flips to NOT_SERVING for every service;
2. after `drain_delay_s`, the shutdown hooks run (e.g. GoAway to clients);
3. the server stops with `shutdown_grace_s` for in-flight RPCs;
4. background tasks are cancelled and resources closed in reverse order;
5. a watchdog exits the process with status 1 if `shutdown_deadline_s` passes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imcommon.config import ConfigError, describe_settings, load_settings
from imcommon.logging import setup_logging
from imcommon.metrics import Metrics
from imcommon.settings import ServerSettings
from imcommon.telemetry import instrument_server
from imcommon.tracing import setup_tracing

log = logging.getLogger(__name__)

S = TypeVar("S", bound=ServerSettings)


class StartupError(Exception):
    """The service must not start (e.g. its address is taken). Raised by
    `Runtime.bind()` or a build function; `main()` logs the message, without a
    traceback, and exits with status 1."""


#: The channel option that keeps a port to one server. gRPC's default sets
#: SO_REUSEPORT, so a second server (ours or a stranger's) binding a port that a live
#: one listens on would silently share it, each getting some of the connections;
#: with it, the second bind fails. Every grpc.aio server we create passes it.
EXCLUSIVE_PORT: tuple[str, int] = ("grpc.so_reuseport", 0)


class PortInUseError(StartupError):
    """The address is taken (EADDRINUSE): another process listens there."""


def bind_failure(address: str, what: str) -> StartupError:
    """The StartupError for a failed bind of `address`, with the operating system's
    reason (gRPC only says it failed): a PortInUseError when the address is taken.
    Probes the address with a plain socket, so call it only after a bind failed."""
    host, _, port = address.rpartition(":")
    reason = "gRPC could not bind it"
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM)
        for family, kind, proto, _canon, sockaddr in infos:
            with socket.socket(family, kind, proto) as probe:
                # What servers set too: a port left in TIME_WAIT is not "taken".
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
    except (OSError, ValueError) as exc:
        reason = str(exc)
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            return PortInUseError(f"cannot listen on {address}: {reason} ({what})")
    return StartupError(f"cannot listen on {address}: {reason}")


def server_options(settings: ServerSettings) -> list[tuple[str, Any]]:
    """Channel options for long-lived client streams: pings keep NATs and load
    balancers from dropping idle streams and detect dead peers."""
    options: list[tuple[str, Any]] = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # A second process binding a port that a live one listens on must fail
        # (seqsvc relies on it to prove a crashed predecessor gone).
        EXCLUSIVE_PORT,
    ]
    if settings.max_connection_age_s:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.shutdown_grace_s * 1000)),
        ]
    return options


class Runtime:
    """What a service's build function wires itself into."""

    def __init__(
        self,
        server: grpc.aio.Server,
        stack: contextlib.AsyncExitStack,
        metrics: Metrics,
        bind: Callable[[], int] | None = None,
    ) -> None:
        self.server = server
        self.stack = stack
        self.metrics = metrics
        self.service_names: list[str] = []
        #: The bound port, once `bind()` has run (0 before).
        self.port = 0
        self._bind = bind
        self._bound = False
        self._shutdown_hooks: list[Callable[[], Awaitable[None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.failed = asyncio.Event()
        self.stop_requested = asyncio.Event()
        self.ready_check: tuple[Callable[[], bool], float] | None = None

    def bind(self) -> int:
        """Opens the listening port now; `serve()` otherwise opens it after the
        build function. A service that must not touch shared state unless it can
        serve (seqsvc and its lease) calls this first, so a copy started by mistake
        on a live instance's address fails here having changed nothing. Connections
        that arrive before the server starts are queued by the kernel: their calls
        wait, or reach their deadline, until it starts. Idempotent; returns the
        port. Raises StartupError if the address is taken or cannot be used."""
        if not self._bound:
            if self._bind is None:
                raise RuntimeError("this Runtime has no address to bind")
            self.port = self._bind()
            self._bound = True
        return self.port

    def expose(self, full_service_name: str) -> None:
        """Lists a registered service in health and reflection."""
        self.service_names.append(full_service_name)

    def readiness(self, check: Callable[[], bool], interval_s: float = 0.5) -> None:
        """Makes health follow `check()` while the process serves: NOT_SERVING
        (for the server and every exposed service) while it returns False, e.g.
        while a dependency the service cannot answer without is gone, SERVING
        again when it returns True. Polled every `interval_s`."""
        self.ready_check = (check, interval_s)

    def on_shutdown(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Runs `hook` after health is NOT_SERVING and before the server stops."""
        self._shutdown_hooks.append(hook)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Runs background work until shutdown. If it fails, the process exits
        non-zero (a supervisor restarts it) rather than running half-broken."""
        task = asyncio.create_task(coro, name=name)

        def done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("background task failed", exc_info=t.exception(), extra={"task": name})
                self.failed.set()

        task.add_done_callback(done)
        self._tasks.append(task)
        return task

    async def run_shutdown_hooks(self) -> None:
        for hook in self._shutdown_hooks:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")

    async def cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


BuildFn = Callable[[S, Runtime], Awaitable[None]]


def _start_watchdog(deadline_s: float) -> threading.Timer:
    def expire() -> None:
        sys.stderr.write(f"shutdown deadline of {deadline_s}s passed; exiting\n")
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(deadline_s, expire)
    timer.daemon = True
    timer.start()
    return timer


async def serve(component: str, settings: S, build: BuildFn[S]) -> int:
    """Runs one service until SIGTERM/SIGINT; returns the exit status."""
    provider = setup_tracing(component)
    loop = asyncio.get_running_loop()
    exit_code = 0
    watchdog: threading.Timer | None = None
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(provider.shutdown)
        metrics = Metrics(component)
        server = grpc.aio.server(options=server_options(settings))
        address = f"{settings.host}:{settings.port}"

        def bind() -> int:
            try:
                return server.add_insecure_port(address)
            except RuntimeError:  # grpc: "Failed to bind to address ..."
                raise bind_failure(address, f"is another {component} running there?") from None

        # Servicers register through the instrumented server: every unary method
        # gets its span and RPC metrics once, at registration (health and
        # reflection below are registered on the plain server).
        runtime = Runtime(instrument_server(server, metrics), stack, metrics, bind)
        if settings.metrics_port:
            try:
                metrics.serve(settings.host, settings.metrics_port)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve /metrics on {settings.host}:{settings.metrics_port}: {exc}"
                ) from None
            stack.callback(metrics.close)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runtime.stop_requested.set)
        stack.push_async_callback(runtime.cancel_tasks)
        await build(settings, runtime)
        _tune_gc(settings.gc_gen0_threshold)

        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = [*runtime.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
        runtime.bind()
        await server.start()
        for name in ["", *runtime.service_names]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"address": f"{settings.host}:{runtime.port}"})
        follow: asyncio.Task[None] | None = None
        if runtime.ready_check is not None:
            check, interval = runtime.ready_check
            follow = asyncio.create_task(
                _follow_readiness(health_servicer, ["", *runtime.service_names], check, interval)
            )

        stop = asyncio.create_task(runtime.stop_requested.wait())
        failed = asyncio.create_task(runtime.failed.wait())
        await asyncio.wait({stop, failed}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        failed.cancel()
        if runtime.failed.is_set():
            exit_code = 1
        log.info("shutting down", extra={"exit_code": exit_code})
        watchdog = _start_watchdog(settings.shutdown_deadline_s)
        if follow is not None:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)
        await health_servicer.enter_graceful_shutdown()
        if settings.drain_delay_s:
            await asyncio.sleep(settings.drain_delay_s)
        await runtime.run_shutdown_hooks()
        await server.stop(settings.shutdown_grace_s)
    if watchdog is not None:
        watchdog.cancel()
    log.info("stopped", extra={"exit_code": exit_code})
    return exit_code


async def _follow_readiness(
    health_servicer: health.aio.HealthServicer,
    names: list[str],
    check: Callable[[], bool],
    interval_s: float,
) -> None:
    """Sets every name's health from `check()` whenever it changes, until cancelled."""
    ready = True  # serve() has just set SERVING
    while True:
        await asyncio.sleep(interval_s)
        try:
            now = bool(check())
        except Exception:
            log.exception("readiness check failed; reporting NOT_SERVING")
            now = False
        if now == ready:
            continue
        ready = now
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in names:
            await health_servicer.set(name, status)
        if ready:
            log.info("ready again: health SERVING")
        else:
            log.warning("not ready: health NOT_SERVING")


def _tune_gc(gen0_threshold: int) -> None:
    """Moves every object allocated so far (modules, settings, clients, servicers)
    into the permanent generation, so no collection walks them again, and raises
    the generation-0 threshold (0 = leave Python's GC settings alone)."""
    if not gen0_threshold:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0_threshold, 20, 20)


def main(
    component: str,
    settings_cls: type[S],
    build: BuildFn[S],
    argv: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
    commands: Mapping[str, Callable[[S], int]] | None = None,
) -> int:
    """Entry point of `python -m <component>`.

    `--print-config` prints every setting with its description and value;
    `--check-config` validates and exits. Extra `commands` (e.g. `migrate`) run
    instead of the server. Invalid settings exit with status 2 and a message naming
    the variable.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {component}")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", *(commands or {})])
    parser.add_argument("--print-config", action="store_true", help="print every setting")
    parser.add_argument("--check-config", action="store_true", help="validate settings, exit")
    args = parser.parse_args(argv)
    if args.print_config:
        print(describe_settings(settings_cls, environ))
        return 0
    try:
        settings = load_settings(settings_cls, environ)
    except ConfigError as exc:
        sys.stderr.write(f"{component}: {exc}\n")
        return 2
    if args.check_config:
        return 0
    setup_logging(component, settings.log_level)
    if commands and args.command in commands:
        return commands[args.command](settings)
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a pinned dependency
            return asyncio.run(serve(component, settings, build))
        return uvloop.run(serve(component, settings, build))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
