from kubeloop.cli import main

raise SystemExit(main())
