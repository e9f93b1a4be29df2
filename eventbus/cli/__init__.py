"""The command line: ``eventbus`` (or ``python -m eventbus``) reads and repairs a log file."""

from ._main import main

__all__ = ["main"]
