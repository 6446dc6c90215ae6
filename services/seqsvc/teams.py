"""Team namespaces: who may call seqsvc, for which keys, how fast.

A teams file (`IM_SEQSVC_TEAMS_FILE`, YAML or JSON) lists the teams:

    teams:
      - name: im-logic
        token_sha256: ["<hex SHA-256 of the bearer token>"]   # and/or:
        tls_identities: ["logic.im.svc"]     # a client certificate's CN, subject or SAN
        prefixes: ["u:", "c:"]
        quota: {values_per_s: 200000, burst: 400000}           # optional: unlimited

A caller is the team whose token (gRPC metadata `authorization: Bearer <token>`)
hashes to one of its `token_sha256`, or, on a mutual-TLS port, whose verified
client certificate names one of its `tls_identities`. It may use only keys that
start with one of its prefixes. Prefixes of different teams never overlap (one
being a prefix of another is refused at load), so a team's keys are its own.

The quota is a token bucket in values: `Next` costs 1, `NextBatch` one per key,
`Reserve` its count, `Current` 1 (it hands out nothing but costs the service as
much as a `Next`). A call that does not fit is refused whole (nothing charged) and
told how long to wait.

Without a teams file the service is open, as it was before namespaces: every
caller may use every key. This module holds no gRPC: the servicer reads the
credential from the call and maps the errors below to status codes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from seqsvc.keys import InvalidArgument, key_bytes

log = logging.getLogger(__name__)

#: Refusal reasons, as the `reason` label of im_seqsvc_team_refusals_total.
UNAUTHENTICATED = "unauthenticated"
PERMISSION_DENIED = "permission_denied"
QUOTA = "quota"
REASONS = (UNAUTHENTICATED, PERMISSION_DENIED, QUOTA)

#: The team label of refusals whose caller is no team.
NO_TEAM = "(none)"


class TeamsError(Exception):
    """The teams file cannot be read or is invalid (the message says where)."""


class Unauthenticated(Exception):
    """No credential, or one that belongs to no team."""


class PermissionDenied(Exception):
    """A key outside the caller's prefixes."""


class QuotaExceeded(Exception):
    """The team's quota does not admit the call now; `retry_after_s` says when it
    will (None: never, the call is larger than the burst)."""

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# -- the file --------------------------------------------------------------------


class QuotaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    values_per_s: float = Field(gt=0, description="Sustained rate, values per second.")
    burst: int = Field(ge=1, description="Most values in one instant (the bucket's size).")


class TeamSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    token_sha256: list[str] = Field(default_factory=list)
    tls_identities: list[str] = Field(default_factory=list)
    prefixes: list[str] = Field(min_length=1)
    quota: QuotaSpec | None = None

    @field_validator("token_sha256", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, value: list[str]) -> list[str]:
        out = []
        for digest in value:
            d = digest.strip().lower()
            if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
                raise ValueError(
                    "token_sha256 holds the hex SHA-256 of a token (64 hex digits), never "
                    "the token itself: `printf %s TOKEN | sha256sum`"
                )
            out.append(d)
        return out

    @field_validator("prefixes")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if not prefix:
                raise ValueError("a prefix must not be empty (it would allow every key)")
            try:
                key_bytes(prefix)
            except InvalidArgument as exc:
                raise ValueError(f"prefix {prefix!r}: {exc}") from None
        return value


class TeamsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    teams: list[TeamSpec] = Field(min_length=1)


