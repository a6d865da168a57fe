"""The cost of the meta step: every variant of a training iteration as a ratio to the user's own
loop (no weighter at all), in wall time, peak memory, leaf ATen ops and host reads, and the
relative error of each backend's gamma gradient against `higher`.

    python benchmarks/overhead.py                      # CIFAR MSDNet (8 exits) and BranchyNet, batch 64
    python benchmarks/overhead.py --models msdnet --rounds 5 --out runs/overhead.json
    python benchmarks/overhead.py --models msdnet --counts-only   # the profiler counts alone (exact, quick)
    python benchmarks/overhead.py --models branchynet --variants "weighting uw" "weighting famo"   # the weightings
    python benchmarks/overhead.py --models msdnet-host --batch-size 1 --rounds 15 --no-memory --no-errors \
        --variants "own loop" "step, learn=False" jvp fast   # host time: the CPU's stand-in for a GPU
    python benchmarks/overhead.py --models msdnet --variants "own loop, fused SGD" "fast, capturable" \
        "own loop, fused SGD, CUDA graph" "fast, capturable, CUDA graph"   # capturable=True (graphs: CUDA only)

"own loop" is what a user writes without metaweight: ``sum(cross_entropy(o, y) for o in
model(x))``, backward, ``optimizer.step()``; every ratio is to it. The other variants use
DenseDistillLoss and BalancedValidation: "two-call, fixed weights" is ``w.loss(model(x), y)`` with
``learn=False`` and the user's own backward and step; "step, learn=False" is ``w.step()`` with
nothing to learn; the rest are ``w.step()`` with a meta step.

Timing: every variant runs one unit of 4 iterations per round, round-robin, so machine noise hits
all alike; the median over rounds is reported (``--statistic min``: the fastest round). Memory: each
variant runs in a fresh subprocess; the allocator's peak over its value after set-up (activations, temporaries and the optimizer's
state; the model excluded): on CUDA ``max_memory_allocated``, on CPU the bytes glibc's malloc has
handed out (``mallinfo2``, sampled every ms); on CPU also the peak resident set ("rss x"), which
keeps what malloc freed without returning it to the system. Counts, from ``torch.profiler`` over 4 iterations after 2 of warm-up, per iteration:
leaf ATen ops (``aten::`` ops with no ``aten::`` op below them: what would launch a kernel) and
host reads (``aten::_local_scalar_dense``: ``.item()``, ``float(t)``, ``bool(t)``), on any device;
on CUDA also the GPU kernel time, kernel launches and host synchronisations
(``cuda*Synchronize`` calls). Counts do not depend on the machine's load; wall times do.

"msdnet-host" is the CIFAR MSDNet's module tree (770 modules, 418 parameter tensors, 8 exits) at widths
where the arithmetic is negligible (stem 2 channels, growth rate 2, heads 4 wide: 75 k parameters), its
validation batch the size of the training batch: at batch 1 what its wall time measures is host time
(Python and the dispatch of each ATen op), which is what a launch-bound GPU waits on. Its ratios are the
CPU's stand-in for the GPU's wall-time ratios on the reference model.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import metaweight as mw  # noqa: E402
from branchynet import branchynet  # noqa: E402
from msdnet import msdnet_cifar  # noqa: E402

UNIT = 4  # iterations per timed unit (so that "meta every 4" is timed fairly)


def build(model_name: str, device: str):
    torch.manual_seed(0)
    if model_name in ("msdnet", "msdnet-host"):
        model = msdnet_cifar(100, 8) if model_name == "msdnet" else \
            msdnet_cifar(100, 8, channels=2, growth_rate=2, head_width=4)
        last = lambda n: n.startswith(("classifiers.", "blocks.7."))  # noqa: E731
    else:
        model = branchynet(100, 3, num_exits=4, width=32)
        last = lambda n: n.startswith(("heads.", "stages.3."))  # noqa: E731
    return model.to(device), last


# name -> (options, validation batch size). Options go to HarmonizedWeighter, except "loop": "own"
# (the user's loop, no weighter), "two-call" (w.loss + the user's own backward and step) or "step"
# (w.step(), the default), and "lookahead" (look-ahead on the heads and the last block).
VARIANTS = {
    "own loop": ({"loop": "own"}, 64),
    "two-call, fixed weights": ({"loop": "two-call", "learn": False}, 64),
    "step, learn=False": ({"learn": False}, 64),
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
    # capturable=True (the fast mode's step with its decisions on the device) needs a fused SGD: beside it,
    # the user's loop with that optimizer; on CUDA both also captured whole in a CUDA graph and replayed
    "own loop, fused SGD": ({"loop": "own", "fused": True}, 64),
    "fast, capturable": ({"mode": "fast", "capturable": True, "nonfinite": "skip", "fused": True,
                          "loop": "device"}, 64),
    "own loop, fused SGD, CUDA graph": ({"loop": "own", "fused": True, "graph": True}, 64),
    "fast, capturable, CUDA graph": ({"mode": "fast", "capturable": True, "nonfinite": "skip", "fused": True,
                                      "loop": "device", "graph": True}, 64),
}
CUDA_ONLY = {"own loop, fused SGD, CUDA graph", "fast, capturable, CUDA graph"}
BASELINE = "own loop"
# the other loss weightings (mw.WEIGHTINGS) on the same terms, each timed through its one-call step()
VARIANTS.update({f"weighting {w}": ({"weighting": w}, 64) for w in mw.WEIGHTINGS})


def make_optimizer(model, fused=False):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True,
                           fused=fused or None)


def make_weighting(model, optimizer, name, num_exits):
    """A loss weighting of mw.WEIGHTINGS with its defaults; GradNorm on the last conv of the first stage/block."""
    first = model.stages[0] if hasattr(model, "stages") else model.blocks[0]
    shared = [[m for m in first.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight]
    options = {"dwa": {"window": 20}, "gradnorm": {"shared_parameters": shared},
               "sdn": {"epochs": 100, "steps_per_epoch": 20}}.get(name, {})
    return mw.WEIGHTINGS[name](model, optimizer, mw.DenseDistillLoss(num_exits, 3.0), **options)


def make_weighter(model, optimizer, last, options, num_exits):
    if "weighting" in options:
        return make_weighting(model, optimizer, options["weighting"], num_exits)
    options = dict(options)
    if options.pop("lookahead", False):
        options["lookahead_params"] = last
    return mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(num_exits, 3.0),
                                 mw.BalancedValidation(num_exits), gamma_lr=0.01, **options)


def setup(model_name, device, batch_size, name):
    """A fresh model, optimizer and batches for one variant; returns its one-iteration function."""
    options, val_size = VARIANTS[name]
    options = dict(options)
    loop = options.pop("loop", "step")
    graph = options.pop("graph", False)
    model, last = build(model_name, device)
    optimizer = make_optimizer(model, fused=options.pop("fused", False))
    train, val = batches(device, batch_size, batch_size if model_name == "msdnet-host" else val_size)
    x, y = train
    # every iteration gets new label tensors, as from a data loader (a label check may be remembered
    # for the same tensor; a benchmark that reused one would not pay for it)
    if loop == "own":
        def own_loop():
            optimizer.zero_grad()
            labels = y.clone()
            loss = sum(F.cross_entropy(o, labels) for o in model(x))
            loss.backward()
            optimizer.step()
        return captured(own_loop, train, val) if graph else own_loop
    with torch.no_grad():
        k = len(model(x[:2]))
    w = make_weighter(model, optimizer, last, options, k)
    if loop == "two-call":
        def two_calls():
            loss = w.loss(model(x), y.clone())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return two_calls
    xv, yv = val
    if loop == "device":  # the step a CUDA graph replays: no read back to the host (its first call: the eager warm-up)
        device_step = lambda: w.device_step((x, y), (xv, yv))  # noqa: E731
        return captured(device_step, train, val) if graph else device_step
    return lambda: w.step((x, y.clone()), (xv, yv.clone()))


def captured(iterate, train, val):
    """``iterate`` captured whole in a CUDA graph, after three warm-up calls on a side stream (as
    torch.cuda.graphs asks); returns one iteration: new inputs copied into the captured ones (from
    tensors already on the GPU, as a prefetching loader gives them), then the replay."""
    fresh = [t.clone() for t in (*train, *val)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            iterate()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        iterate()

    def replay():
        for static, new in zip((*train, *val), fresh):
            static.copy_(new)
        graph.replay()
    # the graph writes into the memory of what ``iterate`` holds (the model, its optimizer, the weighter):
    # held as long as the replay is, or freed blocks that the graph still writes reach the next allocation
    replay.iterate = iterate  # type: ignore[attr-defined]
    return replay


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


def time_variants(model_name, device, batch_size, rounds, names, statistic="median"):
    setups = {}
    for name in names:
        iterate = setup(model_name, device, batch_size, name)
        for _ in range(2):  # warm-up: allocator, optimizer state
            iterate()
        setups[name] = iterate
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            iterate = setups[name]
            sync(device)
            start = time.perf_counter()
            for _ in range(UNIT):
                iterate()
            sync(device)
            times[name].append((time.perf_counter() - start) / UNIT)
    pick = statistics.median if statistic == "median" else min
    return {name: pick(t) for name, t in times.items()}


LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
            "cudaLaunchCooperativeKernel", "cudaGraphLaunch")


# ATen ops that only describe memory (views, allocations, metadata): no kernel runs for them on a GPU
METADATA_OPS = frozenset(f"aten::{name}" for name in (
    "empty", "empty_strided", "view", "_unsafe_view", "as_strided", "as_strided_", "_reshape_alias", "alias",
    "detach", "detach_", "unsqueeze", "squeeze", "expand", "t", "transpose", "permute", "slice", "select",
    "narrow", "split", "split_with_sizes", "unbind", "unflatten", "resize_", "set_", "is_same_size",
    "_has_same_storage_numel", "result_type", "resolve_conj", "resolve_neg", "_make_dual", "_unpack_dual",
    "lift_fresh", "_efficientzerotensor", "_conj", "_neg_view", "view_as_real", "view_as_complex", "to",
    # composites that only call the ops above (or, when they must copy, an op that does work, counted there)
    "empty_like", "new_empty", "new_empty_strided", "empty_permuted", "resize_as_", "reshape", "reshape_as",
    "flatten", "view_as", "expand_as", "broadcast_to", "contiguous", "type_as", "unfold", "squeeze_",
    "unsqueeze_", "chunk", "tensor_split", "movedim", "swapaxes", "transpose_", "t_", "diagonal",
    "_fw_primal", "_nnpack_available"))
HOST_READ = "metaweight::host_read"  # the library's one read of a step's values (a .cpu().tolist())


def count(iterate, device, iterations=UNIT, breakdown=False):
    """Per call of ``iterate``, from torch.profiler: leaf ATen ops (``aten::`` ops with no ``aten::``
    op below them); launch-equivalent ops (the leaf ops that would run a kernel on a GPU: leaf ops
    less :data:`METADATA_OPS`, and a multi-tensor ``_foreach_*`` op as one, since on a GPU it is one
    launch where the CPU loops over its tensors); host reads (``aten::_local_scalar_dense`` and the
    library's ``metaweight::host_read``); on CUDA also GPU kernel milliseconds, kernel launches and host
    synchronisations. ``breakdown``: also ``"by_op"``, the launch-equivalent ops per call by name, and on
    CUDA ``"by_kernel"``, the GPU kernels per call by name."""
    cuda = device.startswith("cuda")
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(iterations):
            iterate()
    sync(device)
    events = prof.events()
    below: dict[int, bool] = {}  # id(event) -> whether an aten:: op runs below it

    def aten_below(event) -> bool:
        key = id(event)
        if key not in below:
            below[key] = any(c.name.startswith("aten::") or aten_below(c) for c in event.cpu_children)
        return below[key]

    under_foreach: set[int] = set()

    def mark(event) -> None:
        for c in event.cpu_children:
            under_foreach.add(id(c))
            mark(c)

    multi = [e for e in events if e.name.startswith(("aten::_foreach_", "aten::_amp_foreach_", "aten::_fused_"))]
    for e in multi:
        mark(e)
    multi_ids = {id(e) for e in multi}
    working: dict[int, bool] = {}  # id(event) -> whether an aten:: op that is not metadata runs below it

    def work_below(event) -> bool:
        key = id(event)
        if key not in working:
            working[key] = any((c.name.startswith("aten::") and c.name not in METADATA_OPS) or work_below(c)
                               for c in event.cpu_children)
        return working[key]

    launching = [e for e in multi if id(e) not in under_foreach]
    # the lowest ops that do work: an op whose only ATen children describe memory (aten::mm below which only
    # aten::resolve_conj runs) launches its own kernel
    launching += [e for e in events if e.name.startswith("aten::") and e.name not in METADATA_OPS
                  and not work_below(e) and id(e) not in under_foreach and id(e) not in multi_ids]
    launches = len(launching)
    counts = {"leaf_ops": sum(e.name.startswith("aten::") and not aten_below(e) for e in events) / iterations,
              "kernel_ops": launches / iterations,
              # (CPU events only: with CUDA activity a record_function range is also a GPU annotation of its name)
              "host_reads": sum(e.name in ("aten::_local_scalar_dense", HOST_READ)
                                and e.device_type == torch.autograd.DeviceType.CPU for e in events) / iterations}
    if cuda:
        on_gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = [e for e in on_gpu if not e.name.startswith(("Memcpy", "Memset"))]
        counts["kernel_ms"] = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / iterations
        counts["launches"] = sum(e.name in LAUNCHES for e in events) / iterations
        counts["syncs"] = sum(e.name.startswith("cu") and "Synchronize" in e.name for e in events) / iterations
        if breakdown:
            counts["by_kernel"] = {k: v / iterations for k, v in Counter(e.name for e in kernels).items()}
    if breakdown:
        counts["by_op"] = {k: v / iterations for k, v in Counter(e.name for e in launching).items()}
    return counts


def profile_counts(model_name, device, batch_size, name, breakdown=False):
    """:func:`count` over UNIT iterations of a variant, after 2 of warm-up."""
    iterate = setup(model_name, device, batch_size, name)
    for _ in range(2):
        iterate()
    return count(iterate, device, breakdown=breakdown)


def print_breakdown(counts, top):
    """Per variant, the ``top`` ops (and on CUDA kernels) it runs more often per iteration than the baseline."""
    base = counts[BASELINE]
    for name, c in counts.items():
        if name == BASELINE:
            continue
        for key, what in (("by_op", "launch-equivalent ops"), ("by_kernel", "GPU kernels")):
            if key not in c:
                continue
            extra = {k: v - base[key].get(k, 0.0) for k, v in c[key].items()}
            extra = sorted(((v, k) for k, v in extra.items() if v > 0), reverse=True)[:top]
            print(f"{name!r}: {what} beyond {BASELINE!r} ({sum(c[key].values()) - sum(base[key].values()):+.0f} "
                  f"per iteration in all), the {len(extra)} largest:")
            for v, k in extra:
                print(f"  {v:8.1f}  {k[:110]}")


def peak_memory_child(model_name, device, batch_size, name):
    """Run in a subprocess: peak memory of UNIT iterations over the post-set-up baseline, in MiB, as
    ``{"allocated": ..., "rss": ...}``. CUDA: the caching allocator's bytes allocated
    (``max_memory_allocated``; rss None). CPU: the bytes malloc has handed out and not taken back
    (glibc's ``mallinfo2``: ``uordblks + hblkhd``, the CPU's counterpart of CUDA's allocated bytes;
    None without glibc) and the resident set (which also keeps what malloc freed but did not return
    to the system), both sampled every millisecond."""
    iterate = setup(model_name, device, batch_size, name)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(UNIT):
            iterate()
        torch.cuda.synchronize()
        return {"allocated": (torch.cuda.max_memory_allocated() - base) / 2**20, "rss": None}
    probes = {"rss": _rss, "allocated": _malloc_in_use()}
    probes = {k: f for k, f in probes.items() if f is not None}
    base = {k: f() for k, f in probes.items()}
    peak = dict(base)
    done = threading.Event()

    def sample():  # the peaks, sampled every millisecond
        while not done.is_set():
            for k, f in probes.items():
                peak[k] = max(peak[k], f())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for _ in range(UNIT):
        iterate()
    done.set()
    thread.join()
    return {k: (max(peak[k], probes[k]()) - base[k]) / 2**20 if k in probes else None for k in ("allocated", "rss")}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_in_use():
    """A function giving the bytes glibc's malloc has handed out (``mallinfo2``), or None elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        info = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    info.restype = MallInfo2

    def in_use() -> int:
        m = info()
        return m.uordblks + m.hblkhd
    return in_use


def gamma_grad_errors(model_name, device, batch_size):
    """Relative error of gamma's gradient: each backend against higher in float64 (the maths), and every
    backend in float32 against float64 higher (what rounding does to this model's meta-gradient)."""
    grads = {}
    for dtype in (torch.float64, torch.float32):
        for backend in ("higher", "jvp", "finite_difference"):
            model, last = build(model_name, device)
            model = model.to(dtype)
            k = len(model(torch.zeros(2, 3, 32, 32, device=device, dtype=dtype)))
            w = make_weighter(model, make_optimizer(model), last, {"backend": backend}, k)
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
    p.add_argument("--models", nargs="+", default=["msdnet", "branchynet"],
                   choices=["msdnet", "branchynet", "msdnet-host"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--statistic", choices=["median", "min"], default="median",
                   help="of each variant's rounds: the median, or the minimum (on a machine whose speed drifts between "
                        "rounds, the fastest round of each variant is the one least slowed)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--counts-only", action="store_true", help="only the profiler counts: no timing, memory or "
                                                               "gamma-gradient errors")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs (a fresh process per variant)")
    p.add_argument("--breakdown", type=int, default=0, metavar="N", help="print, per variant, the N ops (on CUDA "
                   "also kernels) it runs more often than the user's loop")
    p.add_argument("--no-errors", action="store_true", help="skip the gamma-gradient errors against float64 higher "
                   "(slow on a GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--memory-child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):  # fp32, as issue 20 measured: no TF32 in convolutions or matrix products
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if args.memory_child:
        print(json.dumps(peak_memory_child(args.memory_child[0], args.device, args.batch_size, args.memory_child[1])))
        return
    names = [BASELINE] + [v for v in args.variants if v != BASELINE and (v not in CUDA_ONLY or
                                                                          args.device.startswith("cuda"))]
    report = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "batch_size": args.batch_size,
              "rounds": args.rounds, "statistic": args.statistic, "baseline": BASELINE, "models": {},
              "metaweight": str(Path(mw.__file__).parent)}
    # (which checkout is measured: run from another one, the installed package is imported unless PYTHONPATH names it)
    print(f"metaweight from {report['metaweight']}", flush=True)
    for model_name in args.models:
        print(f"\n== {model_name}, batch {args.batch_size}, {args.device}, {torch.get_num_threads()} threads; "
              f"ratios to {BASELINE!r} ==", flush=True)
        counts = {}
        for name in names:  # each printed as taken: a run stopped later keeps them
            counts[name] = profile_counts(model_name, args.device, args.batch_size, name, breakdown=bool(args.breakdown))
            print(f"counts {name!r}: " + ", ".join(f"{k} {v:.1f}" for k, v in counts[name].items()
                                                  if not isinstance(v, dict)), flush=True)
        if args.breakdown:
            print_breakdown(counts, args.breakdown)
        rows = {name: dict(counts[name]) for name in names}
        base = counts[BASELINE]
        for name in names:
            rows[name]["ops_ratio"] = counts[name]["leaf_ops"] / base["leaf_ops"]
            rows[name]["kernel_ops_ratio"] = counts[name]["kernel_ops"] / base["kernel_ops"]
        if not args.counts_only:
            times = time_variants(model_name, args.device, args.batch_size, args.rounds, names, args.statistic)
            print(f"{args.statistic}s, s/iter: " + ", ".join(f"{n!r} {t:.4f}" for n, t in times.items()), flush=True)
            for name in names:
                if name in CUDA_ONLY or args.no_memory:  # (a graph's memory pool is allocated at capture: not comparable)
                    rows[name].update(peak_mib=float("nan"), peak_rss_mib=None, seconds_per_iteration=times[name])
                    continue
                out = subprocess.run([sys.executable, __file__, "--memory-child", model_name, name, "--device",
                                      args.device, "--batch-size", str(args.batch_size), "--threads",
                                      str(args.threads)], capture_output=True, text=True, check=True)
                peaks = json.loads(out.stdout.strip().splitlines()[-1])
                rows[name]["peak_mib"] = peaks["allocated"] if peaks["allocated"] is not None else peaks["rss"]
                rows[name]["peak_rss_mib"] = peaks["rss"]
                rows[name]["seconds_per_iteration"] = times[name]
            for name in names:
                rows[name]["time_ratio"] = times[name] / times[BASELINE]
                rows[name]["memory_ratio"] = rows[name]["peak_mib"] / rows[BASELINE]["peak_mib"]
                if rows[name]["peak_rss_mib"] is not None:
                    rows[name]["rss_ratio"] = rows[name]["peak_rss_mib"] / rows[BASELINE]["peak_rss_mib"]
        columns = [] if args.counts_only else [("s/iter", "seconds_per_iteration", "{:.3f}"),
                                               ("time x", "time_ratio", "{:.2f}"), ("peak MiB", "peak_mib", "{:.0f}"),
                                               ("mem x", "memory_ratio", "{:.2f}")]
        if not args.counts_only and rows[BASELINE].get("rss_ratio") is not None:
            columns += [("rss x", "rss_ratio", "{:.2f}")]
        columns += [("ops/iter", "leaf_ops", "{:.0f}"), ("ops x", "ops_ratio", "{:.2f}"),
                    ("kops/iter", "kernel_ops", "{:.0f}"), ("kops x", "kernel_ops_ratio", "{:.2f}"),
                    ("reads/iter", "host_reads", "{:.1f}")]
        if "kernel_ms" in base:
            columns += [("kernel ms", "kernel_ms", "{:.1f}"), ("launches", "launches", "{:.0f}"),
                        ("syncs", "syncs", "{:.1f}")]
        print(f"{'variant':40s} " + " ".join(f"{title:>10s}" for title, _, _ in columns))
        for name in names:
            print(f"{name:40s} " + " ".join(f"{form.format(rows[name][key]):>10s}" for _, key, form in columns),
                  flush=True)
        report["models"][model_name] = {"variants": rows}
        if not args.counts_only and not args.no_errors:
            errors = gamma_grad_errors(model_name, args.device, args.batch_size)
            print("gamma-gradient relative error against float64 higher: "
                  + ", ".join(f"{b} {e:.1e}" for b, e in errors.items()))
            report["models"][model_name]["gamma_grad_rel_error_vs_higher"] = errors
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
