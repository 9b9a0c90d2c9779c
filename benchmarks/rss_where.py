r"""Where a command's peak resident memory is: runs `llama4-export ARGS` in this process with a thread that samples
/proc/self/status every 20 ms, records the main thread's stack whenever RSS passes its peak by 32 MB, a timeline every
5 s, and each full (generation 2) garbage collection.

    python benchmarks/rss_where.py OUT.txt -- --model scout --layers 1 --checkpoint CKPT --precision int4 \
        --int4-algo rtn --out DIR --no-report

OUT.txt: the peak (VmRSS and anonymous memory), the timeline (anonymous RSS and the two innermost llama4_export
frames), the full collections, then the stack at each new peak. Found the dead weights that passes left to the cyclic
collector (BENCHMARKS.md, "Full-size layers").
"""

from __future__ import annotations

import atexit
import gc
import sys
import threading
import time
import traceback

from llama4_export.cli.export import main as export_main

from common import fail  # benchmarks/, beside this script

FIELDS = ("VmRSS", "RssAnon", "RssFile")
STEP_KB = 32 * 1024


def memory() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f if line.split(":")[0] in FIELDS}


class Recorder:
    def __init__(self):
        self.start = time.monotonic()
        self.peak = self.peak_anon = self.reported = 0
        self.stacks: list[tuple[float, dict[str, int], list[str]]] = []
        self.timeline: list[tuple[float, int, str]] = []
        self.collections: list[tuple[str, float, int]] = []

    def now(self) -> float:
        return time.monotonic() - self.start

    def sample_forever(self) -> None:
        main = threading.main_thread().ident
        last = -5.0
        while True:
            now = memory()
            frame = sys._current_frames().get(main)
            self.peak_anon = max(self.peak_anon, now["RssAnon"])
            if now["VmRSS"] > self.reported + STEP_KB:
                self.reported = now["VmRSS"]
                self.stacks.append((self.now(), now, traceback.format_stack(frame)[-14:] if frame else []))
            self.peak = max(self.peak, now["VmRSS"])
            if self.now() - last >= 5:
                last = self.now()
                ours = [f for f in traceback.extract_stack(frame) if "llama4_export" in f.filename][-2:] if frame else []
                where = " <- ".join(f"{f.filename.split('llama4_export/')[-1]}:{f.lineno}" for f in reversed(ours))
                self.timeline.append((last, now["RssAnon"], where))
            time.sleep(0.02)

    def on_collection(self, phase: str, info: dict) -> None:
        if info["generation"] == 2:
            self.collections.append((phase, self.now(), memory()["RssAnon"]))

    def write(self, path: str) -> None:
        gb = 1e9 / 1024  # /proc's "kB" (KiB) → GB (10^9 bytes)
        with open(path, "w") as f:
            f.write(f"peak VmRSS {self.peak / gb:.3f} GB, peak RssAnon {self.peak_anon / gb:.3f} GB\n\n")
            for t, anon, where in self.timeline:
                f.write(f"t={t:.0f}s anon={anon / gb:.3f} GB {where}\n")
            f.write("\n")
            for phase, t, anon in self.collections:
                f.write(f"gen-2 collection {phase} t={t:.1f}s anon={anon / gb:.3f} GB\n")
            for t, now, stack in self.stacks:
                f.write(f"\n=== t={t:.1f}s rss={now['VmRSS'] / gb:.3f} GB anon={now['RssAnon'] / gb:.3f} GB "
                        f"file={now['RssFile'] / gb:.3f} GB\n" + "".join(stack))


def main() -> None:
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        return
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        fail("usage: rss_where.py OUT.txt -- LLAMA4-EXPORT-ARGS (the output file, then -- and the export's own flags; "
             "--help explains)")
    out, args = sys.argv[1], sys.argv[3:]
    try:  # written at exit, after the whole export: find out now that it cannot be
        open(out, "a").close()
    except OSError as exc:
        fail(f"{out}: cannot write the output file there ({exc.strerror or exc}); give a writable path")
    recorder = Recorder()
    gc.callbacks.append(recorder.on_collection)
    atexit.register(recorder.write, out)
    threading.Thread(target=recorder.sample_forever, daemon=True).start()
    sys.argv = ["llama4-export", *args]
    export_main()


if __name__ == "__main__":
    main()