def hash_token(token: str) -> str:
    """What the teams file stores for a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_teams(text: str, source: str = "teams file") -> list[TeamSpec]:
    """Validates a teams file's content (YAML, of which JSON is a subset). Raises
    TeamsError naming the problem: bad syntax, a bad field, a duplicate name or
    credential, or prefixes of two teams that overlap."""
    try:
        import yaml

        data = yaml.safe_load(text)
    except ImportError:  # pragma: no cover - PyYAML is in the image; JSON still works
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TeamsError(f"{source}: not JSON (and PyYAML is not installed): {exc}") from None
    except Exception as exc:
        raise TeamsError(f"{source}: not valid YAML/JSON: {exc}") from None
    try:
        parsed = TeamsFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise TeamsError(
            f"{source}: {where or 'top level'}: {first['msg']} ({exc.error_count()} error(s))"
        ) from None
    names: set[str] = set()
    tokens: dict[str, str] = {}
    identities: dict[str, str] = {}
    owners: list[tuple[str, str]] = []
    for team in parsed.teams:
        if team.name in names:
            raise TeamsError(f"{source}: team {team.name!r} is listed twice")
        names.add(team.name)
        if not team.token_sha256 and not team.tls_identities:
            raise TeamsError(
                f"{source}: team {team.name!r} has no credential (token_sha256 or tls_identities)"
            )
        for digest in team.token_sha256:
            if digest in tokens:
                raise TeamsError(
                    f"{source}: teams {tokens[digest]!r} and {team.name!r} share a token"
                )
            tokens[digest] = team.name
        for ident in team.tls_identities:
            if ident in identities:
                raise TeamsError(
                    f"{source}: teams {identities[ident]!r} and {team.name!r} share the TLS "
                    f"identity {ident!r}"
                )
            identities[ident] = team.name
        for prefix in team.prefixes:
            for other, theirs in owners:
                if other != team.name and (prefix.startswith(theirs) or theirs.startswith(prefix)):
                    raise TeamsError(
                        f"{source}: prefix {prefix!r} of team {team.name!r} overlaps "
                        f"{theirs!r} of team {other!r}: a key would belong to both"
                    )
            owners.append((team.name, prefix))
    return list(parsed.teams)


# -- the runtime state -------------------------------------------------------------


@dataclass
class Team:
    """One team: its rules and, across reloads, its bucket and counters."""

    name: str
    prefixes: tuple[str, ...]
    rate: float  # values per second; 0: unlimited
    burst: float
    tokens: float = 0.0
    stamp: float = 0.0
    calls: int = 0
    values: int = 0
    refusals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    def configure(self, spec: TeamSpec, now: float) -> None:
        self.prefixes = tuple(spec.prefixes)
        rate = spec.quota.values_per_s if spec.quota else 0.0
        burst = float(spec.quota.burst) if spec.quota else 0.0
        if (rate, burst) != (self.rate, self.burst):
            self.rate, self.burst = rate, burst
            self.tokens, self.stamp = burst, now  # a new quota starts full

    def take(self, cost: int, now: float) -> float | None:
        """Charges `cost` values; returns None if admitted, else the seconds after
        which the same call would be (inf: never, it exceeds the burst)."""
        if not self.rate:
            return None
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if cost <= self.tokens:
            self.tokens -= cost
            return None
        if cost > self.burst:
            return float("inf")
        return (cost - self.tokens) / self.rate


class Teams:
    """The teams in force, and the check every RPC makes (`admit`).

    `admit` is synchronous and holds no lock: the servicer runs on one event loop.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_name: dict[str, Team] = {}
        self._by_token: dict[str, Team] = {}
        self._by_identity: dict[str, Team] = {}
        #: Refusals of callers that are no team (no or an unknown credential).
        self.anonymous_refusals = 0
        #: False: no teams file, every caller may use every key.
        self.enabled = False
        #: Whether some team is known by its client certificate (the servicer then
        #: reads the TLS peer's names).
        self.uses_tls = False

    def load(self, specs: Sequence[TeamSpec]) -> None:
        """Puts `specs` in force. A team that stays keeps its counters and bucket
        (unless its quota changed); a team that goes keeps its counters too, so the
        metrics never go backwards, but no longer admits anything."""
        now = self._clock()
        by_token: dict[str, Team] = {}
        by_identity: dict[str, Team] = {}
        for spec in specs:
            team = self._by_name.get(spec.name)
            if team is None:
                team = self._by_name[spec.name] = Team(spec.name, (), 0.0, 0.0)
            team.configure(spec, now)
            by_token.update(dict.fromkeys(spec.token_sha256, team))
            by_identity.update(dict.fromkeys(spec.tls_identities, team))
        self._by_token, self._by_identity = by_token, by_identity
        self.uses_tls = bool(by_identity)
        self.enabled = True

    def team_of(self, token: str | None, identities: Sequence[str]) -> Team | None:
        if token is not None:
            team = self._by_token.get(hash_token(token))
            if team is not None:
                return team
        for ident in identities:
            team = self._by_identity.get(ident)
            if team is not None:
                return team
        return None

    def admit(
        self, token: str | None, identities: Sequence[str], keys: Sequence[str], cost: int
    ) -> Team | None:
        """The caller's team if it may make this call now (charging `cost` values to
        its quota), None when no teams are configured. Raises Unauthenticated,
        PermissionDenied (naming the first key outside its prefixes, `keys[i]` in a
        batch) or QuotaExceeded; a refused call is charged nothing. An invalid key
        raises InvalidArgument, as the allocator would, not PermissionDenied."""
        if not self.enabled:
            return None
        team = self.team_of(token, identities)
        if team is None:
            self.anonymous_refusals += 1
            if token is None and not identities:
                raise Unauthenticated(
                    "seqsvc needs a team credential: gRPC metadata `authorization: Bearer "
                    "<token>` (or a client certificate of a team)"
                )
            raise Unauthenticated("the credential belongs to no team of this seqsvc")
        prefixes = team.prefixes
        for i, key in enumerate(keys):
            if not (isinstance(key, str) and key.startswith(prefixes)):
                key_bytes(key)  # a malformed key is INVALID_ARGUMENT, as without teams
                team.refusals[PERMISSION_DENIED] += 1
                where = f"keys[{i}] " if len(keys) > 1 else ""
                raise PermissionDenied(
                    f"{where}{key!r} is outside team {team.name!r}'s namespace: its keys "
                    f"must start with one of {list(prefixes)}"
                )
        wait = team.take(cost, self._clock())
        if wait is not None:
            team.refusals[QUOTA] += 1
            if wait == float("inf"):
                raise QuotaExceeded(
                    f"team {team.name!r}: a call of {cost} values exceeds its burst of "
                    f"{int(team.burst)}; split it",
                    None,
                )
            raise QuotaExceeded(
                f"team {team.name!r} is over its quota of {team.rate:g} values/s "
                f"(burst {int(team.burst)}); retry in {wait:.3f} s",
                wait,
            )
        team.calls += 1
        team.values += cost
        return team

    def __iter__(self) -> Iterator[Team]:
        return iter(list(self._by_name.values()))


