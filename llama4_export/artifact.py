"""The artifact directory every stage reads and writes: manifest.json with sha256 of every file, atomic writes.

Layout (DESIGN.md §2): manifest.json, decode.onnx / prefill.onnx sharing one external-data file, tokenizer files,
later calibration.json, report.json, engine/*.plan. Same inputs ⇒ byte-identical files: JSON is written with sorted
keys, no timestamps, and the manifest lists files in sorted order.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from .errors import Llama4ExportError, is_integer

MANIFEST = "manifest.json"
FORMAT = "llama4-export"
# The artifact format: the graphs' input/output contract (model/io_spec.py) and the manifest's layout. A runtime reads
# exactly this version and refuses others; bump it whenever either changes incompatibly.
FORMAT_VERSION = 3  # 2: prefill graphs take logits_index; 3: in-place buffers keep decode scratch slots


class ArtifactError(Llama4ExportError):
    """An artifact directory is missing files, has a mismatching hash, or was written by something else."""


def user_cache_directory() -> Path:
    """$XDG_CACHE_HOME/llama4-export (~/.cache when unset): where the calibration, trace and verified-file caches
    live."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / FORMAT


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Deterministic JSON: sorted keys, fixed indentation, trailing newline."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def replaced_file(path: Path) -> Iterator[Path]:
    """A temp path beside `path` for the block to write whole, renamed over `path` when it ends and removed when it
    fails or a stop signal ends the process: a failed write (a full disk) leaves what was at `path` as it was, not cut
    short. A temp name of its own per writer (several may replace one file at once), created as any file is (umask),
    unlike mkstemp's."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with removed_if_stopped(tmp):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_json(path: Path, obj: Any) -> None:
    """write_json through replaced_file: `path` is the old file or the new one, never a part of either."""
    with replaced_file(path) as tmp:
        write_json(tmp, obj)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in the directory (except the manifest itself; a part's manifest.json is listed) into
    manifest['files'] and write it."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p != directory / MANIFEST)
    manifest = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION,
                "files": {p.relative_to(directory).as_posix(): sha256_file(p) for p in files}}
    write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read manifest.json; with verify, check every listed file exists and matches its sha256."""
    directory = Path(directory)
    path = directory / MANIFEST
    if directory.exists() and not directory.is_dir():
        raise ArtifactError(f"{directory}: a file, not an artifact directory; give the directory `llama4-export --out` "
                            "wrote")
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: artifact directory not found; create one with `llama4-export --out {directory}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if (directory / "config.json").is_file():  # the checkpoint itself, given where its export belongs
            raise ArtifactError(f"{directory}: a Hugging Face checkpoint (config.json, no {MANIFEST}), not an exported "
                                f"artifact: export it (llama4-export --checkpoint {directory} --out DIR); llama4-run "
                                "runs a checkpoint with --backend torch") from None
        raise ArtifactError(f"{path}: missing; this is not a complete llama4-export artifact (re-run the export)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc}); re-run the export") from None
    if not _is_ours(manifest):
        raise ArtifactError(f"{path}: not a {FORMAT} manifest; re-run the export")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version if version is not None else '0 (unversioned)'}, "
                            f"but this llama4-export reads version {FORMAT_VERSION}; re-export with this version (or "
                            "run it with the llama4-export that wrote it)")
    _check_shape(path, manifest)
    if verify:
        verify_files(directory, manifest, manifest["files"])
    return manifest


# the sections readers index into: a hand edit making one a string or a list ended in a traceback wherever it was read
OBJECT_SECTIONS = ("dtypes", "graph_passes", "graphs", "model", "source", "tokenizer", "tools", "vision")


def _check_shape(path: Path, manifest: dict[str, Any]) -> None:
    """The manifest's sections are objects and a part's `layers` a range [first, end); its values are checked where
    they are read."""
    for section in OBJECT_SECTIONS:
        if manifest.get(section) is not None and not isinstance(manifest[section], dict):
            raise ArtifactError(f"{path}: {section}={json.dumps(manifest[section])[:80]}: not an object; re-run the "
                                "export")
    for name in manifest["files"]:
        if not is_artifact_name(name):
            raise ArtifactError(f"{path}: files[{name!r}]: not a path inside the artifact (relative, of plain names); "
                                "re-run the export")
    layers = manifest.get("layers")
    if layers is not None and not (isinstance(layers, list) and len(layers) == 2 and all(is_integer(x) for x in layers)
                                   and 0 <= layers[0] < layers[1]):
        raise ArtifactError(f"{path}: layers={json.dumps(layers)[:80]}: not a part's [first, end) layer range; re-run "
                            "the export")


def is_artifact_name(name: Any) -> bool:
    """A name `files` may list: relative, with no "..", "." or empty part and no control character (a "../x" or
    absolute one was hashed, and a graph field naming it loaded, outside the artifact)."""
    return isinstance(name, str) and name.isprintable() and PurePosixPath(name).as_posix() == name \
        and not name.startswith("/") and all(part not in (".", "..") for part in name.split("/"))


def listed_file(directory: Path, manifest: dict[str, Any], name: Any, field: str) -> Path:
    """The file a manifest field names (a graph): one `files` lists, so inside the artifact and verified with it (an
    unlisted or absolute one was loaded unchecked; a FIFO hung ONNX Runtime)."""
    if not isinstance(name, str) or name not in manifest["files"]:
        raise ArtifactError(f"{Path(directory) / MANIFEST}: {field}={name!r}: not a file the artifact lists in `files`; "
                            "re-run the export")
    return Path(directory) / name


def partition_entries(directory: Path, manifest: dict[str, Any], num_layers: int) -> list[tuple[str, range]]:
    """A partitioned artifact's parts in order, (directory name, layers); [] for an unpartitioned one. Checked before
    any part is opened: each a distinct child directory whose manifest.json the artifact lists (a "../other" or absolute
    one loaded another artifact's graphs), the layer ranges integers, contiguous and covering 0..num_layers-1."""
    entries = manifest.get("partitions") or []
    where = f"{Path(directory) / MANIFEST}: partitions"
    if not isinstance(entries, list):
        raise ArtifactError(f"{where} is {type(entries).__name__}, not a list of parts; re-run the export")
    parts: list[tuple[str, range]] = []
    for k, entry in enumerate(entries):
        at = f"{where}[{k}]"
        if not isinstance(entry, dict):
            raise ArtifactError(f"{at}={entry!r}: not an object with a directory and layers; re-run the export")
        name, layers = entry.get("directory"), entry.get("layers")
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or \
                f"{name}/{MANIFEST}" not in manifest["files"]:
            raise ArtifactError(f"{at}.directory={name!r}: not a part directory of this artifact (a child directory "
                                f"whose {MANIFEST} the artifact lists); re-run the export")
        if any(name == other for other, _ in parts):
            raise ArtifactError(f"{at}.directory={name!r}: a second entry for that part; re-run the export")
        start = parts[-1][1].stop if parts else 0
        if not (isinstance(layers, list) and len(layers) == 2 and all(is_integer(x) for x in layers)
                and layers[0] == start and start < layers[1] <= num_layers):
            raise ArtifactError(f"{at}.layers={layers!r}: must be [{start}, end] with {start} < end <= {num_layers} "
                                f"(the parts cover layers 0..{num_layers - 1} in order); re-run the export")
        parts.append((name, range(*layers)))
    if parts and parts[-1][1].stop != num_layers:
        raise ArtifactError(f"{where}: the parts end at layer {parts[-1][1].stop - 1}, not {num_layers - 1} (the "
                            "model's last); re-run the export")
    return parts


def part_of_partitioned(directory: str | Path, manifest: dict[str, Any]) -> str | None:
    """For a part's own manifest (its graphs take or give hidden states mid-model, and its config is the whole
    model's), "DIR: one part (layers a..b) of a partitioned artifact" to start a refusal with; None otherwise."""
    if "layers" not in manifest or manifest.get("partitions"):
        return None
    first, end = manifest["layers"]
    return f"{directory}: one part (layers {first}..{end - 1}) of a partitioned artifact"


def _is_ours(manifest: Any) -> bool:
    """A llama4-export manifest, of any format version: an object naming our format and listing its files."""
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith(FORMAT) \
        and isinstance(manifest.get("files"), dict)


def unlisted_entries(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """The names at `directory`'s top level that its manifest does not list (a user's notes, another program's
    files): what replacing the directory by a new artifact would delete beyond the artifact's own files."""
    own = {MANIFEST} | {Path(name).parts[0] for name in manifest["files"]}
    return sorted(entry.name for entry in directory.iterdir() if entry.name not in own)


def check_replaceable(directory: Path, flag: str) -> None:
    """`directory` may be replaced whole by a new artifact: absent, empty, or an artifact (of any format version: an
    old one is replaced by a re-export) holding only its own files."""
    if directory.exists() and not directory.is_dir():
        raise ArtifactError(f"{directory}: exists and is not a directory; choose another {flag}")
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not _is_ours(manifest):  # no manifest, or another program's manifest.json (a web app's): not ours to replace
        raise ArtifactError(f"{directory}: directory is not empty and is not a llama4-export artifact; choose another "
                            f"{flag} or empty it")
    if foreign := unlisted_entries(directory, manifest):
        raise ArtifactError(f"{directory}: an artifact that also holds {foreign[0]!r}"
                            f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, not in its {MANIFEST}, "
                            f"which replacing the artifact would delete; move it out or choose another {flag}")


def verify_files(directory: Path, manifest: dict, names) -> None:
    """Each of `names` (paths in `directory`'s manifest) is there and hashes as the manifest says."""
    verified = _VerifiedFiles.load()
    for name in sorted(names):
        file, expected = directory / name, manifest["files"].get(name)
        if not file.is_file():
            raise ArtifactError(f"{file}: listed in {MANIFEST} but missing; the artifact is incomplete, re-run the export")
        stat = file.stat()  # before hashing: a write during the hash changes it, and the next load hashes again
        if verified.holds(file, stat, expected):
            continue
        if sha256_file(file) != expected:
            raise ArtifactError(f"{file}: sha256 does not match {MANIFEST}; the file was modified or damaged, re-run the export")
        verified.add(file, stat, expected)
    verified.save()


class _VerifiedFiles:
    """Files whose sha256 matched, keyed by path and stat (device, inode, size, mtime, ctime), in
    $XDG_CACHE_HOME/llama4-export/verified.json: a load of an unchanged artifact skips re-hashing it (sha256 runs at
    ≈ 1.6 GB/s here: Scout int4's ≈ 56 GiB would cost ≈ 40 s on every llama4-run, and once per Ray replica). Any write to a file changes its ctime,
    which no user call can set back. Racy entries are not stored: a file changed within the last RACY_S seconds could
    change again inside the same timestamp tick (git's "racy clean" case). A cache that cannot be read or written
    only means hashing again."""

    RACY_S = 2.0
    MAX_ENTRIES = 4096

    def __init__(self, path: Path, entries: dict[str, list]):
        self.path, self.entries, self.changed = path, entries, False

    @classmethod
    def load(cls) -> "_VerifiedFiles":
        path = user_cache_directory() / "verified.json"
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = {}
        return cls(path, entries if isinstance(entries, dict) else {})

    @staticmethod
    def _key(stat: os.stat_result, sha256: str) -> list:
        return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, sha256]

    def holds(self, file: Path, stat: os.stat_result, sha256: str) -> bool:
        return self.entries.get(str(file.resolve())) == self._key(stat, sha256)

    def add(self, file: Path, stat: os.stat_result, sha256: str) -> None:
        if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) < self.RACY_S * 1e9:
            return
        name = str(file.resolve())
        self.entries.pop(name, None)  # re-inserted last: the oldest entries are dropped first
        self.entries[name] = self._key(stat, sha256)
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        kept = dict(list(self.entries.items())[-self.MAX_ENTRIES:])
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".verified-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(kept, f)
            os.replace(tmp, self.path)  # concurrent loads (Ray replicas): the last complete file wins
        except OSError:
            if tmp is not None:  # a full disk: no half-written temp file left in the cache directory
                Path(tmp).unlink(missing_ok=True)


def replaceable_directory(target: str | Path) -> Path:
    """`target` as an absolute path that atomic_directory may replace (`.` has no name to put a temp directory
    beside); the current directory, or one that holds it, is refused: renamed away, it would leave the shell that ran
    the command in a deleted directory. A symlink stands for the directory it points to, which is replaced (the link
    itself was renamed away, replaced by a plain directory, and the one it pointed to left as it was)."""
    target = Path(os.path.realpath(target) if os.path.islink(target) else os.path.abspath(target))
    here = Path.cwd()
    if target == here or target in here.parents:
        raise ArtifactError(f"{target}: is the current directory{'' if target == here else ' or holds it'}, and an "
                            f"artifact directory is replaced as a whole; give a path below it, e.g. {target / 'out'}")
    if os.path.ismount(target):  # an empty volume: the export ran, then its rename into place failed (EBUSY)
        raise ArtifactError(f"{target}: is a mount point, and an artifact directory is renamed into place as a whole; "
                            f"give a path inside it, e.g. {target / 'model'}")
    return target


def check_writable(path: Path, flag: str, error: type[Exception] = ArtifactError, create_parent: bool = False) -> None:
    """`error` in one line unless a file can be written at `path` — its directory (created first with create_parent)
    probed with a temp file, as the writer's temp-and-rename needs it — before the work whose result goes there."""
    try:
        if create_parent:
            path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        where = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else exc.strerror or str(exc)
        raise error(f"{flag} {path}: cannot write there ({where}); give a writable path") from None


def writable_parent(target: Path) -> Path:
    """`target`'s parent directory, created if missing; ArtifactError in one line where it cannot be (a file on the
    way) — before an export's work, not at its end."""
    parent = Path(os.path.abspath(target)).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next(p for p in (parent, *parent.parents) if p.exists())
        raise ArtifactError(f"{target}: {blocking} is a file, not a directory; choose another path") from None
    except OSError as exc:
        raise ArtifactError(f"{target}: cannot create {parent} ({exc.strerror}); choose a writable location") from None
    return parent


class _Termination:
    """SIGTERM / SIGINT in the CLIs (exit_on_signals). Raising an exception wherever the main thread stands can land it
    inside Python code that C++ called (torch's tracing and dispatch, an import torch made), which turns it into a
    RuntimeError or std::terminate (SIGABRT, no cleanup at all). So the handler removes this process's scratch and
    exits there and then; inside `uninterrupted()` (an artifact being swapped into place) the exit waits for its end."""

    scratch: set[Path] = set()  # held directories and temp files: what a job killed this way removes
    children: set[subprocess.Popen] = set()  # processes doing this job's work: a signal to this process alone leaves
    # them running on, orphaned
    depth = 0
    pending: int | None = None

    @classmethod
    def handle(cls, signum: int, frame) -> None:
        if cls.depth:
            cls.pending = signum
        else:
            cls.exit(signum)

    @classmethod
    def exit(cls, signum: int) -> None:
        for child in cls.children:  # before the scratch it may be writing into
            with contextlib.suppress(OSError):
                child.kill()
                child.wait()
        for path in sorted(cls.scratch, reverse=True):  # a directory's own entries before it
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            # the process's own stderr: a progress display stands in for sys.stderr on a terminal, and printed the
            # line above its spinner, redrawn last, and dropped the escape that shows the cursor again
            stderr = sys.__stderr__
            if stderr.isatty():
                stderr.write("\x1b[?25h")  # a progress spinner hid the cursor
            stderr.write(f"\nstopped by {signal.Signals(signum).name}: this job's temp files were removed\n")
            sys.stdout.flush()
            stderr.flush()
        os._exit(128 + signum)


def exit_on_signals(*signums: int) -> None:
    """On these signals, remove the scratch of this process (`removed_if_stopped`) and exit with 128 + the signal —
    except those this process was started ignoring: `nohup` ignores SIGHUP, a shell script's background job SIGINT."""
    for signum in signums:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _Termination.handle)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A stop signal that arrives in this block takes effect at its end (two renames that must both happen)."""
    _Termination.depth += 1
    try:
        yield
    finally:
        _Termination.depth -= 1
        if not _Termination.depth and _Termination.pending is not None:
            _Termination.exit(_Termination.pending)


@contextlib.contextmanager
def removed_if_stopped(path: Path) -> Iterator[Path]:
    """`path` (scratch) is removed if a stop signal ends the process while this block runs."""
    _Termination.scratch.add(path)
    try:
        yield path
    finally:
        _Termination.scratch.discard(path)


@contextlib.contextmanager
def child_process(command: list[str], **popen_options: Any) -> Iterator[subprocess.Popen]:
    """subprocess.Popen(command) doing this job's work, killed if the block fails (a KeyboardInterrupt where no handler
    is installed) or a stop signal ends this process while it runs: left alone, it would run on, orphaned."""
    with uninterrupted():  # a stop between the start and the registration would leave it running
        process = subprocess.Popen(command, **popen_options)
        _Termination.children.add(process)
    with process:
        try:
            yield process
        except BaseException:
            process.kill()
            raise
        finally:
            _Termination.children.discard(process)


def end_with_parent(parent: int) -> None:
    """Called first thing in a `child_process` child: the kernel SIGKILLs it when `parent` dies, even by SIGKILL (the
    OOM killer, a CI runner's hard kill), which no handler of the parent's sees. Linux only; elsewhere nothing.
    Set here, not in a Popen preexec_fn: that one is not safe in a parent with threads (a server, ORT's pools)."""
    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # The signal follows the parent *thread* that started this process: child_process's block waits on it there, so
    # that thread outlives it. A parent that died before the prctl sent nothing: this process is already reparented.
    if os.getppid() != parent:
        os._exit(1)


@contextlib.contextmanager
def held_directory(parent: Path, prefix: str) -> Iterator[Path]:
    """A new directory in `parent` named `prefix` + random, removed when the block ends (unless it was renamed away)
    or a stop signal ends the process, and locked (flock) while the block runs: the kernel drops the lock with its
    process however that ends, which is how remove_abandoned tells a running job's scratch from one a SIGKILL or the
    OOM killer left behind."""
    # Locked under a name no sweep matches, then renamed: a sweep never sees it unlocked.
    with contextlib.ExitStack() as registered:
        with uninterrupted():
            try:
                unlocked = Path(tempfile.mkdtemp(prefix=".llama4-new-", dir=parent))
            except OSError as exc:  # a read-only file system, no permission
                raise ArtifactError(f"{parent}: cannot create a directory there ({exc.strerror}); choose a writable "
                                    "location") from None
            registered.enter_context(removed_if_stopped(unlocked))
        fd = os.open(unlocked, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _lock(fd, blocking=True)
            path = parent / f"{prefix}{unlocked.name.removeprefix('.llama4-new-')}"
            with uninterrupted():
                os.rename(unlocked, path)
                registered.enter_context(removed_if_stopped(path))
            try:
                yield path
            finally:
                shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
            shutil.rmtree(unlocked, ignore_errors=True)  # only when the rename failed


def _lock(fd: int, blocking: bool) -> bool | None:
    """flock(fd): True when taken, False when another process holds it, None where the file system has no flock
    (some network mounts): nothing is then known of the directory's owner."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def scratch_patterns(target: Path) -> list[str]:
    """The names of the scratch directories a job writing `target` makes beside it (held_directory's, and the
    previous artifact while it is swapped out)."""
    return [f".{target.name}.tmp-*", f".{target.name}.work-*", f".{target.name}.old-*", ".spill-*", ".report-*"]


def held_temp_directory(prefix: str, on_removed: Callable[[str], None]) -> contextlib.AbstractContextManager[Path]:
    """held_directory in the temp directory (TMPDIR) named `prefix` + random, once the ones of that prefix a killed job
    left there are removed (remove_abandoned; `on_removed` gets its line): the scratch of jobs with no `--out` to
    work beside (a rebuild's export, a benchmark's result, a report's graph copies)."""
    temp = Path(tempfile.gettempdir())
    if (removed := remove_abandoned(temp, [f"{prefix}*"])) is not None:
        on_removed(removed)
    return held_directory(temp, prefix)


def remove_abandoned_beside(target: Path) -> str | None:
    """remove_abandoned on the scratch of jobs that wrote `target`."""
    target = Path(os.path.abspath(target))
    return remove_abandoned(target.parent, scratch_patterns(target))


def remove_abandoned(parent: Path, patterns: list[str]) -> str | None:
    """Remove the directories in `parent` matching `patterns` that no running process holds: scratch left by a job
    killed before its cleanup ran (at Scout's size, hundreds of GB the next export's disk check would miss). Returns
    the line saying what went, or None."""
    removed, total = [], 0
    for path in sorted({p for pattern in patterns for p in parent.glob(pattern)}):
        with _probed_lock(path) as taken:
            if taken:
                total += sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file() and not f.is_symlink())
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    if not removed:
        return None
    shown = f"{total / 1e9:,.1f} GB" if total >= 1e8 else f"{total / 1e6:,.1f} MB"
    return f"removed {', '.join(removed)} ({shown}) from {parent}: left by a job killed before it cleaned up"


@contextlib.contextmanager
def _probed_lock(path: Path) -> Iterator[bool | None]:
    """flock a scratch directory without waiting, held for the block: True when taken (no job holds it), False when a
    running job does, None when it is no plain directory or the file system has no flock."""
    try:
        fd = None if path.is_symlink() or not path.is_dir() else os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        fd = None
    try:
        yield None if fd is None else _lock(fd, blocking=False)
    finally:
        if fd is not None:
            os.close(fd)


def _check_sole_writer(target: Path, own: Path) -> None:
    """Refuse when another running job writes `target` (its temp directory beside it is locked): both would succeed
    and the last to finish silently replace the other's artifact."""
    for path in sorted(set(target.parent.glob(f".{glob.escape(target.name)}.tmp-*")) - {own}):
        with _probed_lock(path) as taken:
            if taken is False:
                raise ArtifactError(f"{target}: another llama4-export job is writing it ({path.name} is locked); wait "
                                    "for it to finish or choose another directory")


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temp directory beside `target`; on success replace `target` with it, on failure remove it.

    Nothing half-written ever sits at `target` looking complete.
    """
    target = replaceable_directory(target)
    with held_directory(writable_parent(target), f".{target.name}.tmp-") as tmp:
        _check_sole_writer(target, tmp)
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; before the swap: a stop while the old one is removed ends there
        with uninterrupted():  # a stop between the renames would leave neither artifact at `target`
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
                os.replace(tmp, target)
            else:
                old = None
                os.replace(tmp, target)
        if old is not None:
            with removed_if_stopped(old):
                shutil.rmtree(old, ignore_errors=True)
