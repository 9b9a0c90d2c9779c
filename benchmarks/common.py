"""What the benchmark scripts share: argument types and a parser that refuse bad input up front, before any export,
download or timing; one-line errors (exit 2, as the llama4-export CLI) for bad input, the package's errors and failed
child processes; and the machine line every timing table starts with (BENCHMARKS.md, "Machine").

    from common import ArgumentParser, positive_int, run_script
    ...
    if __name__ == "__main__":
        run_script(main)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, NoReturn, TextIO

from llama4_export.errors import Llama4ExportError


class BenchmarkError(Llama4ExportError):
    """Bad input a script can only see after parsing (a missing file, a child process that failed)."""


def fail(message: str) -> NoReturn:
    print(f"{Path(sys.argv[0]).name}: {message}", file=sys.stderr)
    sys.exit(2)


def summary(doc: str) -> str:
    """A script's --help description: its docstring's whole first paragraph (its first line stops mid-sentence)."""
    return " ".join(doc.strip().split("\n\n")[0].split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad argument is one line (argparse prints its usage block above it)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (--help lists the options)")


def _checked(kind: type, ok: Callable[[float], bool], wanted: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {wanted}")
        return value

    return parse


positive_int = _checked(int, lambda v: v > 0, "an integer of 1 or more")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer of 0 or more")
positive_float = _checked(float, lambda v: v > 0, "a number above 0")
two_or_more = _checked(int, lambda v: v >= 2,
                       "an integer of 2 or more (decode is timed from the first new token to the last)")


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers of 1 or more ("1,8"; "" is none)."""
    return [positive_int(v.strip()) for v in text.split(",") if v.strip()]


def existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory; give an existing one")
    return path


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file; give an existing one")
    return path


def new_file(text: str) -> Path:
    """A file to write at the end: its directory must exist now, not after the whole benchmark has run."""
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: its directory {path.parent} does not exist; create it first")
    return path


def run_script(main: Callable[[], object]) -> None:
    """Runs a script's main: the package's errors (bad artifacts, checkpoints, options) as one line, exit 2."""
    try:
        main()
    except Llama4ExportError as exc:
        fail(str(exc))


def last_error_line(stderr: str) -> str:
    """A child's own last error line: the last line with words in it, out of any box rich/typer drew around it."""
    lines = [line.strip(" │┃|") for line in stderr.splitlines() if any(c.isalnum() for c in line)]
    return lines[-1].strip() if lines else "no error output"


def check_child(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd) whose failure is one line with the child's own last error line, not CalledProcessError
    (which names only the command and its exit status). The child's stderr is captured; stdout is as kwargs say."""
    done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, **kwargs)
    if done.returncode:
        raise BenchmarkError(f"{what} failed (exit {done.returncode}): {last_error_line(done.stderr)}")
    return done


def print_machine(threads: int, file: TextIO | None = None) -> float:
    """Prints the machine line (CPU, the kernel-relevant flags, copy bandwidth at `threads`); returns the bandwidth."""
    from llama4_export.evaluation.bench import machine_info, memory_bandwidth_gb_s

    # rounded once, as machine_json records it: the printed line and the JSON must show the same figure
    machine, bandwidth = machine_info(), round(memory_bandwidth_gb_s(threads), 2)
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, flags {' '.join(machine['cpu_flags'])}; copy bandwidth "
          f"{bandwidth:.1f} GB/s ({threads} threads); 1-min load {os.getloadavg()[0]:.2f}", file=file or sys.stdout,
          flush=True)
    return bandwidth


def machine_json(bandwidth: float, threads: int) -> dict:
    """The machine line for a script's JSON: machine_info() and the copy bandwidth print_machine measured (and
    rounded: rounding here again could record a figure the printed line does not show)."""
    from llama4_export.evaluation.bench import machine_info

    return {**machine_info(), "copy_bandwidth_gb_s": bandwidth, "copy_threads": threads}
