"""The ``stemstream`` command (commands.py) and its demo (demo.py)."""

from stream.cli.commands import main

__all__ = ["main"]
