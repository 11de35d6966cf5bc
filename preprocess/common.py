"""What both preprocessing scripts share: find the inputs, convert each one in a worker process with a progress
bar, and keep `DST/manifest.csv` and `DST/failures.txt`.

Across machines: `--shard I/N` converts only the inputs whose output name hashes to shard I (deterministic, the same
on every machine whatever else SRC holds; sources that would write one output fall in one shard), with its own
`DST/manifest.shard-I-of-N.csv` and `DST/failures.shard-I-of-N.txt`, so shards can run at the same time into one
DST. A run without `--shard` (or with `--merge-only`) merges the shards' manifests into `DST/manifest.csv`.

Outputs are atomic: a converter writes into a temporary name (`<final>.tmp-<pid>`) and renames it to the final
name only once ffmpeg succeeded and the result was checked, so a final name that exists is a complete output
and a kill at any moment leaves at most a temporary, which the next run removes. Temporary names never end in
a video extension, so `find_videos` on DST does not pick them up. One run at a time per DST.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from tqdm import tqdm

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".wmv",
                              ".3gp", ".ogv"})
MANIFEST_NAME = "manifest.csv"
MANIFEST_FIELDS = ("path", "frames", "fps", "width", "height")
FAILURES_NAME = "failures.txt"
SETTINGS_NAME = "settings.json"
# -progress: ffmpeg reports on stdout the end time of what it wrote, which the truncation check needs.
FFMPEG_GLOBAL_ARGS = ("-nostdin", "-hide_banner", "-loglevel", "error", "-filter_complex_threads", "1",
                      "-progress", "pipe:1", "-nostats")
FFMPEG_TIMEOUT_S = 900  # a hung ffmpeg on a malformed file fails that file instead of stalling the run
MANIFEST_SAVE_INTERVAL_S = 120  # a killed run then re-probes at most this much work to rebuild the manifest
_TEMP_NAME = re.compile(r"\.tmp-\d+$")
_ADDRESS = re.compile(r" @ 0x[0-9a-f]+")  # "[h264 @ 0x55c6...]" -> "[h264]"


class PreprocessError(Exception):
    """One input that cannot be converted; the message says why (usually ffmpeg's own error)."""


@dataclass(frozen=True)
class ManifestRow:
    path: str  # relative to DST, forward slashes
    frames: int  # decoded frames (Kinetics) or JPEG files (SSv2)
    fps: float
    width: int
    height: int


@dataclass(frozen=True)
class Task:
    source: str  # relative to SRC, forward slashes
    output: str  # relative to DST, forward slashes


@dataclass(frozen=True)
class Result:
    task: Task
    status: str  # "done" | "skipped" (complete before this run) | "failed"
    row: ManifestRow | None = None
    error: str = ""


class Converter(Protocol):
    """What `run_tasks` needs from a script. Must pickle (it is sent to the worker processes)."""

    src: Path
    dst: Path

    def is_complete(self, output: Path) -> bool:
        """Whether the final output exists (it only ever appears complete)."""

    def convert(self, task: Task) -> ManifestRow:
        """Write the output of `task` atomically; raise `PreprocessError` on a bad input."""

    def describe(self, task: Task) -> ManifestRow:
        """The manifest row of an output that is complete but missing from the manifest (killed run)."""


# ---------------------------------------------------------------------------------------------------- files


def find_videos(root: Path, recursive: bool = True, exclude: Path | None = None) -> list[str]:
    """Relative paths (forward slashes, sorted) of the video files under `root`, by extension.

    Args:
        exclude: a folder not to descend into (DST when it lies inside SRC).
    """
    root = Path(root)
    exclude = Path(exclude).resolve() if exclude is not None else None
    found = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if recursive and (Path(folder, d).resolve() != exclude))
        found += [Path(folder, name).relative_to(root).as_posix() for name in filenames
                  if Path(name).suffix.lower() in VIDEO_EXTENSIONS]
    return sorted(found)


def temp_path(final: Path) -> Path:
    """Where a worker writes `final` before renaming it; the pid keeps concurrent workers apart."""
    return final.with_name(f"{final.name}.tmp-{os.getpid()}")


def remove_stale_temps(folders: Iterable[Path], owned: set[Path] | None = None) -> None:
    """Delete the temporaries a killed run left in `folders` (not recursive); with `owned`, only those of these
    final paths (a shard leaves the temporaries of the shards running beside it alone).

    Errors are ignored: an ffmpeg orphaned by a killed run may still be writing one, and a temporary left
    behind is harmless (it never has a final name).
    """
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            if not _TEMP_NAME.search(entry.name):
                continue
            if owned is not None and Path(folder, _TEMP_NAME.sub("", entry.name)) not in owned:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)


