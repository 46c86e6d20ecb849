"""Subcommands of the ``vne`` CLI, one module each (see vne/cli.py)."""
