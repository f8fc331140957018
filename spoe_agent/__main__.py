from spoe_agent.cli import main

raise SystemExit(main())
