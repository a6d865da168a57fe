"""Speed of the evaluation tools, as ratios measured side by side in one run (medians).

1. Threshold search + budgeted accuracy on 10,000 samples x 8 exits x 100 classes: the
   vectorised metaweight functions against the per-sample Python loop of MSDNet's procedure
   (references/budget.py), over the same q values, checking they agree.
2. Early-exit inference on the examples' CIFAR MSDNet (8 exits) against the full forward:
   wall-clock per image (batch 1) and per batch (masking), next to the FLOPs estimate.

    python benchmarks/evaluation.py [--qs 5] [--images 256] [--out runs/evaluation.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import metaweight as mw  # noqa: E402
from references.budget import loop_evaluate, loop_thresholds  # noqa: E402
from msdnet import msdnet_cifar  # noqa: E402


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def threshold_search(num_qs: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    K, N, C = 8, 10_000, 100
    val, test = torch.randn(K, N, C, generator=g) * 3, torch.randn(K, N, C, generator=g) * 3
    val_y, test_y = torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (N,), generator=g)
    costs = [float(k + 1) for k in range(K)]
    qs = [p / 20 for p in range(1, 40)][:: max(1, 39 // num_qs)][:num_qs]

    def vectorised():
        return mw.budgeted_curve(val, val_y, test, test_y, costs, qs=qs)

    def loop():
        pv, pt = torch.softmax(val, -1), torch.softmax(test, -1)
        out = []
        for q in qs:
            T = loop_thresholds(pv, mw.geometric_exit_distribution(q, K))
            out.append((T, loop_evaluate(pt, test_y, T, costs)))
        return out

    curve, reference = vectorised(), loop()
    agree = all(p.thresholds == T.tolist() and abs(p.accuracy - acc) < 1e-9 and abs(p.cost - cost) < 1e-9
                for p, (T, (acc, cost, _)) in zip(curve.points, reference))
    t_vec = median_time(vectorised, repeats)
    t_loop = median_time(loop, max(1, repeats // 3))
    return {"samples": N, "exits": K, "classes": C, "q_values": len(qs), "agree_exactly": agree,
            "vectorised_s": t_vec, "loop_s": t_loop, "speedup": t_loop / t_vec}


def early_exit(images: int, repeats: int) -> dict:
    torch.manual_seed(0)
    net = msdnet_cifar(100, 8).eval()
    x = torch.randn(images, 3, 32, 32)
    with torch.no_grad():
        logits = torch.stack(net(x))
    costs = mw.exit_costs(net, x[:1], executed=True)  # what EarlyExit runs, the wall-clock's counterpart
    # thresholds that send a geometric share of the images out early (q = 0.5: about half at exit 1)
    T = mw.find_thresholds(logits, mw.geometric_exit_distribution(0.5, 8))
    point = mw.evaluate_thresholds(logits, torch.zeros(images, dtype=torch.long), T, costs.macs)
    predictor = mw.EarlyExit(net, T)
    with torch.no_grad():
        full_batch = median_time(lambda: net(x), repeats)
        early_batch = median_time(lambda: predictor(x), repeats)
        few = x[:32]
        full_one = median_time(lambda: [net(few[i:i + 1]) for i in range(len(few))], repeats) / len(few)
        early_one = median_time(lambda: [predictor(few[i:i + 1]) for i in range(len(few))], repeats) / len(few)
    return {"images": images, "exit_fractions": point.exit_fractions,
            "expected_macs": point.cost, "full_macs": costs.macs[-1],
            "flops_speedup_estimate": costs.macs[-1] / point.cost,
            "batch_full_s": full_batch, "batch_early_s": early_batch, "batch_speedup": full_batch / early_batch,
            "per_image_full_s": full_one, "per_image_early_s": early_one, "per_image_speedup": full_one / early_one,
            "note": "per-image times over the first 32 images, whose exits may differ from the batch's mix"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qs", type=int, default=5, help="how many q values of MSDNet's grid to time")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    report["threshold_search"] = ts = threshold_search(args.qs, args.repeats)
    print(f"threshold search, {ts['samples']} x {ts['exits']} x {ts['classes']}, {ts['q_values']} q values: "
          f"vectorised {ts['vectorised_s']:.3f}s, per-sample loop {ts['loop_s']:.1f}s, "
          f"{ts['speedup']:.0f}x faster; agree exactly: {ts['agree_exactly']}")
    report["early_exit"] = ee = early_exit(args.images, args.repeats)
    print(f"early exit, MSDNet 8 exits, exit fractions {[round(f, 2) for f in ee['exit_fractions']]}:")
    print(f"  FLOPs estimate: {ee['expected_macs'] / 1e6:.1f} of {ee['full_macs'] / 1e6:.1f} MMACs, "
          f"{ee['flops_speedup_estimate']:.2f}x")
    print(f"  batch of {ee['images']}: full {ee['batch_full_s']:.3f}s, early exit {ee['batch_early_s']:.3f}s, "
          f"{ee['batch_speedup']:.2f}x")
    print(f"  one image at a time: full {ee['per_image_full_s'] * 1e3:.1f}ms, early exit "
          f"{ee['per_image_early_s'] * 1e3:.1f}ms, {ee['per_image_speedup']:.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
