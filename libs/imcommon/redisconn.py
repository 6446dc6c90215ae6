"""Redis clients for every service: one construction, one retry policy.

redis-py's `from_url` gives every pooled connection `Retry(NoBackoff(), 0)`: the
first command on a connection that a Redis restart broke fails, although Redis is
already back. Every service builds its clients with `redis_client` instead, so that
every call

- retries connection errors and timeouts (redis-py's ConnectionError and
  TimeoutError: refused, reset or closed connections, socket timeouts) up to
  RETRIES times, reconnecting before each retry, after an exponential backoff with
  jitter (EqualJitterBackoff: 50-100 ms, 100-200 ms, 200-400 ms, then 250-500 ms), so
  a Redis restart of up to about half a second costs a wait, not an error, and
  clients that lost Redis together do not come back in lockstep;
- within a time budget (RETRY_BUDGET_S, 1 s): redis-py nests retries (the socket
  connect inside a command's retry, the health-check PING inside a send), so a
  count per level alone multiplies (a Redis that accepts connections and never
  answers held one call 10 s with a 0.2 s timeout); here nested retries share the
  deadline of the outermost one, and no attempt starts after it. A call to a Redis
  that refuses connections fails after about RETRY_BUDGET_S, one to a hung Redis
  after about RETRY_BUDGET_S plus one attempt (a connect timeout plus a command
  timeout, `timeout_s` each). At worst a call waits for a free pooled connection
  (below), spends one budget getting it connected and another running the
  command on it;
- PINGs a pooled connection that has been idle for HEALTH_CHECK_INTERVAL_S before
  using it, so a connection broken while idle (Redis restarted) is replaced before
  a command is sent on it;
- opens at most `max_connections` (MAX_CONNECTIONS) connections: a call that finds
  them all busy waits for one to be released (BlockingConnectionPool), for at most
  one call's worst case (the retry budget plus a connect and a command timeout),
  then fails with ConnectionError("No connection available."). (redis-py's default
  pool opens up to 100 connections and fails every call beyond them at once with
  MaxConnectionsError: a burst of route writes, a gateway's connect or disconnect
  storm, then failed as if Redis were down.) Connections stay open in the pool once
  made, so a client holds as many Redis sockets as it ever had busy at once, never
  more than the bound.

A retry re-sends a command that may already have run (a timeout after Redis
executed it): use these clients for idempotent commands only. Every Redis call of
this project is one (route scripts set, extend or compare-and-delete; lookups read).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import AbstractBackoff, EqualJitterBackoff

T = TypeVar("T")

#: Retries after the first attempt of a call (each level of redis-py's nesting).
RETRIES = 4
#: No retry of a call starts later than this after the call began.
RETRY_BUDGET_S = 1.0
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 0.5
#: A pooled connection idle for this long is PINGed before it is used again.
HEALTH_CHECK_INTERVAL_S = 5.0
#: Default bound on one client's connections. Redis runs one command at a time, so
#: more connections add no throughput once the client's event loop is the limit;
#: they cost a socket on both sides (Redis's maxclients is 10,000 for every client).
MAX_CONNECTIONS = 32


class BudgetRetry(Retry):
    """redis-py's Retry with one deadline per call, shared by the retries nested
    inside it (redis-py calls `call_with_retry` again from within a command's retry
    on the same connection, whose Retry is its own deep copy: a connection serves
    one call at a time, so a depth count finds the outermost call)."""

    def __init__(self, backoff: AbstractBackoff, retries: int, budget_s: float) -> None:
        super().__init__(backoff, retries)  # supported: ConnectionError, TimeoutError
        self._budget_s = budget_s
        self._depth = 0
        self._deadline = 0.0

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        # Retry.call_with_retry, plus the deadline check before each retry.
        loop = asyncio.get_running_loop()
        if self._depth == 0:
            self._deadline = loop.time() + self._budget_s
        self._depth += 1
        try:
            self._backoff.reset()
            failures = 0
            while True:
                try:
                    return await do()
                except self._supported_errors as error:
                    if is_retryable and not is_retryable(error):
                        raise
                    failures += 1
                    if with_failure_count:
                        await fail(error, failures)
                    else:
                        await fail(error)
                    backoff = self._backoff.compute(failures)
                    if failures > self._retries or loop.time() + backoff >= self._deadline:
                        raise error from None
                    await asyncio.sleep(backoff)
        finally:
            self._depth -= 1


def retry_policy(retries: int = RETRIES, budget_s: float = RETRY_BUDGET_S) -> BudgetRetry:
    return BudgetRetry(
        EqualJitterBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), retries, budget_s
    )


def redis_client(
    url: str,
    timeout_s: float,
    *,
    retries: int = RETRIES,
    retry_budget_s: float = RETRY_BUDGET_S,
    health_check_interval_s: float = HEALTH_CHECK_INTERVAL_S,
    max_connections: int = MAX_CONNECTIONS,
    **kwargs: Any,
) -> aioredis.Redis:
    """A pooled asyncio client for `url` with the retry policy above. `timeout_s`
    bounds one attempt's connect and, separately, its command; retries stop after
    `retry_budget_s`; at most `max_connections` connections, a call waiting for a
    free one up to `retry_budget_s + 2 * timeout_s` (the bounds above). Opens no
    connection until first used; close it (and its pool) with `aclose()`."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=retry_budget_s + 2 * timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=retry_policy(retries, retry_budget_s),
        health_check_interval=health_check_interval_s,
        **kwargs,
    )
    return aioredis.Redis.from_pool(pool)
