"""The cost of the meta step: time and peak memory of a full training iteration per backend and
schedule, as ratios to a plain multi-exit iteration measured in the same run, and the relative
error of each backend's gamma gradient against `higher`.

    python benchmarks/overhead.py                      # CIFAR MSDNet (8 exits) and BranchyNet, batch 64
    python benchmarks/overhead.py --models msdnet --rounds 5 --out runs/overhead.json
    python benchmarks/overhead.py --models branchynet --variants "weighting uw" "weighting famo"   # the weightings

"plain" is the same model, loss terms and optimizer with fixed weights (learn=False): the
difference to it is the meta step alone. Timing: every variant runs one unit of 4 iterations
per round, round-robin, so machine noise hits all alike; the median over rounds is reported.
Memory: each variant runs in a fresh subprocess; on CUDA the allocator's peak over its value
after set-up, on CPU the peak resident set (sampled every ms) over its value after set-up
(activations and temporaries, the model and optimizer excluded).
"""

from __future__ import annotations

import argparse
import json
import platform
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import metaweight as mw  # noqa: E402
from branchynet import branchynet  # noqa: E402
from msdnet import msdnet_cifar  # noqa: E402

UNIT = 4  # iterations per timed unit (so that "meta every 4" is timed fairly)


def build(model_name: str, device: str):
    torch.manual_seed(0)
    if model_name == "msdnet":
        model = msdnet_cifar(100, 8)
        last = lambda n: n.startswith(("classifiers.", "blocks.7."))  # noqa: E731
    else:
        model = branchynet(100, 3, num_exits=4, width=32)
        last = lambda n: n.startswith(("heads.", "stages.3."))  # noqa: E731
    return model.to(device), last


VARIANTS = {
    "plain": ({"learn": False}, 64),
    "higher": ({"backend": "higher"}, 64),
    "jvp": ({"backend": "jvp"}, 64),
    "jvp, forward reuse": ({"backend": "jvp", "reuse_forward": True}, 64),
    "finite_difference": ({"backend": "finite_difference"}, 64),
    "jvp, meta every 4": ({"backend": "jvp", "meta_every": 4}, 64),
    "jvp, validation batch 16": ({"backend": "jvp"}, 16),
    "jvp, look-ahead on heads + last block": ({"backend": "jvp", "lookahead": True}, 64),
    "fast": ({"mode": "fast"}, 64),
    "fast, validation batch 16": ({"mode": "fast"}, 16),
    "fast, meta every 4": ({"mode": "fast", "meta_every": 4}, 64),
}
# the other loss weightings (mw.WEIGHTINGS) on the same terms, each timed through its one-call step()
VARIANTS.update({f"weighting {w}": ({"weighting": w}, 64) for w in mw.WEIGHTINGS})


