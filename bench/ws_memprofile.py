"""Where an idle WebSocket device's memory goes in the real gateway.

    .venv/bin/python bench/ws_memprofile.py --connections 2000
    .venv/bin/python bench/ws_memprofile.py --connections 2000 --no-trace   # RSS only
    .venv/bin/python bench/ws_memprofile.py --connections 10000 --bare      # the baseline

Starts a stack (one logic, one pusher, two gateways), replaces gateway 1 by the
same gateway (same env, same code: `python -m gateway`) run under this file
with tracemalloc on, opens 10 raw WebSocket devices (bench/e2e_ws_conns.py
holders), snapshots, opens N more, snapshots again, and prints the difference
per device by allocation site and by module, with the gateway's RSS delta.
tracemalloc costs memory of its own: the RSS figure of a traced run is not the
bench's; --no-trace gives that one.

--bare measures the alternative instead: websockets' own asyncio server
(`websockets.asyncio.server.serve`, defaults, under uvloop) with a handler
coroutine per connection that reads the Hello, answers a Welcome and then
waits in `async for` (no gateway state at all), with the same holders.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

SNAPSHOT_ENV = "IM_BENCH_TRACEMALLOC_SNAPSHOT"


def child() -> int:
    """The gateway with tracemalloc on; SIGUSR1 writes a snapshot to the file named
    by IM_BENCH_TRACEMALLOC_SNAPSHOT (with a counter suffix)."""
    tracemalloc.start(12)
    count = 0

    def dump(_signum: int, _frame: object) -> None:
        nonlocal count
        count += 1
        import gc

        gc.collect()
        tracemalloc.take_snapshot().dump(f"{os.environ[SNAPSHOT_ENV]}.{count}")

    signal.signal(signal.SIGUSR1, dump)
    from gateway.server import main

    sys.argv = ["gateway"]
    return main()


def bare_child(port: int) -> int:
    """websockets' asyncio server, one handler coroutine per connection."""
    import asyncio

    import uvloop
    from websockets.asyncio.server import ServerConnection, serve

    from im.gateway.v1 import gateway_pb2

    welcome = gateway_pb2.ServerFrame(welcome=gateway_pb2.Welcome()).SerializeToString()

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(welcome)
        async for _ in ws:
            pass

    async def run() -> None:
        async with serve(handler, "127.0.0.1", port):
            await asyncio.Future()

    uvloop.run(run())
    return 0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_file(path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.2)
    time.sleep(1.0)  # dump() writes it in one go, but give it time to finish


