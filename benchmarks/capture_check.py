"""Does a CUDA graph's replay of ``device_step()`` give the eager ``device_step()``'s numbers?

    python benchmarks/capture_check.py                # on a machine with CUDA
    python benchmarks/capture_check.py --device cpu   # a dry run: both sides eager (checks the script)

Three copies of the reference CIFAR MSDNet (8 exits, 100 classes, batch 64, validation batch 64),
each with a fused model optimizer and ``mode="fast", nonfinite="skip", capturable=True``: two
step eagerly (their difference is the run-to-run noise of the kernels, the floor), the third
through a graph captured after three eager warm-up calls on a side stream (as
``torch.cuda.graphs`` asks), all on the same batches: the warm-up batch three times, then eight
batches of which the fourth has a NaN validation input (the meta step is skipped) and the sixth a
NaN training input (the model step is refused). After every call the records are compared; at the
end the parameters, buffers, both optimizers' states, gamma and the counts. The largest absolute
differences eager-eager and eager-replayed are printed; "identical" means bit for bit. fp32, TF32
off, deterministic algorithms where torch has them (warn only), one CPU thread.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (before CUDA starts)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import metaweight as mw  # noqa: E402
from msdnet import msdnet_cifar  # noqa: E402


def optimizers(model, kind, device):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True,
                               fused=True)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, fused=True,
                             capturable=device.startswith("cuda"))


def tensors_of(weighter, model, optimizer):
    out = {f"param {n}": p for n, p in model.named_parameters()}
    out.update({f"buffer {n}": b for n, b in model.named_buffers() if b.is_floating_point()})
    for i, state in enumerate(optimizer.state.values()):
        out.update({f"optimizer state {i} {k}": v for k, v in state.items() if torch.is_tensor(v)})
    out["gamma"] = weighter.gamma.detach()
    for i, state in enumerate(weighter.gamma_optimizer.state.values()):
        out.update({f"gamma optimizer {i} {k}": v for k, v in state.items() if torch.is_tensor(v)})
    return out


def largest(a: dict, b: dict, prefix: str) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name, x in a.items():
        if name.startswith(prefix):
            y = b[name]
            d = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            if not (x.isnan() == y.isnan()).all():
                d = float("inf")
            elif d != d:  # both NaN at the same places
                d = (torch.nan_to_num(x.double()) - torch.nan_to_num(y.double())).abs().max().item()
            if d > worst or not where:
                worst, where = d, name
    return worst, where


def run(kind: str, device: str, steps: int) -> bool:
    """Eager A, eager B and replayed C on the same batches; True where C is A bit for bit wherever B is."""
    torch.manual_seed(0)
    base = msdnet_cifar(100, 8).to(device)
    models = [base, copy.deepcopy(base), copy.deepcopy(base)]
    opts = [optimizers(m, kind, device) for m in models]
    weighters = [mw.HarmonizedWeighter(m, o, mw.DenseDistillLoss(8, 3.0), mw.BalancedValidation(8), gamma_lr=0.01,
                                       mode="fast", nonfinite="skip", capturable=True)
                 for m, o in zip(models, opts)]
    g = torch.Generator().manual_seed(1)
    batches = []
    for i in range(steps + 1):
        x, xv = torch.randn(64, 3, 32, 32, generator=g), torch.randn(64, 3, 32, 32, generator=g)
        y, yv = torch.randint(0, 100, (64,), generator=g), torch.randint(0, 100, (64,), generator=g)
        if i == 4:
            xv[3, 0, 0, 0] = float("nan")
        if i == 6:
            x[5, 0, 0, 0] = float("nan")
        batches.append([t.to(device) for t in (x, y, xv, yv)])
    static = [[t.clone() for t in batches[0]] for _ in models]

    def call(side):
        x, y, xv, yv = static[side]
        return weighters[side].device_step((x, y), (xv, yv))

    graph = None
    if device.startswith("cuda"):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                call(2)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = call(2)
    else:
        for _ in range(3):
            call(2)
    for side in (0, 1):
        for _ in range(3):
            call(side)
    floor_ok, same_ok = True, True
    for i in range(1, steps + 1):
        for side in range(3):
            for t, new in zip(static[side], batches[i]):
                t.copy_(new)
        a, b = call(0).read(), call(1).read()
        if graph is not None:
            graph.replay()
            c = captured.read()
        else:
            c = call(2).read()
        ab, ac = repr(a) == repr(b), repr(a) == repr(c)
        floor_ok &= ab
        same_ok &= ac
        print(f"{kind} step {i}: model step skipped {a.model_step_skipped}, meta step skipped {a.skipped}; "
              f"records eager-eager {'identical' if ab else 'differ'}, eager-replayed "
              f"{'identical' if ac else 'differ'}")
        if not ac:
            print("  eager   ", a)
            print("  replayed", c)
    for w in weighters:
        w.sync_counts()
    counts = [(w.num_calls, w.num_meta_steps, w.num_skipped) for w in weighters]
    print(f"{kind} counts (calls, meta steps, skipped): eager {counts[0]}, eager {counts[1]}, replayed {counts[2]}")
    same_ok &= counts[0] == counts[2]
    ta, tb, tc = (tensors_of(w, m, o) for w, m, o in zip(weighters, models, opts))
    same_ok &= set(ta) == set(tc)
    for prefix in ("param", "buffer", "optimizer state", "gamma optimizer", "gamma"):
        d_ab, _ = largest(ta, tb, prefix)
        d_ac, where = largest(ta, tc, prefix)
        floor_ok &= d_ab == 0.0
        same_ok &= d_ac == 0.0
        print(f"{kind} {prefix}: largest |eager - eager| {d_ab:.3g}, |eager - replayed| {d_ac:.3g}"
              f"{'' if d_ac == 0 else ' at ' + where}")
    print(f"{kind}: eager runs {'identical' if floor_ok else 'differ (kernel noise)'}; replay "
          f"{'identical to eager' if same_ok else 'differs from eager'}")
    return same_ok


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--optimizers", nargs="+", default=["sgd", "adamw"], choices=["sgd", "adamw"])
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    results = {}
    for kind in args.optimizers:
        try:
            results[kind] = run(kind, args.device, args.steps)
        except Exception as e:  # report and go on to the next optimizer
            print(f"{kind}: {type(e).__name__}: {e}")
            results[kind] = False
    print("capture check:", ", ".join(f"{k} {'identical' if v else 'NOT identical'}" for k, v in results.items()))


if __name__ == "__main__":
    main()
