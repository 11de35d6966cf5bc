"""A stand-in for train.py's preemption side, to check how slurm/train.sbatch delivers signals (tests/test_slurm.py).

tests/test_slurm.py puts it in a scratch folder as `train.py` and submits slurm/train.sbatch there unchanged, so it
runs under the same srun and torchrun line as the real training. Each rank appends what it sees to
out_dir/signals-rank<R>.log: `start <restart count> <SIGUSR1 disposition at start>`, `got <SIGNAME>` for each signal
handled, and `exit <status> <parent>`, parent `torchrun` when the torchrun that started it is still alive then,
`gone` when it is not. It keeps train.py's side of the contract: on SIGUSR1 or SIGTERM rank 0 writes
out_dir/preempted.json, the others wait until it exists (in train.py a barrier), and all exit with 75. It does not
train: a run started again after a requeue (SLURM_RESTART_COUNT set) removes preempted.json and exits with 0, as a
resumed run that finishes would.
"""
import os
import signal
import sys
import time

from config import load_config

PREEMPTED_STATUS = 75


def main() -> int:
    args = sys.argv[1:]
    config = args[args.index("--config") + 1]
    overrides = [a for a in args if "=" in a and not a.startswith("--")]
    out_dir = load_config(config, overrides).train.out_dir
    rank = int(os.environ["RANK"])
    log_path = os.path.join(out_dir, f"signals-rank{rank}.log")
    preempted = os.path.join(out_dir, "preempted.json")

    def log(line: str) -> None:
        with open(log_path, "a") as f:
            f.write(line + "\n")

    parent = os.getppid()  # torchrun; a process whose parent ends is given another one

    def parent_state() -> str:
        return "torchrun" if os.getppid() == parent else "gone"

    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    disposition = signal.getsignal(signal.SIGUSR1)
    log(f"start {restart} {getattr(disposition, 'name', disposition)}")
    if restart != "0":
        if rank == 0 and os.path.exists(preempted):
            os.remove(preempted)
        log(f"exit 0 {parent_state()}")
        return 0

    received = []

    def handler(signum, frame):
        received.append(signum)
        log(f"got {signal.Signals(signum).name}")

    signal.signal(signal.SIGUSR1, handler)
    signal.signal(signal.SIGTERM, handler)
    open(os.path.join(out_dir, f"ready-rank{rank}"), "w").close()
    deadline = time.monotonic() + 300
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    if not received:
        log(f"exit 1 {parent_state()} (no signal)")
        return 1
    time.sleep(1)  # the rest of an optimizer step: a second signal (forwarded by torchrun) would arrive meanwhile
    if rank == 0:
        with open(preempted, "w") as f:
            f.write('{"step": 0}\n')
    while not os.path.exists(preempted) and time.monotonic() < deadline:
        time.sleep(0.05)
    log(f"exit {PREEMPTED_STATUS} {parent_state()}")
    return PREEMPTED_STATUS


if __name__ == "__main__":
    sys.exit(main())
