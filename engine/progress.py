"""Progress bars that draw on a terminal and print nothing anywhere else.

Why: a rich bar redraws itself in place; where it cannot (a pipe, a log file, CI, a Ray worker
whose output the driver forwards line by line) a transient bar still ends with a newline, so
every bar left a blank line behind: `LLM(...)` under `| tee`, or one empty `(PrefillWorker
pid=...)` line per bar in the driver's output. Every bar in the code base comes from here.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress


def progress_bar(enabled: bool = True, console: Console | None = None) -> Progress:
    """A transient bar on stderr (or `console`); disabled unless `enabled` and on a terminal.

    Use as `with progress_bar(show) as bar: task = bar.add_task(...)`; a disabled bar accepts
    the same calls and writes nothing."""
    console = console or Console(stderr=True)
    on_terminal = console.is_terminal and not console.is_dumb_terminal
    return Progress(console=console, transient=True, disable=not (enabled and on_terminal))
