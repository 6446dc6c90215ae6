"""Wall-clock timer of the hops of the send and delivery path, for profiling
the closed loop (docs/benchmarks.md, "The closed loop, hop by hop").

Not part of any service: it is loaded only when this directory is on a
service's PYTHONPATH and IM_HOPS_DIR is set (bench/e2e_hops.py does both). It
wraps a fixed list of coroutine functions after their modules are imported and
records (end time on CLOCK_MONOTONIC, seconds) per call; at exit (and on
SIGUSR1) it writes them to IM_HOPS_DIR/<pid>.json. The wrappers add a few
microseconds per call, far under the milliseconds measured.
"""

from __future__ import annotations

import atexit
import functools
import importlib.abc
import importlib.machinery
import json
import os
import signal
import sys
import time
from collections import defaultdict
from typing import Any

_OUT = os.environ.get("IM_HOPS_DIR", "")
_RECORDS: dict[str, list[tuple[float, float]]] = defaultdict(list)

#: module -> [(attribute path, hop name)]
_TARGETS: dict[str, list[tuple[str, str]]] = {
    "gateway.upstream": [
        ("LogicClient.send", "gateway.send_to_logic (queue + call)"),
        ("LogicClient._call", "gateway.SendMessages call"),
    ],
    "logic.send": [
        ("Sender.send", "logic.send (queue + batch + publish)"),
        ("Sender._run_batch", "logic.send transaction"),
        ("Sender._finish", "logic.publish triggers + answer"),
    ],
    "logic.repo": [
        ("lock_send_tx", "logic.tx lock"),
        ("read_send_states_tx", "logic.tx read states"),
        ("insert_messages_tx", "logic.tx insert"),
    ],
    "logic.seq": [("SeqClientSource.next_batch", "logic.tx seqsvc NextBatch")],
    "logic.events": [("TriggerPublisher.publish", "logic.publish one trigger")],
    "logic.fanout": [
        ("Fanout.fanout_batch", "logic.FanoutBatch"),
        ("Fanout._write_rows_tx", "logic.fanout write rows"),
    ],
    "psycopg.transaction": [("AsyncTransaction.__aexit__", "pg commit (transaction exit)")],
    "psycopg_pool.pool_async": [("AsyncConnectionPool.getconn", "pg pool getconn")],
    "pusher.consumer": [
        ("TriggerConsumer._work", "pusher.work (FanoutBatch + push + acks)"),
        ("TriggerConsumer._settle", "pusher.settle (ack trigger)"),
    ],
    "pusher.delivery": [
        ("Deliverer.push", "pusher.push (routes + Deliver)"),
        ("Deliverer._lookup", "pusher.route lookup"),
        ("GatewayClients.deliver", "pusher.Deliver call"),
    ],
}


def _wrap(fn: Any, name: str) -> Any:
    rec = _RECORDS[name]
    mono = time.monotonic

    @functools.wraps(fn)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = mono()
        try:
            return await fn(*args, **kwargs)
        finally:
            t1 = mono()
            rec.append((t1, t1 - t0))

    return timed


def _patch(module: Any) -> None:
    for path, name in _TARGETS.get(module.__name__, []):
        owner, _, attr = path.rpartition(".")
        obj = getattr(module, owner) if owner else module
        setattr(obj, attr, _wrap(getattr(obj, attr), name))


def _on_dispatch(module: Any) -> None:
    """The pusher's trigger arrival: JetStream's stored time to the dispatch
    (the publish's store, the pull fetch, the consumer's loop)."""
    cls = module.TriggerConsumer
    orig = cls._dispatch
    rec = _RECORDS["nats.stored_to_pusher_dispatch"]

    async def _dispatch(self: Any, msg: Any) -> Any:
        try:
            stored = msg.metadata.timestamp.timestamp()
            rec.append((time.monotonic(), time.time() - stored))
        except Exception:  # a timer must never break the pusher
            pass
        return await orig(self, msg)

    cls._dispatch = _dispatch


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.inner.exec_module(module)
        _patch(module)
        if module.__name__ == "pusher.consumer":
            _on_dispatch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def _dump(*_: Any) -> None:
    with open(os.path.join(_OUT, f"{os.getpid()}.json"), "w") as f:
        json.dump({"argv": sys.argv, "records": _RECORDS}, f)


if _OUT:
    sys.meta_path.insert(0, _Finder())
    atexit.register(_dump)
    signal.signal(signal.SIGUSR1, _dump)
