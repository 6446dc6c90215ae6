from logic.server import main

raise SystemExit(main())