def commit_file(tmp: Path, final: Path) -> None:
    """Flush a finished temporary file to disk and rename it to its final name."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers only ever see the old or the new content."""
    tmp = temp_path(path)
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_manifest(path: Path) -> dict[str, ManifestRow]:
    """Rows of a manifest keyed by path; empty when the file does not exist."""
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != MANIFEST_FIELDS:
            raise ValueError(f"{path}: header is {reader.fieldnames}, expected {','.join(MANIFEST_FIELDS)}")
        rows = [ManifestRow(r["path"], int(r["frames"]), float(r["fps"]), int(r["width"]), int(r["height"]))
                for r in reader]
    return {row.path: row for row in rows}


def write_manifest(path: Path, rows: Iterable[ManifestRow]) -> None:
    """Write rows sorted by path, atomically."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(MANIFEST_FIELDS)
    for row in sorted(rows, key=lambda r: r.path):
        writer.writerow([row.path, row.frames, round(row.fps, 6), row.width, row.height])
    atomic_write_text(path, out.getvalue())


class FailureLog:
    """`DST/failures.txt`: one `source<TAB>error` line per input that failed in the latest run.

    Lines are written as failures happen, so the file can be watched during a long run. Inputs that failed
    before are retried, so the file of an earlier run is removed when a run starts.
    """

    def __init__(self, path: Path):
        self.path = path
        self._file = None
        path.unlink(missing_ok=True)

    def add(self, source: Path, error: str) -> None:
        if self._file is None:
            self._file = open(self.path, "w")
        self._file.write(f"{source}\t{' | '.join(error.splitlines())}\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# ------------------------------------------------------------------------------------------------- ffmpeg


def ffmpeg_path(path: Path | str) -> str:
    """`path` as it is handed to ffmpeg and ffprobe: absolute, so that they read it as a file name, whatever it is.

    They read a relative name by its first characters: `-x.mp4` as an option (3% of Kinetics ids begin with '-',
    and SRC `.` hands them over as they are), `a:b.mp4` as the protocol `a` ("Protocol not found"), `-` alone as
    stdin/stdout. An absolute path begins with '/', which they read as a file and nothing else. A `./` prefix would
    avoid the same; the absolute path also names the file fully in ffmpeg's errors (and so in failures.txt). The
    `file:` protocol would too, but it is a URL, not a path: one more form to keep apart from the paths the
    scripts open themselves. `absolute`, not `resolve` (the path the user typed, symlinks kept) nor
    `os.path.abspath` (which drops a `..` lexically, wrong after a symlink).
    """
    return str(Path(path).absolute())


def run_command(args: list[str]) -> subprocess.CompletedProcess:
    """Run ffmpeg/ffprobe (text output); raise `PreprocessError` with the tail of its error output if it fails."""
    try:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              timeout=FFMPEG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PreprocessError(f"{Path(args[0]).name} timed out after {FFMPEG_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        raise PreprocessError(f"{Path(args[0]).name} exited with {proc.returncode}: {error_tail(proc.stderr)}")
    return proc


def error_tail(stderr: str, lines: int = 4) -> str:
    """The last few lines of ffmpeg's error output on one line (the first ones are usually consequences)."""
    kept = [_ADDRESS.sub("", line.strip()) for line in stderr.splitlines() if line.strip()]
    return " | ".join(kept[-lines:]) or "no error message"


@dataclass(frozen=True)
class SourceInfo:
    rate: Fraction | None  # frame rate to keep; None when the container gives none
    duration: float | None  # seconds the container declares for the video; None when unknown
    width: int
    height: int


def probe_source(path: Path) -> SourceInfo:
    """Frame rate, declared duration and size of the first video stream; `PreprocessError` if unreadable."""
    out = run_command(["ffprobe", "-v", "error", "-select_streams", "V:0", "-show_streams", "-show_format",
                       "-of", "json", ffmpeg_path(path)])
    info = json.loads(out.stdout)
    if not info.get("streams"):
        raise PreprocessError("no video stream")
    stream = info["streams"][0]
    return SourceInfo(source_frame_rate(stream), _declared_duration(stream, info.get("format", {})),
                      int(stream.get("width", 0)), int(stream.get("height", 0)))


def parse_rate(text: str | None) -> Fraction | None:
    """'30000/1001' or '29.97' -> Fraction; None for missing or zero rates ('0/0', 'N/A')."""
    try:
        rate = Fraction(text)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return rate if rate > 0 else None


