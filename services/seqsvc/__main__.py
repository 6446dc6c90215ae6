from seqsvc.server import main

raise SystemExit(main())
