"""The `seqctl` command: the repository's seqsvc/cli.py, vendored at build time."""

from seqsvc_client._seqsvc.cli import main

__all__ = ["main"]
