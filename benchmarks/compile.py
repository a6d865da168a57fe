"""Does torch.compile help? A plain and an HDKD iteration, eager against compiled, on the CPU (or GPU).

    python benchmarks/compile.py                       # the examples' 4-exit CNN, CIFAR-sized batch of 64
    python benchmarks/compile.py --rounds 7 --threads 2

Every variant first runs warm-up iterations (compilation happens there and is reported apart),
then the variants run one unit of iterations each per round, round-robin, so machine noise hits
all alike; the median seconds per iteration over rounds are printed with ratios to the eager
plain iteration of the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import metaweight as mw  # noqa: E402
from branchynet import branchynet  # noqa: E402


def make(compiled: bool, learn: bool, device: str):
    torch.manual_seed(0)
    model = branchynet(10, 3, num_exits=4, width=16).to(device)
    runner = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    weighter = mw.preset("hdkd" if learn else "naive_dkd", 4).weighter(runner, optimizer)
    return weighter


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--unit", type=int, default=3, help="iterations per timed unit")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(64, 3, 32, 32, generator=g).to(args.device), torch.randint(0, 10, (64,), generator=g).to(args.device))
    val = (torch.randn(64, 3, 32, 32, generator=g).to(args.device), torch.randint(0, 10, (64,), generator=g).to(args.device))
    variants = {f"{'HDKD' if learn else 'plain'}, {'compiled' if compiled else 'eager'}": make(compiled, learn, args.device)
                for learn in (False, True) for compiled in (False, True)}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    warm = {}
    for name, w in variants.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            w.step(batch, val)
        sync()
        warm[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, w in variants.items():
            start = time.perf_counter()
            for _ in range(args.unit):
                w.step(batch, val)
            sync()
            times[name].append((time.perf_counter() - start) / args.unit)
    base = statistics.median(times["plain, eager"])
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, batch 64, "
          f"medians of {args.rounds} rounds of {args.unit} iterations")
    print(f"{'variant':<18} {'s/iteration':>12} {'x plain eager':>14} {'warm-up s':>10}")
    for name in variants:
        m = statistics.median(times[name])
        print(f"{name:<18} {m:>12.4f} {m / base:>14.2f} {warm[name]:>10.1f}")


if __name__ == "__main__":
    main()
