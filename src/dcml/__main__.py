from dcml.cli import main

raise SystemExit(main())
