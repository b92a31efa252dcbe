"""``python -m stem_boost`` = the ``stem-boost`` command."""

from .cli import main

raise SystemExit(main())
