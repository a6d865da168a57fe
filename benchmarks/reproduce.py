"""Reproduce the paper's comparison (Table 2, Fig. 2) on offline data: every method, several seeds.

One run = one method, one setting, one seed = one JSON file (per-exit top-1/top-5 on the test
set, the budget curve from thresholds on the held-out split, gamma history, wall time, config),
written by examples/train.py. Runs whose file exists are skipped, so the grid can be stopped
and resumed across sessions.

    python benchmarks/reproduce.py --grid cpu --jobs 2          # CIFAR-10(150) and CIFAR-10(500), reduced MSDNet
    python benchmarks/reproduce.py --grid cpu --settings cifar10-150 --seeds 0 1 2
    python benchmarks/reproduce.py --grid gpu --device cuda    # full-width MSDNet, more epochs
    python benchmarks/report.py results/cpu                    # the table and the plot

The paper's optimisation: SGD, momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 50% and
75% of training, batch 64; 10% of the training pool held out (un-augmented) for the meta step
and the thresholds; standard augmentation (4-pixel padded random crop, horizontal flip). Where
the paper is silent: T = 3, alpha = 0.5, gamma learning rate 0.01, gamma initialised uniform,
validation batch 64.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["msdnet", "dbt", "naive_dkd", "hmsdnet", "hdbt", "hdkd"]

# setting name -> (data set, images per class)
SETTINGS = {"cifar10-150": ("cifar10", 150), "cifar10-500": ("cifar10", 500),
            "cifar100-150": ("cifar100", 150), "cifar100-500": ("cifar100", 500)}

GRIDS = {
    # 8-exit MSDNet at half width (8 stem channels, growth 3): CPU-sized
    "cpu": {"settings": ["cifar10-150", "cifar10-500"], "epochs": {"cifar10-150": 12, "cifar10-500": 6},
            "width": 8, "growth_rate": 3, "seeds": [0, 1, 2]},
    # the full-width CIFAR MSDNet of the paper's anytime setting
    "gpu": {"settings": ["cifar10-150", "cifar10-500", "cifar100-150", "cifar100-500"],
            "epochs": {"cifar10-150": 300, "cifar10-500": 300, "cifar100-150": 300, "cifar100-500": 300},
            "width": 16, "growth_rate": 6, "seeds": [0, 1, 2]},
}


def command(setting: str, method: str, seed: int, epochs: int, width: int, growth: int, out: Path,
            data_dir: str | None, device: str, threads: int, max_steps: int | None) -> list[str]:
    dataset, per_class = SETTINGS[setting]
    cmd = [sys.executable, str(ROOT / "examples" / "train.py"), "--method", method, "--dataset", dataset,
           "--per-class", str(per_class), "--model", "msdnet", "--exits", "8", "--width", str(width),
           "--growth-rate", str(growth), "--epochs", str(epochs), "--seed", str(seed), "--device", device,
           "--threads", str(threads), "--out", str(out), "--no-plot", "--no-progress"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if max_steps:
        cmd += ["--max-steps", str(max_steps)]
    return cmd


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="cpu", choices=list(GRIDS))
    p.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="override the grid's epochs")
    p.add_argument("--max-steps", type=int, default=None, help="stop each run after this many iterations")
    p.add_argument("--data-dir", default=None, help="CIFAR python release or CIFAR-10 JPEG folder/tarball")
    p.add_argument("--results", default=None, help="output folder (default results/GRID)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each with cores/jobs threads)")
    args = p.parse_args(argv)
    grid = GRIDS[args.grid]
    out_dir = Path(args.results or ROOT / "results" / args.grid)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runs = []
    for setting in args.settings or grid["settings"]:
        for seed in args.seeds if args.seeds is not None else grid["seeds"]:
            for method in args.methods:  # methods innermost: every seed completes a full comparison
                out = out_dir / setting / f"{method}-seed{seed}.json"
                if out.exists():
                    continue
                epochs = args.epochs or grid["epochs"][setting]
                runs.append((out, command(setting, method, seed, epochs, grid["width"], grid["growth_rate"], out,
                                          args.data_dir, args.device, threads, args.max_steps)))
    print(f"{len(runs)} runs to do in {out_dir} ({args.jobs} at a time, {threads} threads each)", flush=True)

    def run(item: tuple[Path, list[str]]) -> None:
        out, cmd = item
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        log = out.with_suffix(".log")
        with open(log, "w") as f:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        status = "ok" if done.returncode == 0 else f"FAILED (rc {done.returncode}, see {log})"
        print(f"{out.relative_to(out_dir)}: {status} in {time.time() - start:.0f}s", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(run, runs))


if __name__ == "__main__":
    main()
