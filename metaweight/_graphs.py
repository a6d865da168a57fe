"""CUDA graphs of an early-exit model's stages: each stage with its exit head captured once per
shape of what it takes (the samples still in padded to a power of two), then replayed.

On a GPU a model of many small layers is bound by kernel launches: a stage run on fewer samples
launches as many kernels as on the whole batch, so early exit saves little time there however few
samples go on. Replaying a captured stage is one launch (``torch.cuda.graphs``). What a stage
takes changes size from call to call (how many samples are still in), and a graph is fixed in
its shapes; so the samples still in are padded to the next power of two and each stage keeps a
graph per padded size: at most ``log2(N) + 1`` graphs per stage for batches up to ``N``.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metaweight._anytime import same_mapping


# values a graph may hold as captured: what the stage's Python saw at capture, equal at every replay
_CONSTANTS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout,
              torch.memory_format, enum.Enum)


def _flatten(value: Any, leaves: list[Any], path: str) -> Any:
    """The structure of ``value`` (hashable, compared between calls) and its leaves appended to
    ``leaves``, walked as EarlyExit selects samples: tensors, and tuples, lists (namedtuples too) and
    mappings of them (a dict subclass keeps its type), with numbers, strings, ``None``, dtypes and
    devices as values fixed at capture; anything else is refused (a graph would replay what it held
    at capture)."""
    if isinstance(value, Tensor):
        leaves.append(value)
        return "tensor"
    if isinstance(value, Mapping):
        return (type(value), tuple(value.keys()),
                tuple(_flatten(v, leaves, f"{path}[{k!r}]") for k, v in value.items()))
    if isinstance(value, (list, tuple)) and not getattr(value, "__dict__", None):  # (a subclass's attributes: refused)
        return (type(value), len(value), tuple(_flatten(v, leaves, f"{path}[{i}]") for i, v in enumerate(value)))
    if isinstance(value, _CONSTANTS):
        leaves.append(value)
        return "value"
    raise TypeError(f"EarlyExit(cuda_graphs=True): {path} is a `{type(value).__name__}`, which a CUDA graph cannot "
                    f"take in or give out: it replays the tensors it captured and the Python values it saw then. "
                    f"Pass tensors between stages, in tuples, lists or dicts, with numbers, strings or None beside "
                    f"them, or use cuda_graphs=False.")


def _unflatten(spec: Any, leaves: Any, template: Any) -> Any:
    """``template``'s structure (``spec``) with the next values of the iterator ``leaves``."""
    if spec in ("tensor", "value"):
        return next(leaves)
    kind, _, children = spec
    if isinstance(template, Mapping):
        return same_mapping(template, {k: _unflatten(c, leaves, v) for (k, v), c in zip(template.items(), children)})
    items = [_unflatten(c, leaves, v) for v, c in zip(template, children)]
    if kind in (list, tuple):
        return kind(items)
    return kind(*items) if hasattr(template, "_fields") else kind(items)


def _flatten_call(args: tuple[Any, ...], kwargs: dict[str, Any], k: int) -> tuple[list[Any], Any]:
    """What stage ``k`` takes, flattened, each value named by where it is."""
    leaves: list[Any] = []
    spec = (tuple, 2, ((tuple, len(args), tuple(_flatten(a, leaves, f"stage {k + 1}'s argument {i + 1}")
                                               for i, a in enumerate(args))),
                       (dict, tuple(kwargs), tuple(_flatten(v, leaves, f"stage {k + 1}'s argument {name!r}")
                                                   for name, v in kwargs.items()))))
    return leaves, spec


def _flatten_output(output: tuple[Any, Tensor], k: int) -> tuple[list[Any], Any]:
    """What stage ``k`` and head ``k`` give, flattened, each value named by where it is."""
    leaves: list[Any] = []
    spec = (tuple, 2, (_flatten(output[0], leaves, f"stage {k + 1}'s features"),
                       _flatten(output[1], leaves, f"exit {k + 1}'s logits")))
    return leaves, spec


def padded_size(n: int) -> int:
    """The size ``n`` samples are padded to: the next power of two (``n`` itself if it is one)."""
    return 1 << max(n - 1, 0).bit_length()


