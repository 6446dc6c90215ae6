from pusher.server import main

raise SystemExit(main())