def source_frame_rate(stream: dict) -> Fraction | None:
    """The rate a video plays at: the exact nominal rate when it is constant (30000/1001), else the average.

    For variable-rate videos `r_frame_rate` is the finest timestamp step (it can be 90000/1), so the average
    rate, frames / duration, is the one that keeps the frame count.
    """
    nominal, average = parse_rate(stream.get("r_frame_rate")), parse_rate(stream.get("avg_frame_rate"))
    if nominal and average and abs(nominal - average) <= nominal / 100:
        return nominal
    rate = average or nominal
    return rate.limit_denominator(1001) if rate else None


def _declared_duration(stream: dict, fmt: dict) -> float | None:
    """Video duration from the stream, else Matroska's DURATION tag, else the container's."""
    if stream.get("duration") not in (None, "N/A"):
        return float(stream["duration"])
    tag = (stream.get("tags") or {}).get("DURATION")
    if tag:
        hours, minutes, seconds = tag.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    if fmt.get("duration") not in (None, "N/A"):
        return float(fmt["duration"])
    return None


def written_seconds(progress: str) -> float:
    """End time of the last frame ffmpeg wrote, from its `-progress pipe:1` output (0 if none)."""
    values = re.findall(r"^out_time_us=(\d+)$", progress, flags=re.MULTILINE)
    return int(values[-1]) / 1e6 if values else 0.0


def check_not_truncated(frames: int, seconds: float, declared: float | None, stderr: str = "") -> None:
    """Raise if ffmpeg wrote no frame, or clearly less time than the file declares.

    ffmpeg exits with 0 on a file cut short after its header (a truncated WebM, or an MP4 with its index at the
    front): it converts what it can read. Such an output would silently train on part of a video.
    """
    detail = f"; ffmpeg: {error_tail(stderr)}" if stderr.strip() else ""
    if frames == 0:
        raise PreprocessError(f"no frame decoded{detail}")
    if declared and declared - seconds > max(0.5, 0.05 * declared):
        raise PreprocessError(f"truncated: decoded {seconds:.2f} s of the {declared:.2f} s the file declares{detail}")


def frames_per_second(nominal: Fraction | None, frames: int, seconds: float | None) -> Fraction | None:
    """`nominal` when `frames` fill `seconds` at that rate (within 1%), else the average frames / seconds (a
    variable-rate WebM can declare a nominal rate its timestamps do not follow)."""
    if not seconds:
        return nominal
    average = Fraction(frames) / Fraction(seconds).limit_denominator(1_000_000)
    if nominal and abs(nominal - average) <= nominal / 100:
        return nominal
    return average.limit_denominator(1001)


def scale_to_short_side(short_side: int) -> dict[str, str]:
    """`scale` filter arguments: short side of the displayed picture to `short_side`, aspect kept, the other
    side rounded to an even number (yuv420p needs even sizes). Uses `dar`, so non-square pixels are undone
    (add `setsar=1` after)."""
    s = short_side
    return {"w": f"if(gte(dar,1),2*round({s}*dar/2),{s})", "h": f"if(gte(dar,1),{s},2*round({s}/dar/2))"}


# ---------------------------------------------------------------------------------------------------- runner


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N) with 0 <= I < N (argparse type of --shard)."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise argparse.ArgumentTypeError(f"--shard must be I/N with 0 <= I < N (e.g. 0/8 ... 7/8), got {text!r}")
    return int(match[1]), int(match[2])


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()  # --merge-only merges the shards: it takes no --shard
    group.add_argument("--shard", type=parse_shard, metavar="I/N",
                        help="convert only shard I of N (0 <= I < N; e.g. one per node or per job of an array, at the "
                             "same time into one DST), with its own manifest and failure list; a run without "
                             "--shard merges them into DST/manifest.csv")
    group.add_argument("--merge-only", action="store_true",
                        help="convert nothing: merge the shards' manifests into DST/manifest.csv and their failure "
                             "lists into DST/failures.txt")


def shard_of(output: str, num_shards: int) -> int:
    """The shard of an output name: a fixed hash, the same on every machine and whatever else SRC holds."""
    return zlib.crc32(output.encode()) % num_shards


def shard_files(dst: Path, shard: tuple[int, int] | None) -> tuple[Path, Path]:
    """(manifest, failure list) of a shard, or DST's own without one."""
    if shard is None:
        return dst / MANIFEST_NAME, dst / FAILURES_NAME
    i, n = shard
    return dst / f"manifest.shard-{i}-of-{n}.csv", dst / f"failures.shard-{i}-of-{n}.txt"


