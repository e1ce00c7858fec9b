from fedseg.app.cli import main

raise SystemExit(main())
