"""Reproduce the paper's comparison (Table 2, Fig. 2) on offline data: every method, several seeds.

One run = one configuration, one setting, one seed = one JSON file (per-exit top-1/top-5 on the
test set and the held-out split, the budget curve from thresholds on the held-out split, gamma
history with the meta-gradient, wall time, config), written by examples/train.py. Runs whose
file exists are skipped and an interrupted run resumes from its checkpoint (``*.ckpt`` beside
the JSON, every 200 iterations), so the grid can be stopped and resumed across sessions.

    python benchmarks/reproduce.py --grid cpu --jobs 2            # CIFAR-10(150) and (500), 4-exit CNN
    python benchmarks/reproduce.py --grid cpu --settings cifar10-150 --seeds 0 1 2
    python benchmarks/reproduce.py --grid tune --jobs 2           # choosing gamma's optimizer (selection split)
    python benchmarks/reproduce.py --grid gpu --device cuda       # full-width MSDNet, 300 epochs
    python benchmarks/report.py results/cpu                       # the tables, paired differences, plots

The paper's optimisation: SGD, momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 50% and
75% of training, batch 64; 10% of the training pool held out (un-augmented) for the meta step
and the thresholds; standard augmentation (4-pixel padded random crop, horizontal flip). Where
the paper is silent: T = 3, alpha = 0.5, gamma initialised uniform, validation batch 64, and
gamma's optimizer (chosen by the ``tune`` grid on a selection split, see docs/results.md).

Configurations (``--configs``): the six presets by name, and
``msdnet_long`` (MSDNet for LONG_EPOCHS x the epochs: about HDKD's wall clock), ``hdkd_every4``
(a meta step every 4 iterations), ``hdkd_fast`` (``mode="fast"``), ``hdkd_init_last`` / ``hdkd_init_random`` (gamma starting
DBT-like / random), ``hdkd_alpha0`` / ``hdkd_alpha1`` (the balanced objective's alpha), and
``hdkd_sgd`` (the paper's plain SGD on gamma with learning rate 0.01); the other loss weightings by name
(``uw``, ``dwa``, ``gradnorm``, ``rlw``, ``famo``, ``sdn``: on the dense-KD terms) and with ``_ce`` (on the exits'
cross-entropies only), all in the ``weightings`` grid:

    python benchmarks/reproduce.py --grid weightings --jobs 2     # beside the cpu grid's runs, same seeds
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
sys.path.insert(0, str(ROOT))

import metaweight as mw  # noqa: E402

METHODS = list(mw.METHODS)

# setting name -> (data set, images per class)
SETTINGS = {"cifar10-150": ("cifar10", 150), "cifar10-500": ("cifar10", 500),
            "cifar100-150": ("cifar100", 150), "cifar100-500": ("cifar100", 500)}

# gamma's optimizer for the learned presets: chosen by the "tune" grid (docs/results.md)
GAMMA = ["--gamma-optimizer", "adam", "--gamma-lr", "0.01"]
LONG_EPOCHS = 4  # HDKD's iteration costs about 4x MSDNet's here (measured in the runs' train_seconds)

# configuration name -> (preset, extra train.py arguments, epoch multiplier)
CONFIGS: dict[str, tuple[str, list[str], int]] = {
    **{m: (m, GAMMA if mw.METHODS[m].learn else [], 1) for m in METHODS},
    "msdnet_long": ("msdnet", [], LONG_EPOCHS),
    "hdkd_every4": ("hdkd", GAMMA + ["--meta-every", "4"], 1),
    "hdkd_fast": ("hdkd", GAMMA + ["--mode", "fast"], 1),
    "hdkd_init_last": ("hdkd", GAMMA + ["--gamma-init", "last"], 1),
    "hdkd_init_random": ("hdkd", GAMMA + ["--gamma-init", "random"], 1),
    "hdkd_alpha0": ("hdkd", GAMMA + ["--alpha", "0"], 1),
    "hdkd_alpha1": ("hdkd", GAMMA + ["--alpha", "1"], 1),
    "hdkd_sgd": ("hdkd", ["--gamma-optimizer", "sgd", "--gamma-lr", "0.01"], 1),
    # the sum of gamma held at its start: reweighting without the change of scale Adam on gamma brings
    "hdkd_normalize": ("hdkd", GAMMA + ["--constraint", "normalize"], 1),
}
# the candidates for gamma's optimizer, scored on the selection split only
TUNE = {
    "tune_sgd_0.01": ("hdkd", ["--gamma-optimizer", "sgd", "--gamma-lr", "0.01"], 1),
    "tune_sgd_0.3": ("hdkd", ["--gamma-optimizer", "sgd", "--gamma-lr", "0.3"], 1),
    "tune_adam_0.001": ("hdkd", ["--gamma-optimizer", "adam", "--gamma-lr", "0.001"], 1),
    "tune_adam_0.01": ("hdkd", ["--gamma-optimizer", "adam", "--gamma-lr", "0.01"], 1),
}
CONFIGS.update(TUNE)
# the other loss weightings (mw.WEIGHTINGS), each with its paper's defaults: on the dense-KD terms (as HDKD),
# and on the exits' cross-entropies alone (``_ce``: what UW, DWA, GradNorm, RLW and FAMO weigh in their papers,
# the terms SDN schedules); train.py sets the options that depend on the run (DWA's window = one epoch, ...)
WEIGHTING_CONFIGS = {
    **{w: (w, [], 1) for w in mw.WEIGHTINGS},
    **{f"{w}_ce": (w, ["--teachers", "none"], 1) for w in mw.WEIGHTINGS},
}
CONFIGS.update(WEIGHTING_CONFIGS)

GRIDS = {
    # the examples' 4-exit CNN at width 8: 100 epochs of CIFAR-10(X) fit a CPU
    "cpu": {"settings": ["cifar10-150", "cifar10-500"], "epochs": {"cifar10-150": 100, "cifar10-500": 100},
            "model": ["--model", "branchynet", "--exits", "4", "--width", "8"], "seeds": [0, 1, 2],
            "configs": METHODS + ["msdnet_long", "hdkd_every4", "hdkd_fast"]},
    # the other loss weightings, on the cpu grid's settings, model and seeds (same folders: paired with its runs)
    "weightings": {"settings": ["cifar10-150", "cifar10-500"], "epochs": {"cifar10-150": 100, "cifar10-500": 100},
                   "model": ["--model", "branchynet", "--exits", "4", "--width", "8"], "seeds": [0, 1, 2],
                   "configs": list(WEIGHTING_CONFIGS)},
    # Table 3's ablation, on one setting
    "ablation": {"settings": ["cifar10-150"], "epochs": {"cifar10-150": 100},
                 "model": ["--model", "branchynet", "--exits", "4", "--width", "8"], "seeds": [0, 1, 2],
                 "configs": ["hdkd_init_last", "hdkd_init_random", "hdkd_alpha0", "hdkd_alpha1", "hdkd_sgd",
                             "hdkd_normalize"]},
    # choosing gamma's optimizer: a seed of its own, scored on 100 images per class from outside the pool
    "tune": {"settings": ["cifar10-150"], "epochs": {"cifar10-150": 100},
             "model": ["--model", "branchynet", "--exits", "4", "--width", "8"], "seeds": [100],
             "configs": list(TUNE), "extra": ["--select-per-class", "100"]},
    # the full-width CIFAR MSDNet of the paper's anytime setting
    "gpu": {"settings": ["cifar10-150", "cifar10-500", "cifar100-150", "cifar100-500"],
            "epochs": {s: 300 for s in SETTINGS},
            "model": ["--model", "msdnet", "--exits", "8", "--width", "16", "--growth-rate", "6"],
            "seeds": [0, 1, 2], "configs": METHODS},
}


def command(setting: str, config: str, seed: int, epochs: int, grid: dict, out: Path, data_dir: str | None,
            device: str, threads: int, max_steps: int | None) -> list[str]:
    dataset, per_class = SETTINGS[setting]
    method, extra, multiplier = CONFIGS[config]
    cmd = [sys.executable, str(ROOT / "examples" / "train.py"), "--method", method, "--tag", config,
           "--dataset", dataset, "--per-class", str(per_class), *grid["model"], "--epochs", str(epochs * multiplier),
           "--seed", str(seed), "--device", device, "--threads", str(threads), "--out", str(out), "--no-plot",
           "--no-progress", "--checkpoint", str(out.with_suffix(".ckpt")), *extra, *grid.get("extra", [])]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if max_steps:
        cmd += ["--max-steps", str(max_steps)]
    return cmd


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="cpu", choices=list(GRIDS))
    p.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS))
    p.add_argument("--configs", "--methods", nargs="+", default=None, choices=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="override the grid's epochs")
    p.add_argument("--max-steps", type=int, default=None, help="stop each run after this many iterations")
    p.add_argument("--data-dir", default=None, help="CIFAR python release or CIFAR-10 JPEG folder/tarball")
    p.add_argument("--results", default=None, help="output folder (default results/cpu, results/gpu)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each with cores/jobs threads)")
    args = p.parse_args(argv)
    grid = GRIDS[args.grid]
    out_dir = Path(args.results or ROOT / "results" / ("gpu" if args.grid == "gpu" else "cpu"))
    sub = {"tune": "tune", "ablation": "ablation"}.get(args.grid)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runs = []
    for setting in args.settings or grid["settings"]:
        for seed in args.seeds if args.seeds is not None else grid["seeds"]:
            for config in args.configs or grid["configs"]:  # configs innermost: each seed completes a comparison
                folder = out_dir / setting / sub if sub else out_dir / setting
                out = folder / f"{config}-seed{seed}.json"
                if out.exists():
                    continue
                epochs = args.epochs or grid["epochs"][setting]
                runs.append((out, command(setting, config, seed, epochs, grid, out, args.data_dir, args.device,
                                          threads, args.max_steps)))
    print(f"{len(runs)} runs to do in {out_dir} ({args.jobs} at a time, {threads} threads each)", flush=True)

    def run(item: tuple[Path, list[str]]) -> None:
        out, cmd = item
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        log = out.with_suffix(".log")
        with open(log, "a") as f:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        status = "ok" if done.returncode == 0 else f"FAILED (rc {done.returncode}, see {log})"
        print(f"{out.relative_to(out_dir)}: {status} in {time.time() - start:.0f}s", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(run, runs))


if __name__ == "__main__":
    main()
