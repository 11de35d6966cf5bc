"""One model trained at one token budget against one trained budget-elastic, each tested at several budgets.

For each seed the demo (configs/demo.yaml: a K-center ViT of 8 frames x 36 places, 144 tokens, on the synthetic
motion dataset) is trained twice with `train.py`: once at its own 144 tokens, once with `model.train_budgets` (each
optimizer step on one of the budgets, drawn from the seed and the step). Each checkpoint is then tested with one
`eval.py` run at every budget of `--budgets` (`eval.budgets`: the same views and K-center seeds for all, the videos
decoded once). The demo is small (64 test videos of 4 classes), so it runs 5 seeds and reports the mean,
standard deviation, min and max of the top-1 over them.

Writes, under --out: one folder a run (its train.log, last.pt, results.json, budgets.png), budgets.json (every
run's figures and the summary), budgets.md (the table bench/RESULTS.md holds), and the figure --figure: top-1
against GFLOPs per view, one line a training, bars from the min to the max over the seeds. A run whose results.json
exists is not run again and a stopped one resumes (a stopped benchmark goes on where it was), when it was made by
the same commands at the same commit; a run folder of other code or settings is an error, never mixed in.

    python bench/bench_budgets.py --out runs/bench_budgets --figure bench/budgets_demo.png   # 19 min here, with other work
    python bench/bench_budgets.py --seeds 0 --only elastic
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from runtime import write_atomic  # noqa: E402
from vis import draw_series_plot, save_png  # noqa: E402

TRAININGS = {"one budget": [], "elastic": None}  # name: overrides of train.py (elastic: --train-budgets)


def run(args: list[str], log_path: str) -> None:
    """Runs a command of the repository, its output to `log_path`; an error with its last lines if it fails."""
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{' '.join(args[:3])} failed with status {result.returncode} ({log_path}):\n{tail}")


def commit() -> str:
    """The repository's commit, with "+changes <hash of the diff>" when tracked files differ from it ("unknown"
    outside git)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    head, diff = git("rev-parse", "HEAD") or "unknown", git("diff", "HEAD")
    return head + (f"+changes {hashlib.sha256(diff.encode()).hexdigest()[:12]}" if diff else "")


def train_and_test(out: str, seed: int, overrides: list[str], budgets: list[int], common: list[str]) -> list[dict]:
    """The budgets entries of results.json of one training (trained, then tested at `budgets`).

    A run folder keeps the commands and commit it was made with (run.json); it is reused (finished, or resumed from
    its last.pt) only by the same commands at the same commit, and is an error otherwise: figures of older code or
    other settings are never mixed into a table."""
    results = os.path.join(out, "test", "results.json")
    config = ["--config", "configs/demo.yaml", f"train.seed={seed}", f"train.out_dir={out}", *common]
    stamp = {"train": ["train.py", *config, "data.test_list=", *overrides],
             "eval": ["eval.py", *config, f"eval.budgets=[{','.join(map(str, budgets))}]",
                      f"eval.out_dir={os.path.join(out, 'test')}"], "commit": commit()}
    stamp_path = os.path.join(out, "run.json")
    if os.path.exists(out) and os.listdir(out):
        earlier = None
        if os.path.exists(stamp_path):
            with open(stamp_path) as f:
                earlier = json.load(f)
        if earlier != stamp:
            made = f"at commit {earlier['commit']}" if earlier else "without a run.json"
            raise SystemExit(f"{out} holds a run made {made} or with other commands than this one "
                             f"({stamp['commit']}): give another --out, or delete {out} to run it again")
    if not os.path.exists(results):
        os.makedirs(out, exist_ok=True)
        write_atomic(stamp_path, json.dumps(stamp, indent=2))
        # a training that was stopped resumes from its last.pt (one that ended ends again at once)
        run(stamp["train"], os.path.join(out, "train.out"))
        run(stamp["eval"], os.path.join(out, "eval.out"))
    with open(results) as f:
        return json.load(f)["budgets"]


