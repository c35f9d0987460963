"""Rank 0's progress display: an observer of the protocol (``scaling.protocol.Observer``), apart
from the measurement itself."""
from __future__ import annotations

from scaling.protocol import Observer


class Progress(Observer):
    """Rank 0's progress display: a rich progress bar over all steps, one line per evaluation."""

    def __init__(self, total_steps: int, description: str, every: int = 50) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.console = Console(stderr=True)
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            auto_refresh=False,
        )
        self._task = self._bar.add_task(description, total=total_steps, status="")
        self._every = max(1, every)
        self._pending = 0
        self._bar.start()

    def epoch_begin(self, epoch: int) -> None:
        self._bar.update(self._task, status=f"epoch {epoch + 1}")
        self._bar.refresh()

    def advance(self, steps: int) -> None:
        # refreshing is the costly part: do it every `every` steps, never per step
        self._pending += steps
        if self._pending >= self._every:
            self._bar.update(self._task, advance=self._pending)
            self._pending = 0
            self._bar.refresh()

    def evaluated(self, epoch: int, loss: float, accuracy: float) -> None:
        self._bar.update(self._task, advance=self._pending, status=f"epoch {epoch + 1} acc {accuracy:.4f}")
        self._pending = 0
        self._bar.refresh()

    def close(self) -> None:
        self._bar.update(self._task, advance=self._pending)
        self._pending = 0
        self._bar.refresh()
        self._bar.stop()