def make_weighting(model, name, num_exits):
    """A loss weighting of mw.WEIGHTINGS with its defaults; GradNorm on the last conv of the first stage/block."""
    first = model.stages[0] if hasattr(model, "stages") else model.blocks[0]
    shared = [[m for m in first.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight]
    options = {"dwa": {"window": 20}, "gradnorm": {"shared_parameters": shared},
               "sdn": {"epochs": 100, "steps_per_epoch": 20}}.get(name, {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    return mw.WEIGHTINGS[name](model, optimizer, mw.DenseDistillLoss(num_exits, 3.0), **options)


def make_weighter(model, last, options, num_exits):
    if "weighting" in options:
        return make_weighting(model, options["weighting"], num_exits)
    options = dict(options)
    if options.pop("lookahead", False):
        options["lookahead_params"] = last
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    return mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(num_exits, 3.0),
                                 mw.BalancedValidation(num_exits), gamma_lr=0.01, **options)


def batches(device, batch_size, val_size, classes=100):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, classes, (batch_size,), generator=g).to(device)
    xv = torch.randn(val_size, 3, 32, 32, generator=g).to(device)
    yv = torch.randint(0, classes, (val_size,), generator=g).to(device)
    return (x, y), (xv, yv)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(model_name, device, batch_size, rounds, names):
    setups = {}
    for name in names:
        options, val_size = VARIANTS[name]
        model, last = build(model_name, device)
        k = len(model(torch.zeros(2, 3, 32, 32, device=device)))
        w = make_weighter(model, last, options, k)
        train, val = batches(device, batch_size, val_size)
        for _ in range(2):  # warm-up: allocator, optimizer state
            w.step(train, val)
        setups[name] = (w, train, val)
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            w, train, val = setups[name]
            sync(device)
            start = time.perf_counter()
            for _ in range(UNIT):
                w.step(train, val)
            sync(device)
            times[name].append((time.perf_counter() - start) / UNIT)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory_child(model_name, device, batch_size, name):
    """Run in a subprocess: peak memory of UNIT iterations over the post-set-up baseline, in MiB."""
    options, val_size = VARIANTS[name]
    model, last = build(model_name, device)
    k = len(model(torch.zeros(2, 3, 32, 32, device=device)))
    w = make_weighter(model, last, options, k)
    train, val = batches(device, batch_size, val_size)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(UNIT):
            w.step(train, val)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():  # the peak of the resident set, sampled every millisecond
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for _ in range(UNIT):
        w.step(train, val)
    done.set()
    thread.join()
    return (max(peak[0], _rss()) - base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def gamma_grad_errors(model_name, device, batch_size):
    """Relative error of gamma's gradient: each backend against higher in float64 (the maths), and every
    backend in float32 against float64 higher (what rounding does to this model's meta-gradient)."""
    grads = {}
    for dtype in (torch.float64, torch.float32):
        for backend in ("higher", "jvp", "finite_difference"):
            model, last = build(model_name, device)
            model = model.to(dtype)
            k = len(model(torch.zeros(2, 3, 32, 32, device=device, dtype=dtype)))
            w = make_weighter(model, last, {"backend": backend}, k)
            (x, y), (xv, yv) = batches(device, batch_size, batch_size)
            train, val = (x.to(dtype), y), (xv.to(dtype), yv)
            torch.manual_seed(3)
            w.step(train, val)  # one real step first, so the optimizer has momentum state
            torch.manual_seed(4)
            grads[(str(dtype)[6:], backend)] = w.meta_step(train, val)["gamma_grad"].double()
    ref = grads[("float64", "higher")]
    err = lambda g: float((g - ref).norm() / ref.norm())  # noqa: E731
    return {f"{dt} {b}": err(g) for (dt, b), g in grads.items() if (dt, b) != ("float64", "higher")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["msdnet", "branchynet"], choices=["msdnet", "branchynet"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--memory-child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        print(json.dumps(peak_memory_child(args.memory_child[0], args.device, args.batch_size, args.memory_child[1])))
        return
    names = ["plain"] + [v for v in args.variants if v != "plain"]
    report = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "batch_size": args.batch_size,
              "rounds": args.rounds, "models": {}}
    for model_name in args.models:
        print(f"\n== {model_name}, batch {args.batch_size}, {args.device}, {torch.get_num_threads()} threads ==",
              flush=True)
        times = time_variants(model_name, args.device, args.batch_size, args.rounds, names)
        memory = {}
        for name in names:
            out = subprocess.run([sys.executable, __file__, "--memory-child", model_name, name, "--device",
                                  args.device, "--batch-size", str(args.batch_size)],
                                 capture_output=True, text=True, check=True)
            memory[name] = json.loads(out.stdout.strip().splitlines()[-1])
        errors = gamma_grad_errors(model_name, args.device, args.batch_size)
        rows = {}
        print(f"{'variant':40s} {'s/iter':>8s} {'time x':>7s} {'peak MiB':>9s} {'mem x':>6s}")
        for name in names:
            rows[name] = {"seconds_per_iteration": times[name], "time_ratio": times[name] / times["plain"],
                          "peak_mib": memory[name], "memory_ratio": memory[name] / memory["plain"]}
            r = rows[name]
            print(f"{name:40s} {r['seconds_per_iteration']:8.3f} {r['time_ratio']:7.2f} {r['peak_mib']:9.0f} "
                  f"{r['memory_ratio']:6.2f}", flush=True)
        print("gamma-gradient relative error against float64 higher: "
              + ", ".join(f"{b} {e:.1e}" for b, e in errors.items()))
        report["models"][model_name] = {"variants": rows, "gamma_grad_rel_error_vs_higher": errors}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