def summarise(runs: dict[str, dict[int, list[dict]]], budgets: list[int]) -> dict:
    """Per training and budget: GFLOPs per view and the top-1 of each seed, with their mean, std, min and max."""
    summary = {}
    for name, by_seed in runs.items():
        rows = {}
        for budget in budgets:
            entries = [next(e for e in entries if e["budget"] == budget) for entries in by_seed.values()]
            top1 = [e["metrics"]["top1"] for e in entries]
            rows[budget] = {"gflops_per_view": entries[0]["gflops_per_view"], "top1": top1,
                            "mean": statistics.mean(top1), "std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                            "min": min(top1), "max": max(top1)}
        summary[name] = rows
    return summary


def table(summary: dict, budgets: list[int], seeds: list[int], trained: int) -> str:
    names = list(summary)
    lines = [f"| tokens | GFLOPs / view | {' | '.join(f'top-1, {n}' for n in names)} |",
             "|---|---|" + "---|" * len(names)]
    for budget in budgets:
        first = summary[names[0]][budget]
        cells = [f"{summary[n][budget]['mean']:.1f} ± {summary[n][budget]['std']:.1f} "
                 f"({summary[n][budget]['min']:.1f}–{summary[n][budget]['max']:.1f})" for n in names]
        lines.append(f"| {budget}{' *' if budget == trained else ''} | {first['gflops_per_view']:.4f} | "
                     f"{' | '.join(cells)} |")
    lines.append(f"\nTop-1 (%) on the demo's 64 test videos, 2 clips x 3 crops: mean ± standard deviation (min–max) "
                 f"over train.seed {', '.join(map(str, seeds))}; * the demo's model.num_tokens, the budget the "
                 f"one-budget model trained at.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_budgets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budgets", type=int, nargs="+", default=[72, 108, 144, 216], help="tested at these")
    parser.add_argument("--train-budgets", default="[72,108,144,216]", help="model.train_budgets of the elastic run")
    parser.add_argument("--only", choices=list(TRAININGS), help="one of the two trainings")
    parser.add_argument("--figure", help="also write the figure here (e.g. bench/budgets_demo.png)")
    parser.add_argument("overrides", nargs="*", help="section.key=value for both trainings, e.g. train.epochs=5")
    args = parser.parse_args()

    trainings = {name: overrides if overrides is not None else [f"model.train_budgets={args.train_budgets}"]
                 for name, overrides in TRAININGS.items() if args.only in (None, name)}
    runs = {}
    for name, overrides in trainings.items():
        runs[name] = {}
        for seed in args.seeds:
            out = os.path.join(args.out, f"{name.replace(' ', '_')}_seed{seed}")
            print(f"{name}, seed {seed}: {out}", flush=True)
            runs[name][seed] = train_and_test(out, seed, overrides, args.budgets, args.overrides)
    summary = summarise(runs, args.budgets)
    trained = 144 if not any(o.startswith("model.num_tokens=") for o in args.overrides) else int(
        next(o for o in args.overrides if o.startswith("model.num_tokens=")).split("=")[1])
    text = table(summary, args.budgets, args.seeds, trained)
    print(text)
    write_atomic(os.path.join(args.out, "budgets.md"), text + "\n")
    write_atomic(os.path.join(args.out, "budgets.json"),
                 json.dumps({"seeds": args.seeds, "budgets": args.budgets, "train_budgets": args.train_budgets,
                             "overrides": args.overrides, "summary": {n: {str(b): r for b, r in rows.items()}
                                                                      for n, rows in summary.items()}}, indent=2))
    series = [{"name": f"trained {'at ' + str(trained) if name == 'one budget' else 'elastic ' + args.train_budgets}",
               "xs": [rows[b]["gflops_per_view"] for b in args.budgets], "ys": [rows[b]["mean"] for b in args.budgets],
               "lows": [rows[b]["min"] for b in args.budgets], "highs": [rows[b]["max"] for b in args.budgets],
               "labels": [str(b) if number == 0 else None for b in args.budgets]}
              for number, (name, rows) in enumerate(summary.items())]
    image = draw_series_plot(series, "GFLOPs per view", "top-1 (%)",
                             f"demo: top-1 at each token budget, mean and min-max of {len(args.seeds)} seeds")
    for path in filter(None, [os.path.join(args.out, "budgets.png"), args.figure]):
        save_png(image, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
