"""Memory over many epochs of the training loader: does anything grow from one epoch to the next?

`pipelines.build_loader` on the train split with the data settings of the paper's config
(configs/kcenter_vit_kinetics.yaml: 4 source workers, 4 DALI threads, 32 frames at rate 8, jitter, 224 crop, flip,
colour jitter; its train.micro_batch_size of 8 per batch), on bench/videos.py's Kinetics-sized videos (340x256,
30 fps, 10 s H.264 as preprocess/resize_kinetics.py encodes them) with an official-format CSV and the split
folder's `manifest.csv` as preprocess writes it; or (`--dataset ssv2`, configs/kcenter_vit_ssv2.yaml: RandAugment,
32 JPEG frames decoded by DALI) SSv2-format frame folders made from the same videos. Two scenarios, each with a
loader of its own:
- full: every epoch runs to its end; the loader keeps one pipeline and its worker processes for all epochs;
- abandon: each epoch is left at its middle with `break` (as train.py leaves it with train.max_steps_per_epoch), so
  every epoch builds a new pipeline with new worker processes, and the old ones must go.

After each epoch (full), at the break and after it (abandon), after a garbage collection and once the processes
are idle (the workers have filled their prefetch queues), it samples the main process and each DALI source worker
(its child processes; multiprocessing's resource tracker is counted, not sampled): RSS, anonymous memory, PSS and
USS (private clean + dirty) from /proc/<pid>/smaps_rollup, open file descriptors (/proc/<pid>/fd), threads
(/proc/<pid>/status); and the number of child processes, the DALI pipelines still alive (weak references to every
one the loader built), the main process's gc-tracked Python objects and the shared memory of DALI's parallel source
(`Pipeline.external_source_shm_statistics`). With `--device gpu` also torch.cuda.memory_allocated / reserved and the
device memory in use (torch.cuda.mem_get_info: DALI allocates outside torch's allocator, and DALI 2.4's backend has
no call for its memory statistics), and `Pipeline.executor_statistics` where the executor keeps them (not the
default dynamic executor).

Each series gets a least-squares slope over the second half of the epochs (the first half lets allocators and
caches reach their working size), held to a bound: memory |slope| < --bound-mb MB/epoch for the main process and
< --bound-worker-mb for each worker (one leaked clip of decoded frames, 32 x 256 x 340 x 3 bytes = 8.4 MB, breaks
both; a leaked batch far more); file descriptors, threads, child processes and live pipelines: slope exactly 0;
Python objects: |slope| < --bound-objects. PSS and USS get no verdict (see MEMORY_METRICS). Prints a table with
PASS/FAIL per series, writes every sample to --out (JSON) and the memory curves to --svg. SSv2's main process takes
longer than Kinetics' to reach its working size (bench/RESULTS.md).

    python bench/bench_soak.py                   # CPU: 40 epochs of 32 videos, both scenarios (12 min on 2 cores)
    python bench/bench_soak.py --quick           # a smoke run: 4 epochs of 8 videos (too few for a verdict)
    python bench/bench_soak.py --dataset ssv2    # the JPEG-folder loader
    python bench/bench_soak.py --device gpu      # a GPU node: NVDEC + the GPU graph, device memory as well
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import shutil
import os
import sys
import time
import weakref
from pathlib import Path

MB = 1024 * 1024
MEMORY_METRICS = ("rss_mb", "anon_mb", "pss_mb", "uss_mb")
# PSS and USS split a page among the processes that map it, and unrelated processes on the machine map the same
# library files (torch, DALI, FFmpeg): they move when those start and stop, without any change in this process (see
# bench/RESULTS.md). They are sampled and shown; the verdicts are on RSS and anonymous memory (the heap, where a
# leak grows), which no other process changes.
INFO_METRICS = ("pss_mb", "uss_mb")
COUNT_METRICS = ("fds", "threads")

# DALI starts its source workers with "spawn", which runs this file again as __mp_main__ in each of them: they need
# none of the imports below (torch alone would add hundreds of MB to every worker, which is not what train.py's
# workers carry; see bench/RESULTS.md), and the functions that use them are never called there.
if __name__ != "__mp_main__":
    import torch
    from tqdm import tqdm

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
    from bench.videos import ENCODE, FPS, HEIGHT, SECONDS, WIDTH, make_videos
    from config import load_config
    from pipelines import build_loader
    from pipelines import loader as loader_module
    from pipelines.decode import probe_video
    from preprocess.common import MANIFEST_NAME, ManifestRow, write_manifest


# ---------------------------------------------------------------------------------------------------------------
# /proc


def smaps_rollup(pid: int) -> dict[str, int]:
    """The fields of /proc/<pid>/smaps_rollup in bytes (Rss, Pss, Private_Clean, ...)."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields


