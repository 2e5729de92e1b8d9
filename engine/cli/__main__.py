"""``python -m engine.cli``: how the launcher starts coordinator and node processes."""

from engine.cli import main

raise SystemExit(main())
