"""Named steps of a long job, each with a spinner and its elapsed time (rich, on stderr), or silence. Where stderr is
not a terminal (CI logs, a pipe) rich would draw nothing until the job ends, so each step is a line when it starts and
one when it ends, with its time."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


@dataclass
class Outcome:
    """What a step learns while it runs and adds to its line when it ends (e.g. that its result came from a cache)."""

    note: str = ""


class Steps:
    """`with Steps(show) as step: with step("load") as outcome: ...` — a failed step's spinner is removed (its error
    says what failed); nothing is printed when show is False."""

    def __init__(self, show: bool = True):
        console = Console(stderr=True)
        self._lines = console if show and not console.is_terminal else None
        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"), TimeElapsedColumn(),
            console=console, disable=not show or self._lines is not None,
        )

    def __enter__(self):
        self._progress.__enter__()
        return self.step

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[Outcome]:
        description = escape(description)  # a path's brackets ("checkpoint ckpt[bf16]") are text, not rich markup
        outcome = Outcome()
        if self._lines is not None:
            self._lines.print(f"▸ {description}", highlight=False, soft_wrap=True)
            started = time.monotonic()
            yield outcome
            self._lines.print(f"✓ {description}{escape(outcome.note)} ({time.monotonic() - started:.1f} s)",
                              highlight=False, soft_wrap=True)
            return
        task = self._progress.add_task(description, total=1)
        try:
            yield outcome
        except BaseException:
            self._progress.remove_task(task)
            raise
        self._progress.update(task, completed=1, description=description + escape(outcome.note))

    @staticmethod
    @contextlib.contextmanager
    def silent(description: str) -> Iterator[Outcome]:
        yield Outcome()


class PrefillBar:
    """A bar on a terminal's stderr while a long prompt is fed, as an on_prefill(done, total) callback: it appears
    after the first piece (a prompt of one piece shows none) and is gone once the prompt is in, before the first token
    prints. stdout is left alone (tokens stream there), and so is a stderr that is not a terminal (logs, pipes)."""

    def __init__(self) -> None:
        console = Console(stderr=True)
        self._progress = Progress(TextColumn("prefill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=console, transient=True, redirect_stdout=False, redirect_stderr=False,
                                  disable=not console.is_terminal)
        self._task = None

    def __call__(self, done: int, total: int) -> None:
        if self._task is None:
            if done >= total:
                return
            self._task = self._progress.add_task("prefill", total=total)
            self._progress.start()
        self._progress.update(self._task, completed=done, refresh=True)
        if done >= total:
            self.close()

    def close(self) -> None:
        """Take the bar away (the prompt is in, or the generation failed or was interrupted)."""
        if self._task is not None:
            self._progress.stop()
            self._progress.remove_task(self._task)
            self._task = None


def note(message: str | None, show: bool = True) -> None:
    """One line on stderr beside the steps; nothing for None or when show is False."""
    if message is not None and show:
        Console(stderr=True).print(message, markup=False, highlight=False, soft_wrap=True)
