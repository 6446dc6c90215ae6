"""`python -m chaos`: the chaos run (`make chaos`). See docs/chaos.md."""

from chaos.cli import main

raise SystemExit(main())