def _contents(modules: tuple[nn.Module, ...]) -> tuple[list[nn.Module], list[Tensor]]:
    """The modules a captured graph runs, and the parameters and buffers it reads, in order."""
    return [x for m in modules for x in m.modules()], [t for m in modules for t in (*m.parameters(), *m.buffers())]


def _held(modules: list[nn.Module]) -> list[Any]:
    """What each module holds under each name (submodules, parameters, buffers), read from its dicts:
    a replacement written into them directly (``module._parameters[name] = ...``, as accelerate does)
    shows here as well as one through ``setattr`` or ``load_state_dict(..., assign=True)``."""
    held: list[Any] = []
    for m in modules:
        d = m.__dict__
        held.append(tuple(d["_modules"].items()))
        held.append(tuple(d["_parameters"].items()))
        held.append(tuple(d["_buffers"].items()))
    return held


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(len(x) == len(y) and all(kx == ky and vx is vy for (kx, vx), (ky, vy) in zip(x, y))
                                    for x, y in zip(a, b))


def _context() -> tuple[Any, ...]:
    """What a capture fixes beside the tensors: autocast (on and its dtype, per device type) and
    inference mode (its tensors cannot be written outside it)."""
    return (torch.is_inference_mode_enabled(),
            *((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cuda", "cpu")))


@dataclass
class _Graph:
    """One stage and head captured for one structure and padded size of what the stage takes."""

    modules: tuple[nn.Module, ...]
    submodules: list[nn.Module]  # the modules' submodules at capture
    tensors: list[Tensor]  # their parameters and buffers at capture
    pointers: list[int]  # where each of ``tensors`` lives (moved or cast: elsewhere)
    held: list[Any]  # what each submodule holds under each name at capture (see _held)
    context: tuple[Any, ...]  # autocast and inference mode at capture
    spec: Any  # the structure of (args, kwargs)
    signature: tuple[Any, ...]  # per leaf: (True, shape[1:], dtype, device) per sample, (False, shape, ...) else
    static: tuple[Any, ...]  # the leaves the graph takes: the values as captured, the tensors' buffers
    size: int  # the number of samples the graph runs: padded, or those of the call
    padded: bool  # whether calls with fewer samples are padded to ``size`` (all but stage 1)
    per_sample_out: list[bool]
    out_spec: Any
    out_template: Any  # what the stage and head gave at capture (the types of its mappings and tuples)
    passed: list[tuple[int, int]]  # (output leaf, input leaf): a tensor the stage gives back as it took it
    graph: Any  # torch.cuda.CUDAGraph, or None where nothing is captured (not CUDA)
    run: Callable[[], Any]
    written: list[int]  # the leaves the stage writes in place: written back into the call's tensors at a replay

    def current(self) -> bool:
        """Whether the modules still hold the submodules the graph ran and the tensors it reads,
        where they were: the same objects under the same names in every submodule's dicts, at the
        same addresses (a ``.to()``, a cast or ``.data =`` moves them)."""
        return _same(_held(self.submodules), self.held) and _pointers(self.tensors) == self.pointers

    def rows(self, leaves: list[Any], fixed: Callable[[Tensor], bool]) -> int | None:
        """How many samples ``leaves`` (a call's, flattened as this graph's) hold, if this graph
        takes them: each per-sample tensor with the same number of rows, padding to this graph's
        size, every other leaf as captured; else ``None``."""
        rows = None
        for leaf, sig, constant in zip(leaves, self.signature, self.static):
            if sig is None:
                if isinstance(leaf, Tensor) or _differs(leaf, constant):
                    return None
                continue
            per_sample, shape, dtype, device = sig
            if not isinstance(leaf, Tensor) or leaf.dtype != dtype or leaf.device != device:
                return None
            if per_sample:
                if leaf.dim() == 0 or leaf.shape[1:] != shape or isinstance(leaf, nn.Parameter) or fixed(leaf):
                    return None
                if rows is None:
                    rows = leaf.shape[0]
                elif leaf.shape[0] != rows:
                    return None
            elif leaf.shape != shape:
                return None
        if rows is None or (padded_size(rows) if self.padded else rows) != self.size:
            return None
        return rows


class StageGraphs:
    """The graphs of one :class:`EarlyExit`'s stages, captured as calls need them.

    ``run(k, stage, head, args, kwargs, size, fixed, check)`` gives what ``head(stage(*args,
    **kwargs))`` gives (the features and exit ``k``'s logits, each per-sample tensor with the
    call's rows): from a graph captured for the structure of the arguments and the padded number
    of samples, replayed; where there is none yet, from the stage run eagerly on the arguments as
    they are (this call's answer, checked by ``check``), after which the graph is captured for the
    next calls. On a device that is not CUDA nothing is captured: the stage runs eagerly on the
    padded tensors, which is what the graph would compute (the tests check the padding on the CPU).
    """

    def __init__(self) -> None:
        self.graphs: dict[int, list[_Graph]] = {}

    def clear(self) -> None:
        """Drop every graph (and the memory it holds)."""
        self.graphs.clear()

    def run(self, k: int, stage: nn.Module, head: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
            size: int | None, fixed: Callable[[Tensor], bool], check: Callable[[Tensor], Any]) -> tuple[Any, Tensor]:
        """Stage ``k`` and head ``k`` on ``(args, kwargs)``: ``size`` is the number of samples in the
        network (``None`` at stage 1, where exit 1's rows say it); ``fixed(t)`` whether a tensor is
        passed on whatever its first dimension (not per sample); ``check(logits)`` refuses logits
        of other rows than the samples (before anything is captured)."""
        if size == 0:  # no sample in: nothing to pad or capture (a padded row would be made up)
            features, logits = _stage_head(stage, head, args, kwargs)
            check(logits)
            return features, logits
        leaves, spec = _flatten_call(args, kwargs, k)
        modules = (stage, head)
        context = _context()
        kept = self.graphs.setdefault(k, [])
        for i, graph in enumerate(kept):
            if graph.spec != spec or graph.modules[0] is not stage or graph.modules[1] is not head or \
                    graph.context != context:
                continue
            rows = graph.rows(leaves, fixed)
            if rows is None or (size is not None and rows != size):
                continue
            if not graph.current():  # the modules' tensors were replaced or moved: capture again
                del kept[i]
                break
            return self._replay(graph, leaves, rows, check)
        features, logits = _stage_head(stage, head, args, kwargs)
        contents = _contents(modules)  # (after the run: a lazy module makes its parameters in its first call)
        check(logits)
        rows = logits.shape[0] if size is None else size
        made = self._capture(modules, contents, context, (args, kwargs), leaves, spec, rows, fixed, (features, logits), k)
        if len(kept) >= _LIMIT:  # (a structure that changes at every call: the oldest graph goes)
            del kept[0]
        kept.append(made)
        return features, logits

    @staticmethod
    def _replay(graph: _Graph, leaves: list[Any], rows: int, check: Callable[[Tensor], Any]) -> tuple[Any, Tensor]:
        for leaf, sig, target in zip(leaves, graph.signature, graph.static):
            if sig is None:
                continue
            (target[:rows] if sig[0] else target).copy_(leaf)
        outputs = list(graph.run())  # (a copy: the graph's own list is not the call's)
        for j in graph.written:  # the stage wrote what it took in place: so does the call, as without graphs
            target = graph.static[j]
            leaves[j].copy_(target[:rows] if graph.signature[j][0] else target)
        if rows != graph.size:
            outputs = [o[:rows] if per_sample else o for o, per_sample in zip(outputs, graph.per_sample_out)]
        for i, j in graph.passed:  # a tensor the stage passes on is the one the call gave it (EarlyExit tells
            outputs[i] = leaves[j]  # tensors passed on unchanged by what they are), not the graph's copy
        features, logits = _unflatten(graph.out_spec, iter(outputs), graph.out_template)
        check(logits)
        return features, logits

    @staticmethod
    def _capture(modules: tuple[nn.Module, ...], contents: tuple[list[nn.Module], list[Tensor]], context: tuple[Any, ...],
                 call: tuple[Any, ...], leaves: list[Any], spec: Any, rows: int, fixed: Callable[[Tensor], bool],
                 eager: tuple[Any, Tensor], k: int) -> _Graph:
        padded = k > 0
        size = padded_size(rows) if padded else rows
        signature: list[Any] = []
        inputs: list[Tensor] = []
        static: list[Any] = []
        for leaf in leaves:
            if not isinstance(leaf, Tensor):
                signature.append(None)
                static.append(leaf)
                continue
            per_sample = leaf.dim() > 0 and leaf.shape[0] == rows and not isinstance(leaf, nn.Parameter) and \
                not fixed(leaf)
            signature.append((per_sample, leaf.shape[1:] if per_sample else leaf.shape, leaf.dtype, leaf.device))
            if per_sample and size > rows:
                buffer = leaf.new_empty((size, *leaf.shape[1:]))
                buffer[:rows].copy_(leaf)
                # the padded rows hold a real sample (zeros need not be a valid input: a length of 0, an index -1)
                buffer[rows:].copy_(leaf[:1].expand(size - rows, *leaf.shape[1:]))
            else:  # (in the call's own layout: a stage may read it)
                buffer = leaf.detach().clone()
            inputs.append(buffer)
            static.append(buffer)
        args, kwargs = _unflatten(spec, iter(static), call)
        eager_leaves, eager_spec = _flatten_output(eager, k)
        before = [_stamp(b) if sig is not None else None for b, sig in zip(static, signature)]
        submodules, tensors = contents
        device = _capture_device([*inputs, *tensors])
        graph = None
        if device is not None:
            elsewhere = [t for t in [*inputs, *(e for e in eager_leaves if isinstance(e, Tensor))] if t.device != device]
            if elsewhere:
                raise ValueError(f"EarlyExit(cuda_graphs=True): stage {k + 1} runs on {device} and takes or gives a "
                                 f"tensor on {elsewhere[0].device} (shape {tuple(elsewhere[0].shape)}): a CUDA graph "
                                 f"replays only the work on its GPU. Keep the inputs and the features on the model's "
                                 f"device, or use cuda_graphs=False.")
            warm, captured, graph = _cuda_graph(device, lambda: _stage_head(*modules, args, kwargs), k)
            written = _written(static, before)
            outputs, out_spec = _flatten_output(captured, k)
            run = _replayer(graph, outputs)
        else:  # nothing to capture: the stage runs on the padded tensors at every call
            warm = captured = _stage_head(*modules, args, kwargs)
            written = _written(static, before)
            outputs, out_spec = _flatten_output(warm, k)

            def run() -> list[Any]:
                return _flatten_output(_stage_head(*modules, args, kwargs), k)[0]
        padded_leaves, padded_spec = _flatten_output(warm, k)
        now, then = (f"for {size} samples (padded)", f"for {rows}") if size != rows else \
            ("run again on a copy of its inputs", "on the inputs themselves")
        if not eager_spec == padded_spec == out_spec:
            _refuse_different(k, f"another structure {now} than {then}")
        for i, (e, p) in enumerate(zip(eager_leaves, padded_leaves)):
            if not isinstance(e, Tensor) and (isinstance(p, Tensor) or _differs(p, e)):
                _refuse_different(k, f"{p!r} {now} where it gave {e!r} {then} (value {i + 1} of its output)")
        probe_leaves: list[Any] | None = None
        if padded and rows == size and rows > 1:  # every output of `size` rows looks per sample: run on one fewer
            fewer = [b[:rows - 1] if sig is not None and sig[0] else b for b, sig in zip(static, signature)]
            probe_leaves, probe_spec = _flatten_output(_stage_head(*modules, *_unflatten(spec, iter(fewer), call)), k)
            if probe_spec != eager_spec:
                _refuse_different(k, f"another structure for {rows - 1} samples than for {rows}")
        # a tensor the stage took whole (not per sample) and gives back as it is: the call's own at a replay
        whole = {id(t): j for j, (t, sig) in enumerate(zip(static, signature)) if sig is not None and not sig[0]}
        passed = [(i, whole[id(o)]) for i, o in enumerate(outputs) if isinstance(o, Tensor) and id(o) in whole]
        per_sample_out = [isinstance(p, Tensor) and isinstance(e, Tensor) and p.dim() > 0 and e.dim() > 0 and
                          p.shape[0] == size and e.shape[0] == rows and p.shape[1:] == e.shape[1:] and
                          not isinstance(o, nn.Parameter) and id(o) not in whole and
                          (probe_leaves is None or isinstance(q, Tensor) and q.dim() > 0 and q.shape[0] == rows - 1)
                          for p, e, o, q in zip(padded_leaves, eager_leaves, outputs,
                                                probe_leaves if probe_leaves is not None else outputs)]
        return _Graph(modules, submodules, tensors, _pointers(tensors), _held(submodules), context, spec,
                      tuple(signature), tuple(static), size, padded, per_sample_out, out_spec, captured, passed, graph,
                      run, written)


_LIMIT = 32  # graphs kept per stage: log2(N) + 1 padded sizes for one structure, times a few structures


def _differs(leaf: Any, constant: Any) -> bool:
    try:
        if type(leaf) is not type(constant):
            return True
        if isinstance(leaf, (float, complex)) and leaf != leaf and constant != constant:
            return False  # NaN, as captured
        return bool(leaf != constant)
    except Exception:
        return True


def _refuse_different(k: int, what: str) -> None:
    raise ValueError(f"EarlyExit(cuda_graphs=True): stage {k + 1} or head {k + 1} gave {what}: a captured stage "
                     f"replays what it gave at capture, so beside its tensors it must give the same whatever the "
                     f"number of samples or the layout of its inputs. Use cuda_graphs=False for this model.")


def _pointers(tensors: list[Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _capture_device(tensors: list[Tensor]) -> torch.device | None:
    """The GPU where a stage's graph is captured: that of its first CUDA tensor (None: not captured)."""
    return next((t.device for t in tensors if t.is_cuda), None)


def _cuda_graph(device: torch.device, run: Callable[[], Any], k: int) -> tuple[Any, Any, Any]:
    """``run()`` captured in a CUDA graph on ``device``, after three warm-up runs, as
    ``torch.cuda.graphs`` asks: what the warm-up gave, what the capture gave (the tensors every
    replay writes) and the graph (``replay()``). The warm-up and the capture run on one side stream
    per device (torch.cuda.graph's own default stream is made once per process, on the device
    current then; a library's per-stream state, such as cuBLAS's workspace, is then made by the
    warm-up, outside the graph's memory pool), and under autocast without its cache of cast
    weights (a capture would read casts that autocast frees when its region ends;
    ``torch.cuda.make_graphed_callables`` refuses the cache). A capture that fails puts the
    thread's stream back."""
    with torch.cuda.device(device), _no_autocast_cache():
        stream = _capture_stream(device)
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for _ in range(3):
                warm = run()
        current.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream):
                captured = run()
        except RuntimeError as error:
            torch.cuda.set_stream(current)  # (torch.cuda.graph leaves its stream current when the capture fails)
            cause = f"{error} (raised during the capture: {error.__context__})" if error.__context__ else f"{error}"
            raise RuntimeError(f"EarlyExit(cuda_graphs=True) could not capture stage {k + 1} in a CUDA graph: "
                               f"{cause}. A captured stage may not read a value back to the host (.item(), "
                               f".tolist(), a Python branch on a tensor, boolean indexing) nor synchronise; if "
                               f"that is the cause, use cuda_graphs=False for this model.") from error
    return warm, captured, graph


_streams: dict[torch.device, Any] = {}


def _capture_stream(device: torch.device) -> Any:
    """One side stream per device for every warm-up and capture."""
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def _no_autocast_cache() -> Any:
    """Autocast as it is, without its cache of cast weights (see :func:`_cuda_graph`)."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def _stamp(tensor: Tensor) -> Any:
    """What tells whether ``tensor`` is written in place: its version counter, or (an inference
    tensor has none) a copy of its values."""
    try:
        return tensor._version
    except RuntimeError:
        return tensor.clone()


def _written(static: list[Any], before: list[Any]) -> list[int]:
    """The leaves (tensors the graph takes) written in place since ``before`` was stamped."""
    return [j for j, (t, b) in enumerate(zip(static, before))
            if b is not None and (t._version != b if isinstance(b, int) else not torch.equal(t, b))]


def _replayer(graph: Any, outputs: list[Any]) -> Callable[[], list[Any]]:
    def run() -> list[Any]:
        graph.replay()
        return outputs
    return run


def _stage_head(stage: nn.Module, head: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Tensor]:
    features = stage(*args, **kwargs)
    return features, head(features)
