from emanet.cli import main

raise SystemExit(main())
