"""`python -m imctl`: the command-line client (see imctl.cli)."""

from imctl.cli import main

raise SystemExit(main())