def report(a: str, b: str, n: int, top: int) -> None:
    s0 = tracemalloc.Snapshot.load(a).filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    s1 = tracemalloc.Snapshot.load(b).filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    total = sum(st.size_diff for st in s1.compare_to(s0, "filename"))
    print(f"\ntraced Python heap: +{total / 1024:.0f} KiB, {total / n / 1024:.2f} KiB per device")
    print("\nby module (KiB per device, blocks per device):")
    for st in s1.compare_to(s0, "filename")[:top]:
        if st.size_diff <= 0:
            continue
        print(
            f"  {st.size_diff / n / 1024:7.2f}  {st.count_diff / n:6.1f}  "
            f"{st.traceback[0].filename.split('site-packages/')[-1]}"
        )
    print("\nby line:")
    for st in s1.compare_to(s0, "lineno")[:top]:
        if st.size_diff <= 0:
            continue
        fr = st.traceback[0]
        print(
            f"  {st.size_diff / n / 1024:7.2f}  {st.count_diff / n:6.1f}  "
            f"{fr.filename.split('site-packages/')[-1]}:{fr.lineno}"
        )
    print("\nby call path (innermost first):")
    stats = s1.compare_to(s0, "traceback")
    for st in stats[:top]:
        if st.size_diff <= 0:
            continue
        frames = [f"{f.filename.split('/')[-1]}:{f.lineno}" for f in reversed(st.traceback)][:7]
        print(f"  {st.size_diff / n / 1024:7.2f}  {st.count_diff / n:6.1f}  {' <- '.join(frames)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--procs", type=int, default=2, help="holder processes")
    p.add_argument("--no-trace", action="store_true", help="RSS only, no tracemalloc")
    p.add_argument("--bare", action="store_true", help="websockets' own server instead (RSS)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--settle", type=float, default=3.0)
    args = p.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import e2e
    import e2e_ws_conns

    from imdev.stack import Stack

    e2e.raise_nofile()
    signal.signal(signal.SIGTERM, e2e.exit_on_sigterm)  # unwinds: the stack stops
    workdir = Path(tempfile.mkdtemp(prefix="im-wsmem-"))
    workdir.chmod(0o755)
    snap = str(workdir / "snapshot")
    stack = Stack(workdir, gateways=2, fsync=False)
    gw_proc: subprocess.Popen[bytes] | None = None
    procs: list[e2e.Proc] = []
    try:
        stack.start()
        gw = stack.gateways[1]
        gw.stop()
        env = dict(gw.env())
        env[SNAPSHOT_ENV] = snap
        argv = [sys.executable, __file__, "--child"]
        if args.no_trace:
            argv = [sys.executable, "-m", "gateway"]
        if args.bare:
            args.no_trace = True
            argv = [
                sys.executable,
                __file__,
                "--bare-child",
                str(gw.extra_env["IM_GATEWAY_WS_PORT"]),
            ]
        with open(workdir / "gateway-traced.log", "wb") as out:
            gw_proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        url = stack.ws_urls[1]
        port = int(url.split(":")[2].split("/")[0])
        deadline = time.monotonic() + 60
        while not port_open(port):
            if time.monotonic() > deadline or gw_proc.poll() is not None:
                log = (workdir / "gateway-traced.log").read_text()[-3000:]
                raise RuntimeError(f"traced gateway did not start:\n{log}")
            time.sleep(0.2)
        tokens = [stack.mint(f"mem{i:05d}") for i in range(args.connections + 10)]
        procs = [e2e.spawn(e2e_ws_conns.ws_conns_main, f"ws-{i}", url) for i in range(args.procs)]
        first = e2e.call_all(procs[:1], "open", [{"tokens": tokens[:10], "concurrency": 10}])
        print(f"10 devices: {first}")
        time.sleep(args.settle)
        rss0 = rss_kb(gw_proc.pid)
        if not args.no_trace:
            gw_proc.send_signal(signal.SIGUSR1)
            wait_file(f"{snap}.1")
            rss0 = rss_kb(gw_proc.pid)
        rest = tokens[10:]
        t0 = time.monotonic()
        replies = e2e.call_all(
            procs,
            "open",
            [{"tokens": rest[i :: args.procs], "concurrency": 50} for i in range(args.procs)],
        )
        opened = sum(r["opened"] for r in replies) - 10
        print(
            f"opened {opened} more in {time.monotonic() - t0:.1f}s, failed "
            f"{sum(r['failed'] for r in replies)} {[e for r in replies for e in r['errors']][:3]}"
        )
        time.sleep(args.settle)
        rss1 = rss_kb(gw_proc.pid)
        alive = sum(r["alive"] for r in e2e.call_all(procs, "check", [{}] * len(procs))) - 10
        print(
            f"gateway RSS {rss0} -> {rss1} kB: {(rss1 - rss0) / max(1, alive):.2f} kB per device "
            f"({alive} alive){' (tracemalloc on: inflated)' if not args.no_trace else ''}"
        )
        if not args.no_trace:
            gw_proc.send_signal(signal.SIGUSR1)
            wait_file(f"{snap}.2")
            report(f"{snap}.1", f"{snap}.2", max(1, alive), args.top)
        return 0
    finally:
        e2e.close_all(procs)
        if gw_proc is not None:
            gw_proc.terminate()
            try:
                gw_proc.wait(20)
            except subprocess.TimeoutExpired:
                gw_proc.kill()
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        sys.exit(child())
    if sys.argv[1:2] == ["--bare-child"]:
        sys.exit(bare_child(int(sys.argv[2])))
    sys.exit(main())
