"""``python -m stem_boost`` = the ``stem-boost`` command (`cli.entry`)."""

from .cli import entry

entry()
