"""The stages' console: rich markup, never wrapped at the console's width (80 columns when output
is not a terminal, as under DVC), so a one-line error stays one line in a log."""

from __future__ import annotations

from typing import Any

from rich.console import Console

_console = Console(soft_wrap=True)


def rprint(*objects: Any, sep: str = " ", end: str = "\n") -> None:
    """rich.print with soft wrapping: markup rendered, long lines kept whole."""
    _console.print(*objects, sep=sep, end=end)
