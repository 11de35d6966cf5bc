"""What reading a split's video list costs each process, by dataset size: before the index and with it.

    python bench/bench_index.py                        # Kinetics- and SSv2-like lists of 10k, 100k, 240k, 1M videos
    python bench/bench_index.py --sizes 10000 --datasets kinetics

Every figure comes from a fresh Python process (what a rank or a DALI worker is), on synthetic lists with manifests
(bench/synthetic_lists.py: the official annotation formats, the layout and manifest preprocess/ writes, empty video
files), made once under --work. For each size:

- before: `read_dataset` of the code before the index (--baseline, a commit of this repository: its pipelines/ and
  config.py are taken out with `git archive` and run as they were);
- read: `read_dataset` of today's readers with the index off (`data.index_dir=off`);
- build: the first start with the index (the reader, then the index written), the index folder empty;
- open: a start once the index exists (what every rank of every later run pays);
- loader: `build_loader` of the training split once the index exists (torch and DALI imported before the clock).

Columns: seconds of `read_dataset`; the main process's resident memory after it minus before it (MB; the
interpreter and imports are left out) and its peak; the bytes a DALI worker receives (the pickled video list);
and in a second fresh process that unpickles it and reads every record once (an epoch), that process's resident
memory added (for the index: pages of the mapped file, shared by every process of the node through the page cache,
so the node holds them once).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODES = ("before", "read", "build", "open", "loader")

# Run in a fresh interpreter: argv = code folder, config fields (JSON), index_dir or "", pickle path
READ = r"""
import json, os, pickle, sys, time
sys.path.insert(0, sys.argv[1])
def rss(field="VmRSS"):  # VmHWM: the peak (ru_maxrss would carry the parent's over the exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
from config import DataConfig
from pipelines.datasets import read_dataset
if sys.argv[5] == "loader":  # build_loader's own imports (torch, DALI) before the clock starts
    from pipelines.loader import build_loader
    read_dataset = lambda cfg, split, show_progress: build_loader(cfg, split, batch_size=8).dataset
fields = json.loads(sys.argv[2])
if sys.argv[3]:
    fields["index_dir"] = sys.argv[3]
if sys.argv[5] == "loader" and fields["dataset"] == "ssv2":
    fields["random_flip"] = False  # its classes name left and right
cfg = DataConfig(**fields, device="cpu")
before = rss()
start = time.perf_counter()
data = read_dataset(cfg, "train", show_progress=False)
seconds = time.perf_counter() - start
after = rss()
blob = pickle.dumps(data.videos)
with open(sys.argv[4], "wb") as f:
    f.write(blob)
print(json.dumps({"seconds": seconds, "rss_mb": after - before, "peak_mb": rss("VmHWM") - before, "videos": len(data.videos), "pickle_bytes": len(blob),
    "kind": type(data.videos).__name__}))
"""

WORKER = r"""
import json, pickle, sys
sys.path.insert(0, sys.argv[1])
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
import numpy, pipelines.datasets
before = rss()
with open(sys.argv[2], "rb") as f:
    videos = pickle.load(f)
frames = sum(videos[i].num_frames for i in range(len(videos)))  # every record once, as an epoch reads them
print(json.dumps({"worker_mb": rss() - before, "frames": frames}))
"""


def run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"a measuring process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_code(commit: str, folder: Path) -> Path:
    """pipelines/ and config.py as they were at `commit`."""
    target = folder / f"code-{commit}"
    if not target.exists():
        target.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "pipelines", "config.py"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def dataset_fields(work: Path, dataset: str, n: int) -> dict:
    from bench.synthetic_lists import make_kinetics, make_ssv2
    root = work / f"{dataset}-{n}"
    done = root / "fields.json"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"making a {dataset} list of {n} videos under {root}", flush=True)
        fields = (make_kinetics if dataset == "kinetics" else make_ssv2)(root, n)
        done.write_text(json.dumps(fields))
    return json.loads(done.read_text())


def measure(fields: dict, mode: str, baseline: Path, work: Path) -> dict:
    code = str(baseline) if mode == "before" else str(REPO)
    index_dir = {"before": "", "read": "off"}.get(mode, str(work / "index" / Path(fields["root"]).name))
    if mode == "build":
        shutil.rmtree(index_dir, ignore_errors=True)
    with tempfile.NamedTemporaryFile(suffix=".pickle") as blob:
        result = run(READ, code, json.dumps(fields), index_dir, blob.name, mode)
        result.update(run(WORKER, code, blob.name))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 240_000, 1_000_000])
    parser.add_argument("--datasets", nargs="+", default=["kinetics", "ssv2"], choices=("kinetics", "ssv2"))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--baseline", default="b6af803", help="the commit 'before' runs (default: before the index)")
    parser.add_argument("--work", default="/tmp/kcv-bench-index", help="synthetic lists and indexes (kept)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    work = Path(args.work)
    baseline = baseline_code(args.baseline, work)
    rows = []
    print("| dataset | videos | start | seconds | main process MB (peak) | pickled to each worker | worker MB "
          "after an epoch |\n|---|---|---|---|---|---|---|", flush=True)
    for dataset in args.datasets:
        for n in args.sizes:
            fields = dataset_fields(work, dataset, n)
            for mode in args.modes:
                start = time.perf_counter()
                r = measure(fields, mode, baseline, work)
                r.update(dataset=dataset, n=n, mode=mode, wall=time.perf_counter() - start)
                rows.append(r)
                size = (f"{r['pickle_bytes'] / 2**20:.1f} MB" if r["pickle_bytes"] > 2**20
                        else f"{r['pickle_bytes']} B")
                print(f"| {dataset} | {n:,} | {mode} | {r['seconds']:.2f} | {r['rss_mb']:.0f} ({r['peak_mb']:.0f}) "
                      f"| {size} | {r['worker_mb']:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
