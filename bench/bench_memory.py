"""Peak memory and time of a training step with and without activation checkpointing (and torch.compile), per family.

Each family (ViT, TimeSformer, Motionformer) at the paper's setting: ViT-B/16 (embed 768, depth 12, 12 heads), 32
frames of 224x224, 1568 K-center tokens (hybrid frames as in the K400 configs), drop path 0.1, batch 2, fp32 on the
CPU. A training step is what train.py runs: the K-center sampler, forward, cross-entropy, backward, AdamW step
(`param_groups`), gradients set to None.

How memory is measured: every configuration runs in a child process of its own (nothing one leaves allocated is
counted for the next), started with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB, so that every tensor buffer is
its own mapping and is returned to the system when freed (glibc otherwise raises the threshold as large blocks are
freed and keeps them in its heap, where the resident size no longer follows what is live). Before each measured
step the child records its resident size (VmRSS) and resets its peak (writing 5 to /proc/self/clear_refs, Linux >=
4.0); after the step it reads the peak (VmHWM). The figure is the peak growth during the step: the activations kept
for the backward, the gradients and the temporaries of backward and optimizer, over the weights and AdamW's state
that live between steps (those are the same with and without checkpointing, and are allocated by the warm-up
step, which is not measured). tracemalloc would not see torch's allocations; ru_maxrss cannot be reset and would
include the warm-up step's first allocation of the optimizer state.

Step time: the median of the measured steps (after `--warmup` steps, whose time is reported apart: with --compile
they include inductor's compilation), as wall time and as the process's CPU time (all threads), user and system
apart: on a machine shared with other work the wall time also counts the waits for a core, the CPU time less so.
The system time is mostly the kernel zeroing the pages of freshly mapped buffers (every buffer is mapped anew
under the fixed threshold above), which grows with the memory a step allocates; train.py's default allocator
reuses more of its heap. Ratios are to the same family's eager step without checkpointing, in the same run.

    python bench/bench_memory.py                  # 3 families x (checkpointing off, on): 15-23 min on 2 shared cores
    python bench/bench_memory.py --compile        # also train.compile (forward_tokens), without and with checkpointing
    python bench/bench_memory.py --families vit --steps 3
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VIT_B = dict(num_classes=400, num_frames=32, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
             num_tokens=1568, num_segments=8, drop_path_rate=0.1)
HYBRID = {"vit": 3, "timesformer": 4, "motionformer": 1}  # the K400 configs' hybrid frames


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)[1])


def run_child(family: str, checkpointing: bool, compile: bool, batch: int, warmup: int, steps: int) -> dict:
    """One configuration in this process: {warmup_s, step_s, user_s, sys_s, peak_growth_mib (lists: one per step)}."""
    import gc

    import torch
    import torch.nn.functional as F

    from models import ARCHS
    torch.manual_seed(0)
    model = ARCHS[family](**VIT_B, num_hybrid_frames=HYBRID[family]).train()
    model.set_grad_checkpointing(checkpointing)
    if compile:
        import train
        from config import Config
        cfg = Config()
        cfg.train.compile = True
        train.compile_model(model, cfg)
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4)
    clips = torch.rand(batch, 3, VIT_B["num_frames"], 224, 224) * 2 - 1
    labels = torch.arange(batch) % VIT_B["num_classes"]

    def step(index: int) -> None:
        logits = model(clips, seeds=torch.arange(batch) + 1000 * index)
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    out = {"warmup_s": 0.0, "step_s": [], "user_s": [], "sys_s": [], "peak_growth_mib": []}
    for i in range(warmup):
        start = time.perf_counter()
        step(i)
        out["warmup_s"] += time.perf_counter() - start
    for i in range(warmup, warmup + steps):
        gc.collect()
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident size restarts from the present one
        start, cpu = time.perf_counter(), os.times()
        step(i)
        out["step_s"].append(time.perf_counter() - start)
        out["user_s"].append(os.times().user - cpu.user)
        out["sys_s"].append(os.times().system - cpu.system)
        out["peak_growth_mib"].append((_status_kib("VmHWM") - before) / 1024)
    return out


def measure(family: str, checkpointing: bool, compile: bool, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps([family, checkpointing, compile]),
           "--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{family} (checkpointing {checkpointing}, compile {compile}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=list(HYBRID), default=list(HYBRID))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="steps before the measured ones (not measured)")
    parser.add_argument("--steps", type=int, default=1, help="measured steps per configuration")
    parser.add_argument("--compile", action="store_true", help="also the configurations with train.compile")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        family, checkpointing, compile = json.loads(args.child)
        print(json.dumps(run_child(family, checkpointing, compile, args.batch, args.warmup, args.steps)))
        return
    if args.warmup < 1:
        sys.exit("--warmup must be >= 1: the first step allocates AdamW's state (and compiles, with --compile)")
    import torch
    configs = [(False, False), (True, False)] + ([(False, True), (True, True)] if args.compile else [])
    print(f"ViT-B/16, 32 frames of 224x224, 1568 tokens, batch {args.batch}, CPU fp32, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}; {args.warmup} warm-up + {args.steps} measured step(s) per row")
    print("| family | checkpointing | compile | peak growth in a step (MiB) | vs baseline | step, wall (s) | "
          "vs baseline | step, CPU user + sys (s) | vs baseline (user) | warm-up, wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family in args.families:
        base = None
        for checkpointing, compile in configs:
            r = measure(family, checkpointing, compile, args)
            peak = max(r["peak_growth_mib"])
            seconds, user, system = (statistics.median(r[key]) for key in ("step_s", "user_s", "sys_s"))
            base = base or (peak, seconds, user)
            print(f"| {family} | {'on' if checkpointing else 'off'} | {'on' if compile else 'off'} | {peak:,.0f} | "
                  f"{peak / base[0]:.2f}x | {seconds:.1f} | {seconds / base[1]:.2f}x | {user:.1f} + {system:.1f} | "
                  f"{user / base[2]:.2f}x | {r['warmup_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
