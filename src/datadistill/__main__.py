from datadistill.cli import main

raise SystemExit(main())