def process_stats(pid: int) -> dict:
    """Memory (MB), open file descriptors and threads of one process."""
    rollup = smaps_rollup(pid)
    with open(f"/proc/{pid}/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return {"pid": pid, "rss_mb": rollup["Rss"] / MB, "anon_mb": rollup["Anonymous"] / MB, "pss_mb": rollup["Pss"] / MB,
            "uss_mb": (rollup["Private_Clean"] + rollup["Private_Dirty"]) / MB,
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads}


def child_processes(pid: int) -> list[tuple[int, str]]:
    """(pid, kind) of the direct children of `pid`; kind: worker (a spawned process: DALI's source workers),
    resource_tracker (multiprocessing's) or other."""
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue  # a process that ended while it was read
        kind = "resource_tracker" if "resource_tracker" in cmdline else "worker" if "spawn_main" in cmdline else "other"
        children.append((int(entry), kind))
    return sorted(children)


def cpu_ticks(pids) -> int:
    """utime + stime of the processes (clock ticks); processes that are gone count 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), after pid and comm
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def wait_until_idle(pid: int, interval: float = 0.5, max_ticks: int = 2, timeout: float = 30.0) -> bool:
    """Wait until `pid` and its children use at most `max_ticks` of CPU in `interval` s (False after `timeout`)."""
    deadline = time.monotonic() + timeout
    pids = [pid] + [child for child, _ in child_processes(pid)]
    before = cpu_ticks(pids)
    while time.monotonic() < deadline:
        time.sleep(interval)
        pids = [pid] + [child for child, _ in child_processes(pid)]
        now = cpu_ticks(pids)
        if now - before <= max_ticks:
            return True
        before = now
    return False


# ---------------------------------------------------------------------------------------------------------------
# Slopes and bounds


def least_squares_slope(xs, ys) -> float:
    """Slope of the least-squares line through the points (0 when all ys are equal)."""
    n = len(xs)
    if n < 2:
        raise ValueError(f"a slope needs at least 2 points, got {n}")
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("a slope needs at least 2 different x values")
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx


def second_half(points: list[tuple[int, float]], epochs: int) -> list[tuple[int, float]]:
    """The points of epochs >= epochs // 2."""
    return [(x, y) for x, y in points if x >= epochs // 2]


def check_series(points: list[tuple[int, float]], epochs: int, bound: float | None) -> dict:
    """Fit over the second half: slope, bound, and PASS when |slope| < bound (a bound of 0 asks for an exactly
    flat series; None: no verdict, "info")."""
    fitted = second_half(points, epochs)
    if len({x for x, _ in fitted}) < 2:
        return {"points": len(fitted), "slope": None, "bound": bound, "verdict": "n/a"}
    slope = least_squares_slope([x for x, _ in fitted], [y for _, y in fitted])
    if bound is None:
        return {"points": len(fitted), "first": fitted[0][1], "last": fitted[-1][1], "slope": slope, "bound": None,
                "verdict": "info"}
    passed = abs(slope) < bound if bound > 0 else slope == 0
    return {"points": len(fitted), "first": fitted[0][1], "last": fitted[-1][1], "slope": slope, "bound": bound,
            "verdict": "PASS" if passed else "FAIL"}


def series_of(samples: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Every sampled quantity as `scenario/point process metric` -> [(epoch, value)]. Workers are numbered by pid
    order within each sample (in the abandon scenario each epoch has new ones)."""
    series: dict[str, list[tuple[int, float]]] = {}

    def add(name, epoch, value):
        if value is not None:
            series.setdefault(name, []).append((epoch, value))

    for s in samples:
        prefix = f"{s['scenario']}/{s['point']}"
        for metric in MEMORY_METRICS + COUNT_METRICS:
            add(f"{prefix} main {metric}", s["epoch"], s["main"][metric])
            for i, worker in enumerate(s["workers"]):
                add(f"{prefix} worker{i} {metric}", s["epoch"], worker[metric])
        for key in ("children", "live_pipelines", "gc_objects", "dali_shm_mb"):
            add(f"{prefix} main {key}", s["epoch"], s.get(key))
        for key, value in (s.get("gpu") or {}).items():
            add(f"{prefix} gpu {key}", s["epoch"], value)
    return series


def bound_of(name: str, args) -> float | None:
    process, metric = name.split(" ")[1:]
    if metric in INFO_METRICS:
        return None
    if metric == "gc_objects":
        return args.bound_objects
    if metric in COUNT_METRICS or metric in ("children", "live_pipelines"):
        return 0.0
    # MB/epoch of one process (or of DALI's shared memory, of the GPU)
    return args.bound_worker_mb if process.startswith("worker") else args.bound_mb


# ---------------------------------------------------------------------------------------------------------------
# The loaders


class PipelineRecord:
    """Weak references to every pipeline the loader builds (pipelines.loader.make_pipeline wrapped), and the
    latest one for its statistics."""

    def __init__(self):
        self.refs: list[weakref.ref] = []
        self._make = loader_module.make_pipeline

    def __enter__(self):
        def make_pipeline(*args, **kwargs):
            pipe = self._make(*args, **kwargs)
            self.refs = [ref for ref in self.refs if ref() is not None] + [weakref.ref(pipe)]
            return pipe
        loader_module.make_pipeline = make_pipeline
        return self

    def __exit__(self, *exc):
        loader_module.make_pipeline = self._make

    def alive(self) -> list:
        return [pipe for pipe in (ref() for ref in self.refs) if pipe is not None]


REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"kinetics": "configs/kcenter_vit_kinetics.yaml", "ssv2": "configs/kcenter_vit_ssv2.yaml"}
SSV2_FRAMES = 48  # frames per folder: SSv2's clips are ~4 s at 12 fps


def make_kinetics(work: Path, count: int) -> Path:
    """bench/videos.py's videos with the official-format CSV, and the manifest preprocess writes beside them."""
    root = make_videos(work, count)
    folder = root / "train"
    rows = []
    for i in range(count):
        path = folder / f"bench{i:04d}_000000_000010.mp4"
        info = probe_video(str(path))
        rows.append(ManifestRow(path.name, info.num_frames, info.fps, WIDTH, HEIGHT))
    write_manifest(folder / MANIFEST_NAME, rows)
    return root


def make_ssv2(work: Path, count: int) -> Path:
    """SSv2-format data from the same videos: `<id>/<id>_000000.jpeg ...` folders of their first SSV2_FRAMES
    frames (340x256, as preprocess/ssv2_to_frames.py names them), the labels and train JSON, root/manifest.csv."""
    import av  # only this dataset needs them
    from PIL import Image

    videos = make_videos(work, count) / "train"
    root = Path(work) / "ssv2"
    rows, items, templates = [], [], [f"Pushing thing {k}" for k in range(4)]
    for i in tqdm(range(count), desc="frame folders", leave=False):
        ident, folder = str(i), root / str(i)
        if not (folder / f"{ident}_{SSV2_FRAMES - 1:06d}.jpeg").exists():
            shutil.rmtree(folder, ignore_errors=True)
            tmp = root / f"{ident}.tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            with av.open(str(videos / f"bench{i:04d}_000000_000010.mp4")) as container:
                for n, frame in enumerate(container.decode(video=0)):
                    if n == SSV2_FRAMES:
                        break
                    Image.fromarray(frame.to_ndarray(format="rgb24")).save(tmp / f"{ident}_{n:06d}.jpeg",
                                                                          quality=90)
            os.replace(tmp, folder)
        rows.append(ManifestRow(ident, SSV2_FRAMES, float(FPS), WIDTH, HEIGHT))
        items.append({"id": ident, "template": templates[i % 4], "placeholders": ["thing"]})
    write_manifest(root / MANIFEST_NAME, rows)
    (root / "labels.json").write_text(json.dumps({t: str(k) for k, t in enumerate(templates)}))
    (root / "train.json").write_text(json.dumps(items))
    return root


def data_config(dataset: str, work: Path, count: int, device: str, overrides=()):
    """The data and train settings of the paper's config for `dataset`, pointed at the bench data (then
    `overrides`, `section.key=value`)."""
    if dataset == "kinetics":
        root, lists = make_kinetics(work, count), ["data.train_list=train.csv"]
    else:
        root, lists = make_ssv2(work, count), ["data.train_list=train.json", "data.labels_file=labels.json"]
    cfg = load_config(str(REPO / CONFIGS[dataset]), [f"data.root={root}", *lists, "data.val_list=",
                                                      "data.test_list=", f"data.device={device}", *overrides])
    return cfg.data, cfg.train


def dali_statistics(pipe) -> dict:
    """DALI's own figures of the pipeline: the parallel source's shared memory (MB), and the executor's reserved
    operator output memory (MB) where the executor keeps statistics (not the default dynamic executor)."""
    out = {"dali_shm_mb": sum(pipe.external_source_shm_statistics()["capacities"]) / MB}
    try:
        stats = pipe.executor_statistics()
    except RuntimeError:
        stats = {}
    reserved = [size for op in stats.values() for size in op.get("reserved_memory_size", [])]
    if reserved:
        out["dali_reserved_mb"] = sum(reserved) / MB
    return out


def gpu_statistics(device_id: int) -> dict:
    torch.cuda.synchronize(device_id)
    free, total = torch.cuda.mem_get_info(device_id)
    return {"torch_allocated_mb": torch.cuda.memory_allocated(device_id) / MB,
            "torch_reserved_mb": torch.cuda.memory_reserved(device_id) / MB,
            "device_used_mb": (total - free) / MB}


def take_sample(scenario: str, point: str, epoch: int, record: PipelineRecord, device_id: int | None) -> dict:
    """One sample of everything, after a garbage collection (what is retained, not reference cycles waiting for
    the collector: DALI's graph definitions are such cycles, freed by the collector in its own time), once the main
    process and its children are idle."""
    gc.collect()
    # DALI's pool joins its workers with a timeout of 1 s; one that exits just after stays in multiprocessing's
    # list of children, with the two ends of its sentinel pipe, until the next process start reaps it (one pipeline's
    # worth at most, never more): reaped here, so that the count of descriptors is what stays
    multiprocessing.active_children()
    pid = os.getpid()
    idle = wait_until_idle(pid)
    children = child_processes(pid)
    workers = []
    for child, kind in children:
        if kind == "worker":
            try:
                workers.append(process_stats(child))
            except (FileNotFoundError, ProcessLookupError):
                pass
    pipes = record.alive()
    sample = {"scenario": scenario, "point": point, "epoch": epoch, "time": time.time(), "idle": idle,
              "main": process_stats(pid), "workers": workers, "children": len(children),
              "child_kinds": [kind for _, kind in children], "live_pipelines": len(pipes),
              "gc_objects": len(gc.get_objects())}
    if pipes:
        sample.update(dali_statistics(pipes[-1]))
    del pipes
    if device_id is not None:
        sample["gpu"] = gpu_statistics(device_id)
    return sample


def run_scenario(scenario: str, cfg, args, device_id: int | None, samples: list[str]) -> None:
    """`args.epochs` epochs of a new loader; samples go to `samples` as JSON text (text is not a gc-tracked
    object: the list does not add to the Python objects counted)."""
    with PipelineRecord() as record:
        loader = build_loader(cfg, "train", batch_size=args.batch_size, device_id=device_id, seed=0)
        stop = max(1, len(loader) // 2)
        bar = tqdm(range(args.epochs), desc=scenario, dynamic_ncols=True)
        for epoch in bar:
            for step, batch in enumerate(loader):
                if scenario == "abandon" and step + 1 == stop:
                    del batch
                    samples.append(json.dumps(take_sample(scenario, "mid", epoch, record, device_id)))
                    break
            batch = None
            sample = take_sample(scenario, "end", epoch, record, device_id)
            samples.append(json.dumps(sample))
            bar.set_postfix(main_pss=f"{sample['main']['pss_mb']:.0f}MB", children=sample["children"],
                            pipelines=sample["live_pipelines"])
        bar.close()
        del loader


# ---------------------------------------------------------------------------------------------------------------
# Report


def report(samples: list[dict], args) -> tuple[list[dict], bool]:
    rows, ok = [], True
    for name, points in series_of(samples).items():
        row = {"series": name, **check_series(points, args.epochs, bound_of(name, args))}
        ok &= row["verdict"] != "FAIL"
        rows.append(row)
    print(f"\n{'series':44s} {'pts':>4s} {'first':>10s} {'last':>10s} {'slope/epoch':>12s} {'bound':>8s}  verdict")
    for r in rows:
        bound = "-" if r["bound"] is None else f"{r['bound']:g}"
        if r["slope"] is None:
            print(f"{r['series']:44s} {r['points']:4d} {'':>10s} {'':>10s} {'':>12s} {bound:>8s}  n/a")
            continue
        print(f"{r['series']:44s} {r['points']:4d} {r['first']:10.2f} {r['last']:10.2f} {r['slope']:12.4f} "
              f"{bound:>8s}  {r['verdict']}")
    return rows, ok


COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def write_svg(path: Path, panels: list[tuple[str, list[tuple[str, list[tuple[int, float]]]]]], epochs: int,
              min_span: float = 64.0) -> None:
    """One panel per (title, [(label, points)]): MB over epochs, the fitted second half shaded. The MB axis spans
    at least `min_span`, so that a wiggle of a few MB looks like one."""
    width, height, left, top, plot_w, plot_h = 760, 200, 60, 30, 480, 130
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height * len(panels)}" '
             f'font-family="sans-serif" font-size="11">', f'<rect width="100%" height="100%" fill="white"/>']
    for p, (title, lines) in enumerate(panels):
        y0 = p * height + top
        values = [v for _, pts in lines for _, v in pts] or [0.0]
        lo, hi = min(values), max(values)
        pad = max(0.05 * (hi - lo), (min_span - (hi - lo)) / 2)
        lo, hi = lo - pad, hi + pad
        last = max(epochs - 1, 1)

        def xy(x, v):
            return left + plot_w * x / last, y0 + plot_h * (1 - (v - lo) / (hi - lo))

        half_x = xy(epochs // 2, lo)[0]
        parts.append(f'<rect x="{half_x:.1f}" y="{y0}" width="{left + plot_w - half_x:.1f}" height="{plot_h}" '
                     f'fill="#f0f0f0"/>')
        parts.append(f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>')
        parts.append(f'<text x="{left}" y="{y0 - 8}" font-size="13">{title}</text>')
        for v in (lo, (lo + hi) / 2, hi):
            y = xy(0, v)[1]
            parts.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{v:.0f}</text>')
        parts.append(f'<text x="{left - 45}" y="{y0 + plot_h / 2}" transform="rotate(-90 {left - 45} '
                     f'{y0 + plot_h / 2})" text-anchor="middle">MB</text>')
        for x in (0, epochs // 2, last):
            parts.append(f'<text x="{xy(x, lo)[0]:.1f}" y="{y0 + plot_h + 14}" text-anchor="middle">{x}</text>')
        parts.append(f'<text x="{left + plot_w / 2}" y="{y0 + plot_h + 28}" text-anchor="middle">epoch (shaded: '
                     f'the half the slopes are fitted on)</text>')
        for i, (label, pts) in enumerate(lines):
            colour = COLOURS[i % len(COLOURS)]
            coords = " ".join(f"{xy(x, v)[0]:.1f},{xy(x, v)[1]:.1f}" for x, v in pts)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
            parts.append(f'<line x1="{left + plot_w + 15}" x2="{left + plot_w + 35}" y1="{y0 + 10 + 15 * i}" '
                         f'y2="{y0 + 10 + 15 * i}" stroke="{colour}" stroke-width="2"/>')
            parts.append(f'<text x="{left + plot_w + 40}" y="{y0 + 14 + 15 * i}">{label}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def plot_panels(samples: list[dict]) -> list[tuple[str, list]]:
    """Per scenario, the main process at each epoch's end and the workers where they are alive (full: the end,
    abandon: the break)."""
    series, panels = series_of(samples), []
    titles = {"full": "full epochs, one pipeline", "abandon": "abandoned epochs, a new pipeline each"}
    for scenario, worker_point in (("full", "end"), ("abandon", "mid")):
        main = [(f"{m[:-3].upper()}", series[name]) for m in MEMORY_METRICS
                if (name := f"{scenario}/end main {m}") in series]
        workers = [(f"worker{i} {m[:-3].upper()}", series[name]) for i in range(8) for m in ("rss_mb", "anon_mb")
                   if (name := f"{scenario}/{worker_point} worker{i} {m}") in series]
        if main:
            panels.append((f"{titles[scenario]}: main process", main))
        if workers:
            panels.append((f"{titles[scenario]}: source workers" + (" (new each epoch)" if scenario == "abandon"
                                                                     else ""), workers))
    return panels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dataset", choices=tuple(CONFIGS), default="kinetics",
                        help="kinetics: the H.264 videos; ssv2: JPEG frame folders made from them")
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=40, help="epochs of each scenario")
    parser.add_argument("--scenarios", default="full,abandon", help="comma-separated: full, abandon")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting of the config changed, as train.py takes it (e.g. data.py_workers=2)")
    parser.add_argument("--batch-size", type=int, default=0, help="default: the config's train.micro_batch_size")
    parser.add_argument("--work", default="/tmp/bench_soak", help="the videos are made here once and kept")
    parser.add_argument("--bound-mb", type=float, default=0.5, help="memory slope bound of the main process, "
                        "MB/epoch")
    parser.add_argument("--bound-worker-mb", type=float, default=2.0,
                        help="memory slope bound of each source worker, MB/epoch: their heap moves in steps of one "
                        "clip's frame buffer (~8 MB) kept or returned by the allocator")
    parser.add_argument("--bound-objects", type=float, default=1.0, help="Python objects slope bound, per epoch")
    parser.add_argument("--quick", action="store_true", help="8 videos, 4 epochs: a smoke run of the script, "
                        "too short for a verdict (exits 0 whatever the slopes)")
    parser.add_argument("--out", default="bench_soak.json")
    parser.add_argument("--svg", default="bench_soak.svg")
    args = parser.parse_args(argv)
    if args.quick:
        args.videos, args.epochs = 8, 4
    scenarios = [s for s in args.scenarios.split(",") if s]
    if not scenarios or set(scenarios) - {"full", "abandon"}:
        parser.error(f"--scenarios takes full and/or abandon, got {args.scenarios!r}")
    if args.epochs < 4:
        parser.error(f"--epochs must be >= 4 (slopes are fitted on the second half), got {args.epochs}")
    if args.device == "gpu" and not torch.cuda.is_available():
        parser.error("--device gpu needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is "
                     "False); the default --device cpu runs the CPU loader")
    device_id = 0 if args.device == "gpu" else None

    cfg, train = data_config(args.dataset, Path(args.work), args.videos, args.device, args.set)
    args.batch_size = args.batch_size or train.micro_batch_size
    what = (f"{args.videos} videos ({WIDTH}x{HEIGHT} {FPS} fps {SECONDS} s H.264 {ENCODE}), {cfg.num_frames} frames "
            f"at rate {cfg.sampling_rate}" if args.dataset == "kinetics" else
            f"{args.videos} JPEG folders ({SSV2_FRAMES} frames of {WIDTH}x{HEIGHT}), {cfg.num_frames} frames, "
            f"RandAugment {cfg.rand_augment}")
    print(f"{args.dataset} ({CONFIGS[args.dataset]}): {what} under {cfg.root}; {args.epochs} epochs of each of "
          f"{', '.join(scenarios)}; batch {args.batch_size}, {cfg.py_workers} source workers, {cfg.num_threads} "
          f"DALI threads", flush=True)
    texts, times = [], {}
    for scenario in scenarios:
        start = time.perf_counter()
        run_scenario(scenario, cfg, args, device_id, texts)
        times[scenario] = round(time.perf_counter() - start, 1)
    samples = [json.loads(text) for text in texts]
    rows, ok = report(samples, args)
    failed = sum(r["verdict"] == "FAIL" for r in rows)
    verdict = (f"smoke run (--quick): {failed} of {len(rows)} series over the bounds in {args.epochs} epochs, no "
               f"verdict" if args.quick else f"{'PASS' if ok else 'FAIL'}: {failed} of {len(rows)} series fail")
    print(f"\nrun time: {', '.join(f'{k} {v} s' for k, v in times.items())}; {verdict}")
    Path(args.out).write_text(json.dumps(dict(
        device=args.device, cpus=os.cpu_count(), dataset=args.dataset, config=CONFIGS[args.dataset], data=what,
        overrides=args.set,
        epochs=args.epochs, batch_size=args.batch_size, py_workers=cfg.py_workers, num_threads=cfg.num_threads,
        seconds=times, verdict="PASS" if ok else "FAIL", series=rows, samples=samples), indent=1) + "\n")
    write_svg(Path(args.svg), plot_panels(samples), args.epochs)
    print(f"samples: {args.out}, plot: {args.svg}")
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
