"""`seqctl`: seqsvc from the command line, through SeqClient.

    python -m seqsvc.cli --address 127.0.0.1:50053 next job:1 job:2
    python -m seqsvc.cli reserve job:1 100          # prints first and last
    python -m seqsvc.cli current job:1

Installed with the seqsvc-client distribution as `seqctl` and
`python -m seqsvc_client`. The address and the team's token default to
SEQSVC_ADDRESS and SEQSVC_TOKEN (a token on the command line is visible to other
users of the machine). Exit status: 0 done, 1 the service refused or failed (one
line on stderr says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import grpc

from seqsvc.client import SeqClient, SeqError, SeqInvalidArgument


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqctl", description="Calls seqsvc: per-key strictly increasing numbers."
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("SEQSVC_ADDRESS", ""),
        help="host:port of seqsvc (env SEQSVC_ADDRESS)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("SEQSVC_TOKEN") or None,
        help="the team's bearer token (env SEQSVC_TOKEN; prefer the variable)",
    )
    parser.add_argument("--tls", action="store_true", help="TLS (system roots unless --ca)")
    parser.add_argument(
        "--ca", dest="ca_file", type=Path, help="PEM file of the CA that signed seqsvc's cert"
    )
    parser.add_argument(
        "--cert", dest="cert_file", type=Path, help="PEM client certificate (mutual TLS)"
    )
    parser.add_argument("--key", dest="key_file", type=Path, help="PEM key of --cert")
    parser.add_argument("--deadline", type=float, default=5.0, help="seconds per attempt")
    sub = parser.add_subparsers(dest="command", required=True)
    nxt = sub.add_parser("next", help="the next value of each key (one line each)")
    nxt.add_argument("keys", nargs="+")
    res = sub.add_parser("reserve", help="COUNT consecutive values of KEY: prints first last")
    res.add_argument("key")
    res.add_argument("count", type=int)
    cur = sub.add_parser("current", help="the last value handed out for KEY")
    cur.add_argument("key")
    return parser


def _tls(args: argparse.Namespace) -> bool | grpc.ChannelCredentials:
    if args.ca_file or args.cert_file:
        return grpc.ssl_channel_credentials(
            args.ca_file.read_bytes() if args.ca_file else None,
            args.key_file.read_bytes() if args.key_file else None,
            args.cert_file.read_bytes() if args.cert_file else None,
        )
    return bool(args.tls)


async def _run(args: argparse.Namespace) -> list[str]:
    async with SeqClient(
        args.address,
        token=args.token,
        tls=_tls(args),
        deadline_s=args.deadline,
        max_retries=3,
    ) as seq:
        if args.command == "next":
            return [str(v) for v in await seq.next_batch(args.keys)]
        if args.command == "reserve":
            first, last = await seq.reserve(args.key, args.count)
            return [f"{first} {last}"]
        return [str(await seq.current(args.key))]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.address:
        parser.error("no address: --address HOST:PORT or SEQSVC_ADDRESS")
    if bool(args.cert_file) != bool(args.key_file):
        parser.error("--cert and --key go together")
    try:
        lines = asyncio.run(_run(args))
    except SeqInvalidArgument as exc:
        print(f"seqctl: invalid: {exc}", file=sys.stderr)
        return 2
    except (SeqError, OSError) as exc:
        print(f"seqctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
