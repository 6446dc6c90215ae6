from gateway.server import main

raise SystemExit(main())
