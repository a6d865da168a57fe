"""Latency of real early exit against the full model: p50/p95 per image at batch 1 and throughput
at a large batch, next to the FLOPs speed-up, on the machine at hand.

    python benchmarks/latency.py                          # CIFAR MSDNet (8 exits), CPU or GPU
    python benchmarks/latency.py --batch 256 --repeats 20 --threads 2
    python benchmarks/latency.py --cuda-graphs            # + EarlyExit(cuda_graphs=True), and on CUDA
                                                          #   the full model replayed from a CUDA graph

Thresholds come from MSDNet's geometric exit distributions (q) on the logits of the batch that is
timed, from the same network (random weights unless --checkpoint gives a state_dict): what matters
here is how many samples leave where, not accuracy, so they are fitted on the timed batch itself (no
held-out split). The FLOPs speed-up uses the costs early exit executes
(``exit_costs(..., executed=True)``); the wall-clock one is measured, medians over repeats,
the full model and every q interleaved so machine noise hits all alike. "reads" counts the host
reads of one call at batch N and at batch 1: on the CPU the calls that bring values to the host
(``.tolist()``, ``.item()``, ``bool(t)``...: a ``TorchFunctionMode`` counts them) and ``aten::nonzero``
from ``torch.profiler`` (which sizes its output on the host), each a synchronisation on a GPU; on
CUDA the synchronisations themselves (``cuda*Synchronize`` calls in the profile).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import metaweight as mw  # noqa: E402
from msdnet import msdnet_cifar  # noqa: E402


class _Reads(TorchFunctionMode):
    """Counts the calls that bring a tensor's values to the host: ``.tolist()``, ``.item()``, ``.numpy()``,
    ``.cpu()``, ``bool``/``int``/``float``/``index`` of a tensor (the profiler's ``aten::_local_scalar_dense``
    misses ``.tolist()``)."""

    READS = {"tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", None) in self.READS
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--single", type=int, default=100, help="images timed one by one at batch 1")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--qs", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="a state_dict of msdnet_cifar(10, 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also EarlyExit(cuda_graphs=True) for each q (on the CPU: its padded stages, run eagerly) "
                        "and, on CUDA, the full model captured whole at each batch size (one graph per size)")
    p.add_argument("--counts", action="store_true",
                   help="only count, at the batch size, the launch-equivalent ops of one call (overhead.count): "
                        "the full model, EarlyExit, and EarlyExit(cuda_graphs=True) outside its stages, whose "
                        "replays are counted as one launch each (on the CPU nothing is captured: each graph's "
                        "run is replaced by the outputs of an earlier run, which is what a replay writes)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):  # fp32, as issue 20 measured: no TF32 in convolutions or matrix products
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = msdnet_cifar(10, 8).to(args.device).eval()
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location=args.device))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    with torch.no_grad():
        logits = torch.stack(model(x)).cpu()
    costs = mw.exit_costs(model, x[:1], executed=True).macs
    predictors = {"full model": None}
    flops_speedup = {"full model": 1.0}
    for q in args.qs:
        thresholds = mw.find_thresholds(logits, mw.geometric_exit_distribution(q, 8))
        point = mw.evaluate_thresholds(logits, torch.zeros(args.batch, dtype=torch.long), thresholds, costs)
        name = f"early exit q={q}"
        predictors[name] = mw.EarlyExit(model, thresholds)
        flops_speedup[name] = costs[-1] / point.cost
        if args.cuda_graphs:
            predictors[name + ", graphs"] = mw.EarlyExit(model, thresholds, cuda_graphs=True)
            flops_speedup[name + ", graphs"] = flops_speedup[name]
    if args.counts:
        return counts(model, x, predictors)
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
    if args.cuda_graphs and args.device.startswith("cuda"):
        predictors["full model, graph"] = "graph"
        flops_speedup["full model, graph"] = 1.0

    def full_graph(inputs: torch.Tensor) -> None:
        """The full forward replayed from a CUDA graph captured for this batch size (the input copied in)."""
        if inputs.shape[0] not in graphs:
            static = inputs.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                model(static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                model(static)
            graphs[inputs.shape[0]] = graph, static
        graph, static = graphs[inputs.shape[0]]
        static.copy_(inputs)
        graph.replay()

    def run(name: str, inputs: torch.Tensor) -> None:
        with torch.no_grad():
            if predictors[name] is None:
                model(inputs)
            elif predictors[name] == "graph":
                full_graph(inputs)
            else:
                predictors[name](inputs)

    for name in predictors:  # warm-up (graphs: every image timed one by one, so each stage is captured
        run(name, x)         # for each size it will see before the timing)
        for i in range(min(args.single, args.batch) if args.cuda_graphs else 1):
            run(name, x[i:i + 1])
    throughput = {name: [] for name in predictors}
    single = {name: [] for name in predictors}
    for _ in range(args.repeats):
        for name in predictors:
            sync()
            start = time.perf_counter()
            run(name, x)
            sync()
            throughput[name].append(args.batch / (time.perf_counter() - start))
        for name in predictors:
            for i in range(args.single // args.repeats + 1):
                sync()
                start = time.perf_counter()
                run(name, x[i:i + 1])
                sync()
                single[name].append(time.perf_counter() - start)
    reads = {}
    cuda = args.device.startswith("cuda")
    for name in predictors:
        for inputs in (x, x[:1]):
            sync()
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                run(name, inputs)
            # on CUDA a read is a synchronisation (a .tolist() copies to the host without a scalar read)
            if not cuda:  # the calls that read values to the host, and the nonzeros (boolean masks)
                with _Reads() as counted:
                    run(name, inputs)
            reads.setdefault(name, []).append(
                sum(e.name.startswith("cu") and "Synchronize" in e.name for e in prof.events()) if cuda else
                counted.count + sum(e.name == "aten::nonzero" for e in prof.events()))
    full_tp = statistics.median(throughput["full model"])
    full_p50 = statistics.median(single["full model"])
    print(f"CIFAR MSDNet (8 exits), torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads")
    print(f"{'':<26} {'FLOPs x':>8} {'batch ' + str(args.batch) + ' img/s':>16} {'x':>6} {'b1 p50 ms':>10} "
          f"{'p95 ms':>8} {'x':>6} {'reads b' + str(args.batch):>10} {'reads b1':>9}")
    for name in predictors:
        tp = statistics.median(throughput[name])
        lat = sorted(single[name])
        p50, p95 = statistics.median(lat), lat[min(len(lat) - 1, int(0.95 * len(lat)))]
        print(f"{name:<26} {flops_speedup[name]:>8.2f} {tp:>16.1f} {tp / full_tp:>6.2f} {1e3 * p50:>10.2f} "
              f"{1e3 * p95:>8.2f} {full_p50 / p50:>6.2f} {reads[name][0]:>10} {reads[name][1]:>9}")


def counts(model: torch.nn.Module, x: torch.Tensor, predictors: dict) -> None:
    """Launch-equivalent ops of one call at ``x``'s batch size (``overhead.count``, on this device)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from overhead import count

    def full() -> None:
        with torch.no_grad():
            model(x)

    print(f"CIFAR MSDNet (8 exits), torch {torch.__version__}, {x.device}, batch {x.shape[0]}: launch-equivalent "
          f"ops per call (overhead.count; graphs: outside the stages, + replays)")
    print(f"full model: {count(full, str(x.device))['kernel_ops']:.0f}")
    for name, predictor in predictors.items():
        if predictor is None:
            continue
        graphed = mw.EarlyExit(predictor.model, predictor.thresholds, cuda_graphs=True)
        graphed(x)
        graphed(x)  # every graph this batch needs is made
        replays = [0]
        for kept in graphed._graphs.graphs.values():
            for graph in kept:
                written = graph.run()

                def replay(written=written) -> list:
                    replays[0] += 1
                    return list(written)
                graph.run = replay
        eager = count(lambda: predictor(x), str(x.device))["kernel_ops"]
        outside = count(lambda: graphed(x), str(x.device))["kernel_ops"]
        print(f"{name}: {eager:.0f}; cuda_graphs=True: {outside:.0f} + {replays[0] // 4} replays")


if __name__ == "__main__":
    main()
