from tmplbuild.cli import main

raise SystemExit(main())