def _shard_manifests(dst: Path) -> list[Path]:
    return sorted(dst.glob("manifest.shard-*-of-*.csv"))


def merge_shards(converter: Converter, dst: Path) -> int:
    """--merge-only: the shards' manifest rows (of outputs still complete) into DST/manifest.csv, their failure lists
    into DST/failures.txt; the shard files are removed once merged. Returns 1 if a shard listed failures."""
    rows = _merged_rows(converter, dst)
    failed = [line for path in sorted(dst.glob("failures.shard-*-of-*.txt")) for line in path.read_text().splitlines()]
    write_manifest(dst / MANIFEST_NAME, rows.values())
    failure_path = dst / FAILURES_NAME
    if failed:
        atomic_write_text(failure_path, "\n".join(failed) + "\n")
    else:
        failure_path.unlink(missing_ok=True)
    _remove_shard_files(dst)
    print(f"merge: {len(rows)} outputs in {dst / MANIFEST_NAME}, {len(failed)} failed"
          + (f" (listed in {failure_path})" if failed else ""))
    return 1 if failed else 0


def _merged_rows(converter: Converter, dst: Path) -> dict[str, ManifestRow]:
    """DST/manifest.csv and every shard manifest, keeping the rows whose output is complete."""
    rows = {}
    for path in [dst / MANIFEST_NAME, *_shard_manifests(dst)]:
        rows.update(read_manifest(path))
    return {path: row for path, row in rows.items() if converter.is_complete(dst / path)}


def _remove_shard_files(dst: Path) -> None:
    for path in [*_shard_manifests(dst), *dst.glob("failures.shard-*-of-*.txt")]:
        path.unlink(missing_ok=True)


def run_tasks(converter: Converter, tasks: list[Task], dst: Path, workers: int, desc: str,
              settings: dict, shard: tuple[int, int] | None = None) -> int:
    """Convert every task not complete yet, in `workers` processes, and keep the manifest and failure list.

    `settings` are the options that shape the outputs (JSON values), checked against `DST/settings.json`.
    With `shard` (I, N), only the tasks of shard I, with the shard's own manifest and failure list; without, the
    shards' manifests are merged into DST's (and removed).
    Prints a summary; returns the exit status: 1 if any task failed, 2 if the settings differ from the ones DST
    was written with, 130 on Ctrl-C, else 0.
    """
    dst.mkdir(parents=True, exist_ok=True)
    try:
        check_settings(dst / SETTINGS_NAME, settings)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest_path, failure_path = shard_files(dst, shard)
    owned = None  # a shard leaves the temporaries of the shards beside it alone
    if shard is not None:
        tasks = [task for task in tasks if shard_of(task.output, shard[1]) == shard[0]]
        owned = {dst / task.output for task in tasks} | {manifest_path, failure_path}
    remove_stale_temps({dst} | {(dst / task.output).parent for task in tasks}, owned=owned)
    # Entries of outputs deleted since are dropped; complete outputs the manifest lacks are described again. Without
    # a shard, the shards' manifests are merged in.
    rows = {path: row for path, row in read_manifest(manifest_path).items() if converter.is_complete(dst / path)} \
        if shard is not None else _merged_rows(converter, dst)
    failures = FailureLog(failure_path)
    counts = Counter()
    pending, conflicts = _plan(converter, tasks, rows, dst)
    counts["skipped"] = len(tasks) - len(pending) - len(conflicts)
    last_save, interrupted = time.monotonic(), False
    try:
        with tqdm(total=len(tasks), initial=counts["skipped"], desc=desc, unit="video") as bar:
            results = _map_unordered(partial(_run_task, converter), pending, workers, bar, on_died=_worker_died)
            for result in chain(conflicts, results):
                counts[result.status] += 1
                if result.row is not None:
                    rows[result.row.path] = result.row
                if result.status == "failed":
                    failures.add(converter.src / result.task.source, result.error)
                    bar.write(f"failed: {converter.src / result.task.source}: {result.error}")
                if time.monotonic() - last_save > MANIFEST_SAVE_INTERVAL_S:
                    write_manifest(manifest_path, rows.values())
                    last_save = time.monotonic()
    except KeyboardInterrupt:  # workers and their ffmpeg got it too and removed their temporaries
        interrupted = True
    finally:  # what finished is kept, also on Ctrl-C
        write_manifest(manifest_path, rows.values())
        failures.close()
    if shard is None and not interrupted:  # merged: this run retried what the shards failed on
        _remove_shard_files(dst)
    print(f"{desc}: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
          + (f" (listed in {failures.path})" if counts["failed"] else "")
          + ("; interrupted, run again to resume" if interrupted else ""))
    return 130 if interrupted else 1 if counts["failed"] else 0


