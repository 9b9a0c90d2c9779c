"""What both command lines share: the consoles and the one-line failure (exit 2)."""

from __future__ import annotations

import contextlib
import errno
import sys
from pathlib import Path
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def print_error(exc: Exception | str) -> None:
    # escaped: a message's own brackets (a path "out[int4]", "pip install 'llama4-export[export]'") are text, not markup
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)


def fail(exc: Exception | str) -> None:
    print_error(exc)
    raise typer.Exit(2)


# Writes the file system refuses for want of room, size or permission: (what happened, what to do)
FILE_SYSTEM_REFUSALS = {
    errno.ENOSPC: ("the disk filled up", "free space"),
    errno.EDQUOT: ("the disk quota ran out", "free space within the quota"),
    errno.EFBIG: ("a file outgrew the largest the file system or `ulimit -f` allows (FAT32: 4 GB)",
                  "choose a file system without that limit, or raise `ulimit -f`"),
    errno.EROFS: ("the file system turned read-only", "choose a writable location"),
}


@contextlib.contextmanager
def refused_writes(target: Path, hint: str = "") -> Iterator[None]:
    """Such a refusal in the block is one line naming `target` and exit 2, not a traceback (a write's OSError often
    names no file). The writers put their output in place by renaming a finished temp, so nothing is left behind."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOENT and not target.parent.is_dir():  # removed mid-run, the temp directories with it
            fail(f"{target.parent}: the directory was removed while {target.name} was being written in it; nothing was "
                 "left behind: recreate it and run again")
        if exc.errno not in FILE_SYSTEM_REFUSALS:
            raise
        what, remedy = FILE_SYSTEM_REFUSALS[exc.errno]
        fail(f"{target}: {what} while writing {exc.filename or 'it'}{hint if exc.errno == errno.ENOSPC else ''}; "
             f"nothing was left behind: {remedy} and run again")


# typer now vendors click (typer._click): its usage errors are of that family, not the installed click's, whichever
# typer is here
_CLICK_EXCEPTION = next(base for base in typer.BadParameter.__mro__ if base.__name__ == "ClickException")


def run_cli(app: typer.Typer) -> None:
    """Runs a command line to its exit. A usage error (an unknown option, a value of the wrong type, a missing
    argument) prints as every error of ours does, one line and exit 2, not as typer's usage lines and boxed message."""
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit comes back as its code
    except _CLICK_EXCEPTION as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help is printed already; click has no public name for it
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        print_error(exc.format_message().rstrip(".") + (f"; see {ctx.command_path} --help" if ctx is not None else ""))
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def version_option(program: str):
    """--version: the package version (the one an artifact's manifest records under tools.llama4_export), then exit."""
    from .. import __version__

    def show(given: bool) -> None:
        if given:
            console.print(f"{program} {__version__}", highlight=False)
            raise typer.Exit()

    return typer.Option(False, "--version", callback=show, is_eager=True, help="print the version and exit")


def piece_printer():
    """Stream callback: each token's text, or comma-separated ids when the artifact has no tokenizer."""
    printed = 0

    def print_piece(event) -> None:
        nonlocal printed
        if event.text is not None:  # a stop token's event has no text of its own but may carry what was held back
            sys.stdout.write(event.text)
        elif not event.stop:
            sys.stdout.write(f"{',' if printed else ''}{event.token_id}")
            printed += 1
        sys.stdout.flush()

    return print_piece