# -- the file, watched -------------------------------------------------------------


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a Kubernetes Secret volume swaps ..data
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class TeamsFileWatch:
    """Loads the teams file into `teams`, and again when it changes (`poll()`) or
    on demand (`reload()`, e.g. on SIGHUP). A file that fails to load at start is
    an error (TeamsError); later, the teams in force stay and the error is logged."""

    def __init__(self, path: str, teams: Teams) -> None:
        self.path = path
        self.teams = teams
        self._stamp: tuple[int, int, int] | None = None
        #: Reloads that failed (for the metrics).
        self.failures = 0

    def load(self) -> None:
        """Reads and validates the file, then puts it in force. Raises TeamsError."""
        stamp = _stamp(self.path)
        try:
            text = Path(self.path).read_text()
        except OSError as exc:
            raise TeamsError(f"cannot read the teams file {self.path}: {exc.strerror}") from None
        specs = parse_teams(text, self.path)
        self.teams.load(specs)
        self._stamp = stamp
        log.info("teams loaded", extra={"file": self.path, "teams": [s.name for s in specs]})

    def reload(self) -> bool:
        """load(), logging instead of raising. True if the new file is in force."""
        try:
            self.load()
        except TeamsError as exc:
            self.failures += 1
            self._stamp = _stamp(self.path)  # do not retry the same broken file every poll
            log.error("teams file not reloaded; the teams in force stay: %s", exc)
            return False
        return True

    def poll(self) -> bool:
        """Reloads if the file changed since the last load. True if it did."""
        stamp = _stamp(self.path)
        if stamp is None or stamp == self._stamp:
            return False
        return self.reload()