def check_settings(path: Path, settings: dict) -> None:
    """Record `settings` in `path` on the first run; refuse a run with other ones. A rerun skips complete outputs,
    so a changed setting would leave DST with outputs of both kinds."""
    if not path.exists():
        atomic_write_text(path, json.dumps(settings, indent=1, sort_keys=True) + "\n")
        return
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it if DST holds no outputs yet") from None
    changed = {key: (recorded.get(key), settings.get(key)) for key in recorded.keys() | settings.keys()
               if recorded.get(key) != settings.get(key)}
    if changed:
        listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))
        raise ValueError(f"{path.parent} was written with other settings ({listed}); outputs would be mixed. Use "
                         f"another DST, or delete {path} and the outputs to redo them with the new settings")


def _plan(converter: Converter, tasks: list[Task], rows: dict, dst: Path) -> tuple[list[Task], list[Result]]:
    """Tasks still to run (not complete, or complete but not in the manifest), and the sources that would
    overwrite the output of an earlier source (e.g. `a.webm` and `a.mkv` -> `a.mp4`), as failures."""
    pending, conflicts, claimed = [], [], {}
    for task in tasks:
        if task.output in claimed:
            error = f"{task.output} is also the output of {claimed[task.output]}; rename one of them"
            conflicts.append(Result(task, "failed", error=error))
            continue
        claimed[task.output] = task.source
        if not (task.output in rows and converter.is_complete(dst / task.output)):
            pending.append(task)
    return pending, conflicts


def _worker_died(task: Task) -> Result:
    return Result(task, "failed", error="the worker process converting it died (killed; out of memory?)")


def _run_task(converter: Converter, task: Task) -> Result:
    """One task in a worker. Any error becomes a failed result, so one bad input never stops the run."""
    try:
        if converter.is_complete(converter.dst / task.output):
            return Result(task, "skipped", converter.describe(task))
        return Result(task, "done", converter.convert(task))
    except PreprocessError as e:
        return Result(task, "failed", error=str(e))
    except Exception as e:  # disk full, permissions, ...: still one file's problem, reported with its name
        return Result(task, "failed", error=f"{type(e).__name__}: {e}")


def _map_unordered(fn: Callable, items: list, workers: int, bar: tqdm, on_died: Callable) -> Iterator:
    """fn(item) for every item, in `workers` processes (in this process when 1), as they finish; advances `bar`.

    A worker that dies (killed, e.g. by the out-of-memory killer) breaks the pool, and which of its running items
    killed it is unknown: those items are run again one at a time, each in a pool of its own, and the one whose
    worker dies again gives `on_died(item)`. The others go on in a fresh pool. (multiprocessing.Pool would wait
    forever for the dead worker's result.)
    """
    if workers == 1:
        for item in items:
            yield fn(item)
            bar.update()
        return
    queue = list(reversed(items))
    while queue:
        suspects = []
        for item, result in _run_in_pool(fn, queue, workers):
            if result is _DIED:
                suspects.append(item)
                continue
            yield result
            bar.update()
        for item in suspects:
            result = next(_run_in_pool(fn, [item], 1))[1]
            yield on_died(item) if result is _DIED else result
            bar.update()


_DIED = object()


def _run_in_pool(fn: Callable, queue: list, workers: int) -> Iterator[tuple]:
    """(item, fn(item)) for the items popped off `queue` until it is empty or a worker dies; then (item, _DIED) for
    every item that was running, the rest staying on `queue`. At most 2 items per worker are submitted at a time,
    so few are running when one dies. Leaving early (Ctrl-C) cancels what has not started; a worker killed in the
    middle of a video leaves a temporary, removed by the next run."""
    pool = ProcessPoolExecutor(workers, initializer=_ignore_interrupt)
    running = {}
    try:
        while queue or running:
            while queue and len(running) < 2 * workers:
                item = queue.pop()
                running[pool.submit(fn, item)] = item
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            died = False
            for future in done:
                item = running.pop(future)
                try:
                    yield item, future.result()
                except BrokenProcessPool:
                    died = True
                    yield item, _DIED
            if died:  # every other future fails too, except one that finished in the meantime
                for future, item in running.items():
                    finished = future.done() and not future.cancelled() and future.exception() is None
                    yield item, future.result() if finished else _DIED
                running.clear()
                return
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ignore_interrupt() -> None:
    """Ctrl-C is handled by the main process alone (ffmpeg, started by a worker, still stops on it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
