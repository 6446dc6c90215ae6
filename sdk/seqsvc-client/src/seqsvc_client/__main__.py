"""`python -m seqsvc_client next KEY`: the same as the `seqctl` command."""

from seqsvc_client.cli import main

raise SystemExit(main())
