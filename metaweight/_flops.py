"""Cost of reaching each exit, measured with PyTorch's own FLOP counting rules.

We run one forward under a dispatch mode that counts every op with the formulas of
``torch.utils.flop_counter`` (matrix multiplications, convolutions, fused attention; a
multiply-add counts as 2 FLOPs there), and ours for the kernels it has none for (attention on
CPU, recurrent layers, bilinear forms), and remembers, for every tensor, which ops and which
parameters it depends on. The cost of exit ``k`` is then the union of what exits ``1..k`` depend
on: the shared trunk is counted once, each head on its own, and nothing about the model's
structure is assumed. An op that ran with no formula and that is not known to be cheap
(pointwise, data movement, normalization, ...) is named in a warning: its work is left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from metaweight._checks import check_exit_outputs, check_flag, holds_meta, integer_value
from metaweight._modes import eval_mode, mha_fastpath_off
from metaweight._protocols import call_model
from metaweight._warn import warn_user


@dataclass
class ExitCosts:
    """What it costs to reach each exit, for one input sample.

    Attributes:
        macs: cumulative multiply-adds to reach exit ``k`` (every earlier exit evaluated on the
            way, as in early-exit inference), one entry per exit. ``flops`` is twice that.
        params: cumulative parameters used to reach exit ``k``.
        incremental_macs: the multiply-adds exit ``k`` adds to exit ``k-1``.
    """

    macs: list[int]
    params: list[int]
    incremental_macs: list[int]

    @property
    def flops(self) -> list[int]:
        """Cumulative FLOPs (2 per multiply-add, the convention of ``torch.utils.flop_counter``)."""
        return [2 * m for m in self.macs]

    def to_dict(self) -> dict[str, list[int]]:
        return {"macs": self.macs, "flops": self.flops, "params": self.params,
                "incremental_macs": self.incremental_macs}

    def __str__(self) -> str:
        rows = [f"{'exit':>4} {'MMACs':>10} {'params (M)':>11}"]
        for k, (m, p) in enumerate(zip(self.macs, self.params)):
            rows.append(f"{k + 1:>4} {m / 1e6:>10.2f} {p / 1e6:>11.3f}")
        return "\n".join(rows)


aten = torch.ops.aten


def _sdpa_flops(query: Tensor, key: Tensor, value: Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """torch's own formula for the fused attention ops it knows (QK^T and AV), for the variants
    it has none for (the CPU kernel, MPS, out-of-tree backends)."""
    return flop_registry[aten._scaled_dot_product_flash_attention](query, key, value, out_val=out_val)


def _mv_flops(mat: Tensor, vec: Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return 2 * mat.shape[0] * mat.shape[1]


def _addmv_flops(bias: Tensor, mat: Tensor, vec: Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return _mv_flops(mat, vec)


def _dot_flops(a: Tensor, b: Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return 2 * a.numel()


def _addmm_activation_flops(bias: Tensor, a: Tensor, b: Tensor, *args: Any, out_val: Any = None,
                            **kwargs: Any) -> int:
    return flop_registry[aten.mm](a, b, out_val=out_val)


def _int_mm_flops(a: Tensor, b: Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return flop_registry[aten.mm](a, b, out_val=out_val)


def _cdist_flops(x1: Tensor, x2: Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    # one difference and one accumulation per (row of x1, row of x2, feature), like a matrix product
    return 2 * math.prod(x1.shape[:-1]) * x2.shape[-2] * x1.shape[-1]


def _trilinear_flops(i1: Tensor, i2: Tensor, i3: Tensor, expand1: list[int], expand2: list[int],
                     expand3: list[int], sumdim: list[int], unroll_dim: int = 1, *, out_val: Any = None,
                     **kwargs: Any) -> int:
    """``nn.Bilinear``'s kernel, as ATen computes it: ``i1 * i2`` summed over the dims ``i3`` lacks,
    then that times ``i3`` summed over the rest; each product costs its whole index space."""
    def sizes(t: Tensor, expand: list[int]) -> list[int]:
        shape = list(t.shape)
        for d in sorted(expand):
            shape.insert(d, 1)
        return shape

    s1, s2, s3 = sizes(i1, expand1), sizes(i2, expand2), sizes(i3, expand3)
    first = [max(a, b) for a, b in zip(s1, s2)]
    summed_first = {d for d in sumdim if s3[d] == 1 and d != unroll_dim}
    kept = [1 if d in summed_first else n for d, n in enumerate(first)]
    return 2 * (math.prod(first) + math.prod(max(a, b) for a, b in zip(kept, s3)))


def _rnn_flops(input: Tensor, weights: list[Tensor]) -> int:
    # every step of every layer and direction multiplies its input and its hidden state by the
    # gate matrices (and a projection): the gate nonlinearities are pointwise, not counted
    steps = input.numel() // input.shape[-1]  # time x batch, or the packed rows
    return 2 * steps * sum(w.numel() for w in weights if w.dim() == 2)


def _mkldnn_rnn_layer_flops(input: Tensor, w_ih: Tensor, w_hh: Tensor, *args: Any, out_val: Any = None,
                            **kwargs: Any) -> int:
    return _rnn_flops(input, [w_ih, w_hh])


def _cudnn_rnn_flops(input: Tensor, weights: list[Tensor], *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return _rnn_flops(input, weights)


def _lstm_mps_flops(input: Tensor, hx: list[Tensor], params: list[Tensor], *args: Any, out_val: Any = None,
                    **kwargs: Any) -> int:
    return _rnn_flops(input, params)


def _formulas() -> dict[Any, Any]:
    """FLOP formulas for ops ``torch.utils.flop_counter`` has none for (2 FLOPs per multiply-add,
    its convention), by op; an op this torch lacks is left out."""
    table = {
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_flops,
        "_scaled_dot_product_attention_math_for_mps": _sdpa_flops,
        "_scaled_dot_product_fused_attention_overrideable": _sdpa_flops,
        "mv": _mv_flops, "addmv": _addmv_flops, "dot": _dot_flops, "vdot": _dot_flops,
        "_addmm_activation": _addmm_activation_flops, "_int_mm": _int_mm_flops,
        "_cdist_forward": _cdist_flops, "_trilinear": _trilinear_flops,
        "mkldnn_rnn_layer": _mkldnn_rnn_layer_flops, "_cudnn_rnn": _cudnn_rnn_flops,
        "miopen_rnn": _cudnn_rnn_flops, "_lstm_mps": _lstm_mps_flops,
    }
    return {getattr(aten, name): f for name, f in table.items() if hasattr(aten, name)}


_FORMULAS = _formulas()

# ATen ops that do no multiply-adds worth counting, besides views and the ops tagged pointwise,
# reduction or random: data movement, factories, metadata, sorting, normalization, pooling,
# interpolation, softmax, embedding lookups, dropout, activations without the pointwise tag, an
# outer product (torch.outer is a pointwise mul), and the gate arithmetic of fused RNN cells
# (their matrix products are separate ops), the loss kernels (a gather or pointwise work and a
# reduction: a Hugging Face model given its labels computes its loss in the forward), and membership,
# complex construction, comparisons, diagonals and layout changes that carry no pointwise tag
# (an FFT or a pairwise distance is real work and warns). Names without
# the trailing underscore of in-place ops.
_CHEAP_OPS = frozenset("""
    _copy_from _copy_from_and_resize _to_copy copy clone cat stack _stack _unsafe_view contiguous
    index _index_put_impl index_put _unsafe_index _unsafe_index_put index_select index_add index_copy
    index_fill index_reduce gather scatter scatter_add scatter_reduce take put masked_fill masked_scatter
    masked_select where repeat repeat_interleave roll flip fliplr flipud rot90 tril triu diag_embed
    constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d
    replication_pad3d _pad_circular unsafe_split unsafe_split_with_sizes unsafe_chunk narrow_copy
    fill zero empty empty_like empty_strided empty_permuted zeros zeros_like ones ones_like full full_like
    new_empty new_empty_strided new_zeros new_ones new_full scalar_tensor arange linspace logspace eye
    detach alias lift lift_fresh lift_fresh_copy _local_scalar_dense item resize resize_as set
    _assert_async _assert_scalar _functional_assert_async _assert_tensor_metadata sym_constrain_range
    sym_constrain_range_for_size is_contiguous is_strides_like_format is_non_overlapping_and_dense size
    sym_size stride sym_stride storage_offset sym_storage_offset numel sym_numel dim
    nonzero nonzero_static argwhere _unique _unique2 unique_consecutive unique_dim sort topk kthvalue
    median nanmedian mode aminmax argsort msort searchsorted bucketize cumsum cumprod cummax cummin
    _cummax_helper _cummin_helper logcumsumexp histc bincount one_hot im2col col2im pixel_shuffle
    pixel_unshuffle channel_shuffle native_channel_shuffle _pack_padded_sequence _pad_packed_sequence
    _cudnn_rnn_flatten_weight isin complex polar allclose trace block_diag triu_indices tril_indices _to_sparse
    _to_dense _to_sparse_csr _to_sparse_csc _to_sparse_bsr _to_sparse_bsc _coalesce is_coalesced _nnz
    sparse_dim dense_dim _indices _values indices values crow_indices col_indices ccol_indices row_indices
    native_layer_norm native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training
    _native_batch_norm_legit_functional _batch_norm_with_update _batch_norm_no_update
    _batch_norm_with_update_functional cudnn_batch_norm miopen_batch_norm batch_norm_elemt
    batch_norm_stats batch_norm_gather_stats batch_norm_gather_stats_with_counts native_group_norm
    _fused_rms_norm _weight_norm_interface renorm _softmax _log_softmax _safe_softmax _masked_softmax
    max_pool1d max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices avg_pool1d avg_pool2d
    avg_pool3d adaptive_avg_pool1d _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool1d
    adaptive_max_pool2d adaptive_max_pool3d fractional_max_pool2d fractional_max_pool3d max_unpool2d
    max_unpool3d mkldnn_max_pool2d mkldnn_max_pool3d mkldnn_adaptive_avg_pool2d
    upsample_nearest1d upsample_nearest2d upsample_nearest3d _upsample_nearest_exact1d
    _upsample_nearest_exact2d _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d
    upsample_bicubic2d upsample_trilinear3d _upsample_bilinear2d_aa _upsample_bicubic2d_aa
    grid_sampler_2d grid_sampler_3d cudnn_grid_sampler affine_grid_generator
    embedding _embedding_bag _embedding_bag_forward_only embedding_renorm native_dropout _fused_dropout
    hardswish _prelu_kernel glu log_sigmoid_forward rrelu_with_noise addr
    _thnn_fused_lstm_cell _thnn_fused_gru_cell
    nll_loss_forward nll_loss2d_forward nll_loss_nd binary_cross_entropy binary_cross_entropy_with_logits
    mse_loss l1_loss smooth_l1_loss huber_loss soft_margin_loss multi_margin_loss multilabel_margin_loss_forward
    kl_div poisson_nll_loss hinge_embedding_loss margin_ranking_loss
""".split())
_CHEAP_TAGS = tuple(getattr(torch.Tag, name) for name in ("pointwise", "reduction", "nondeterministic_seeded",
                                                          "view_copy", "inplace_view") if hasattr(torch.Tag, name))


def _formula(func: Any) -> Any:
    """The FLOP formula for ``func``: torch's (a formula registered with
    ``torch.utils.flop_counter.register_flop_formula`` included), else ours, else None."""
    packet = func._overloadpacket
    return flop_registry.get(packet) or _FORMULAS.get(packet)


def _is_cheap(func: Any) -> bool:
    """Whether ``func`` is known to do no work worth counting (see ``_CHEAP_OPS``)."""
    if func.namespace in ("prim", "profiler"):  # metadata (device, layout); the profiler's markers (record_function)
        return True
    if func.namespace != "aten":
        return False
    if func.is_view or any(tag in func.tags for tag in _CHEAP_TAGS):
        return True
    name = func._schema.name.split("::")[-1]
    return name in _CHEAP_OPS or name.rstrip("_") in _CHEAP_OPS


@contextmanager
def _counting() -> Iterator[None]:
    """Layers decompose into ops with a formula while counting: torch's fused fast path of
    ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` (taken in eval mode without
    gradients) is one op without one; it is turned off, and back on afterwards."""
    with mha_fastpath_off():
        yield


class _Counter(TorchDispatchMode):
    """Counts the FLOPs of every op that runs, and notes the ops it could not count."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.uncounted: dict[str, int] = {}  # op -> how many times it ran

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        formula = _formula(func)
        if formula is None and func is not torch.ops.prim.device.default:
            with self:  # let composite ops decompose into counted ones, as FlopCounterMode does
                result = func.decompose(*args, **kwargs)
                if result is not NotImplemented:
                    return result
        out = func(*args, **kwargs)
        if formula is not None:
            count = int(formula(*args, **kwargs, out_val=out))
        else:
            count = 0
            if not _is_cheap(func):
                self.uncounted[str(func)] = self.uncounted.get(str(func), 0) + 1
        self.total += count
        self._record(func, args, kwargs, out, count)
        return out

    def _record(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, count: int) -> None:
        pass


class _Tracer(_Counter):
    """Also remembers, for every tensor, which ops and which parameters its values depend on.

    An op that writes in place (``out[:, :16] = linear(x)``, ``x.relu_()``, an ``out=``
    argument) writes into memory that other tensors share: the base of a view, other views. So a
    tensor's dependencies are its own (those of the op that made it, a view's being its base's)
    and those of every write so far into the part of its storage it covers: a view of one slice
    of a buffer depends on what was written there, not on what went into the other slices.
    """

    def __init__(self, params: dict[int, int]) -> None:
        super().__init__()
        self.params = params  # id(parameter) -> index
        self.flops: list[int] = []
        self.own: dict[int, tuple[int, int]] = {}  # id(tensor) -> bitsets of the ops and parameters it depends on
        self.writes: dict[int, list[tuple[_Geometry, int, int]]] = {}  # storage -> where written, and the bitsets
        self.storages: dict[int, int | None] = {}  # id(tensor) -> its storage
        self.keep: list[Tensor] = []  # keep every tensor alive so ids are never reused

    def _storage(self, t: Tensor) -> int | None:
        key = id(t)
        if key not in self.storages:
            self.storages[key] = _storage(t)
            self.keep.append(t)
        return self.storages[key]

    def _own(self, t: Tensor) -> tuple[int, int]:
        ops, uses = self.own.get(id(t), (0, 0))
        index = self.params.get(id(t))
        return ops, uses | (0 if index is None else 1 << index)

    def deps(self, t: Tensor) -> tuple[int, int]:
        """Bitsets of the ops and parameters ``t``'s values depend on now."""
        ops, uses = self._own(t)
        records = self.writes.get(self._storage(t))  # type: ignore[arg-type]
        if records:
            where = _geometry(t)
            for region, o, u in records:
                if _overlap(region, where):
                    ops, uses = ops | o, uses | u
        return ops, uses

    def _record(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, count: int) -> None:
        op = 1 << len(self.flops)
        self.flops.append(count)
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
        full = [self.deps(t) for t in inputs]
        ops = op | _union(o for o, _ in full)
        uses = _union(u for _, u in full)
        written = _written(func, args, kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or any(t is w for w in written):
                continue
            storage = self._storage(t)
            if storage is not None and any(self._storage(i) == storage for i in inputs):
                # a view (or an alias) reads only its part of the storage: its base's own
                # dependencies, and the writes it overlaps when it is read
                deps = [self._own(i) if self._storage(i) == storage else d for i, d in zip(inputs, full)]
                self.own[id(t)] = (op | _union(o for o, _ in deps), _union(u for _, u in deps))
            else:
                self.own[id(t)] = (ops, uses)
        for w in written:
            storage = self._storage(w)
            if storage is None:  # no storage to share: only this tensor changes
                self.own[id(w)] = (self._own(w)[0] | ops, self._own(w)[1] | uses)
            else:
                self.writes.setdefault(storage, []).append((_geometry(w), ops, uses))


def _union(bitsets: Iterable[int]) -> int:
    result = 0
    for b in bitsets:
        result |= b
    return result


def _written(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    """The tensors ``func`` writes the values of (its schema's ``Tensor(a!)`` arguments; an op that
    only changes a tensor's shape in place writes none)."""
    if not func._schema.is_mutable or (_INPLACE_VIEW is not None and _INPLACE_VIEW in func.tags):
        return []
    written = []
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[i] if i < len(args) and not argument.kwarg_only else kwargs.get(argument.name)
        written += [t for t in tree_flatten(value)[0] if isinstance(t, Tensor)]
    return written


_INPLACE_VIEW = getattr(torch.Tag, "inplace_view", None)


def _storage(t: Tensor) -> int | None:
    """Which memory ``t`` lives in, or None for a tensor without storage (sparse, nested)."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return None


_Geometry = tuple[int, tuple[int, ...], tuple[int, ...], int]  # first byte, sizes, strides in bytes, element size


def _geometry(t: Tensor) -> _Geometry:
    size = t.element_size()
    return t.storage_offset() * size, tuple(t.shape), tuple(s * size for s in t.stride()), size


def _overlap(a: _Geometry, b: _Geometry) -> bool:
    """Whether two tensors on one storage share a byte."""
    ranges = []
    for start, sizes, strides, size in (a, b):
        if 0 in sizes:
            return False
        ranges.append((start, start + sum((n - 1) * s for n, s in zip(sizes, strides)) + size))
    (a0, a1), (b0, b1) = ranges
    if a1 <= b0 or b1 <= a0:
        return False
    if _dense(a) or _dense(b):
        return True
    first = min(a0, b0)
    mask = torch.zeros(max(a1, b1) - first, dtype=torch.bool)  # one per byte, on the host whatever the device

    def covered(g: _Geometry) -> Tensor:
        start, sizes, strides, size = g
        return mask.as_strided((*sizes, size), (*strides, 1), start - first)

    covered(a).fill_(True)
    return bool(covered(b).any())


def _dense(g: _Geometry) -> bool:
    """Whether a tensor covers every byte between its first and its last (in some order of its dims)."""
    _, sizes, strides, expected = g
    for s, n in sorted((s, n) for n, s in zip(sizes, strides) if n > 1):
        if s != expected:
            return False
        expected *= n
    return True


def exit_costs(model: nn.Module, example_input: Any, *, num_exits: int | None = None,
               executed: bool = False) -> ExitCosts:
    """Multiply-adds and parameters needed to reach each exit of ``model``, per sample.

    Two counts, both of the ops one forward runs:

    * ``executed=False`` (the default): what exit ``k``'s output *depends on* — the least any
      early-exit inference must compute: work a stage does that only later exits need (an
      MSDNet block's finer scales) is not charged to exit ``k``. This is not MSDNet's count;
    * ``executed=True``: what :class:`EarlyExit` *runs* for a sample that leaves at exit ``k`` —
      whole stages ``1..k`` and heads ``1..k``, counted while it runs. This is MSDNet's
      convention (its public code's ``op_counter`` charges exit ``k`` every op run before
      classifier ``k``), the one to use to compare with MSDNet's published costs, and in the
      budgeted curve to predict the FLOPs of real early exit. MSDNet's counter also counts
      ReLU and pooling, which this does not (see ``docs/guides/models.md``).

    For a chain of stages (:class:`MultiExit` of plain layers) both are the same.

    What is counted (2 FLOPs per multiply-add): the ops ``torch.utils.flop_counter`` has a formula
    for (matrix products, convolutions, its fused attention kernels, and any formula registered
    with its ``register_flop_formula``), and those it has none for that this function knows:
    scaled dot-product attention on CPU and other backends (torch's formula, :math:`QK^\\top` and
    :math:`AV` in full, a causal mask included), the fused kernels of
    ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (per step, the input and the hidden state times the gate
    matrices: :math:`4(d_{in} + h)h` for an LSTM layer), ``nn.Bilinear``
    (:math:`d_{out}(d_1 d_2 + d_2)`), matrix-vector and dot products, ``torch.cdist``. torch's
    fused fast path of ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` is turned off
    while counting (and restored after), so they count as their projections, attention and
    feed-forward products. Pointwise ops, reductions, normalization, pooling, softmax, embedding
    lookups, dropout and data movement count nothing, as in ``torch.utils.flop_counter``. Work
    written in place (``out[:, :16] = linear(x)``, ``x.relu_()``) is charged, multiply-adds and
    parameters, to the exits that read the memory it wrote. Dependencies are followed through
    tensors only: work whose result reaches later layers through a host value (``.item()``,
    ``float(t)``, ``.tolist()``, a NumPy round trip) is charged to no exit by the default count,
    without a warning (``.tolist()`` and NumPy conversions are not seen); ``executed=True`` counts
    it, in the stage that runs it.

    Args:
        model: any multi-exit model (``forward`` returns ``K`` logits tensors); with
            ``executed=True`` one :class:`EarlyExit` can run (``exit_stages()`` or
            :func:`attach_exits`).
        example_input: one input batch; its first dimension is the batch size, and the
            counts are divided by it (use a batch of 1 when the model's cost depends on it).
        num_exits: checked against the model's output when given.
        executed: count what early exit executes instead of what each exit depends on.

    Returns:
        :class:`ExitCosts`: ``K`` cumulative multiply-adds (``flops`` twice that) and parameters
        per sample, integers.

    Raises:
        ValueError: the model's parameters on the meta device and ``example_input`` not (or the
            other way round): counting needs both there, or both real; ``executed=True`` with
            either on the meta device.

    Warns:
        RuntimeWarning: once per call, naming the ops that ran without a formula and that are
            not known to be cheap (a custom op, an ATen kernel neither torch nor this module has
            a formula for): their work is left out, so the costs are lower bounds.

    Example:
        >>> import torch, metaweight as mw
        >>> net = mw.MultiExit([torch.nn.Linear(10, 20), torch.nn.Linear(20, 20)],
        ...                    [torch.nn.Linear(20, 3), torch.nn.Linear(20, 3)])
        >>> mw.exit_costs(net, torch.randn(1, 10)).macs  # 10*20 + 20*3, then + 20*20 + 20*3
        [260, 720]
    """
    if num_exits is not None:
        if integer_value(num_exits) is None or num_exits < 1:
            raise ValueError(f"Invalid num_exits: {num_exits!r}. Expected a positive int, or None to take the "
                             f"model's.")
        num_exits = int(num_exits)
    executed = check_flag(executed, "executed")
    if executed:
        from metaweight._early_exit import refuse_meta

        refuse_meta(model, example_input, "exit_costs(..., executed=True) runs EarlyExit, which")
    _check_meta_agrees(model, example_input)
    uncounted: dict[str, int] = {}
    with torch.no_grad(), _counting():
        costs = _dependent_costs(model, example_input, num_exits, uncounted)
        if executed:
            costs = _executed_costs(model, example_input, costs, uncounted)
    if uncounted:
        _warn_uncounted(uncounted)
    return costs


def _warn_uncounted(uncounted: dict[str, int]) -> None:
    names = ", ".join(f"{op} ({n} call{'s' if n > 1 else ''} per forward)" for op, n in sorted(uncounted.items()))
    one = len(uncounted) == 1
    warn_user(f"exit_costs counted no multiply-adds for {names}: neither torch.utils.flop_counter nor metaweight "
              f"has a FLOP formula for {'this op' if one else 'these ops'}, and {'it is' if one else 'they are'} "
              f"not known to be cheap (pointwise, data movement, normalization, pooling), so "
              f"{'its' if one else 'their'} work is left out of the costs, which are lower bounds. To count "
              f"{'it' if one else 'them'}, register a formula with torch.utils.flop_counter.register_flop_formula.")


def _dependent_costs(model: nn.Module, example_input: Any, num_exits: int | None,
                     uncounted: dict[str, int]) -> ExitCosts:
    """What each exit depends on, from one traced forward; the ops it could not count go to ``uncounted``."""
    params = {id(p): i for i, p in enumerate(model.parameters())}
    sizes = [p.numel() for p in model.parameters()]
    tracer = _Tracer(params)
    with eval_mode(model), tracer:
        outputs = call_model(model, example_input, "exit_costs")
    outputs = check_exit_outputs(outputs, num_exits,
                                 fix="Pass exit_costs num_exits={n} (or leave it out to take the model's)")
    batch = outputs[0].shape[0]
    if batch == 0:
        raise ValueError("`example_input` holds no sample (batch size 0); the costs are per sample. Pass a batch "
                         "of at least one input.")
    _merge(uncounted, tracer.uncounted)
    macs, used, incremental = [], [], []
    ops_so_far, params_so_far, previous = 0, 0, 0
    for logits in outputs:
        o, u = tracer.deps(logits)
        ops_so_far |= o
        params_so_far |= u
        flops = sum(f for i, f in enumerate(tracer.flops) if f and ops_so_far >> i & 1)
        m = flops // 2 // batch
        macs.append(m)
        incremental.append(m - previous)
        previous = m
        used.append(sum(s for i, s in enumerate(sizes) if params_so_far >> i & 1))
    return ExitCosts(macs, used, incremental)


def _merge(uncounted: dict[str, int], more: dict[str, int]) -> None:
    """Ops not counted by several runs of the model: the most calls of each in one run."""
    for op, n in more.items():
        uncounted[op] = max(uncounted.get(op, 0), n)


def _check_meta_agrees(model: nn.Module, example_input: Any) -> None:
    """Counting runs one forward, which torch cannot run with the model on the meta device and the
    input on another (or the other way round): refuse that before it runs, saying which is where."""
    tensors = [*model.parameters(), *model.buffers()]
    model_meta = any(t.is_meta for t in tensors)
    input_meta = holds_meta(example_input)
    if tensors and model_meta != input_meta:
        where = ("the model's parameters are on the meta device, `example_input` is not" if model_meta else
                 "`example_input` is on the meta device, the model's parameters are not")
        raise ValueError(f"exit_costs runs one forward of the model on `example_input`, and {where}. Counting needs "
                         f"shapes only, so either pass `example_input` on the meta device too (e.g. "
                         f"torch.empty(shape, device='meta')), or materialize the model (e.g. "
                         f"model.to_empty(device='cpu'), then load_state_dict) and pass real inputs.")


def _executed_costs(model: nn.Module, example_input: Any, lazy: ExitCosts, uncounted: dict[str, int]) -> ExitCosts:
    """Count the FLOPs :class:`EarlyExit` runs when every sample is made to leave at exit ``k``."""
    from metaweight._budget import NO_EXIT
    from metaweight._early_exit import _CostProbe

    K = len(lazy.macs)
    macs = []
    predictor = None
    for k in range(K):
        thresholds = torch.full((K,), NO_EXIT, dtype=torch.float32)
        thresholds[k] = -NO_EXIT  # everyone leaves at exit k (the last takes all anyway)
        if predictor is None:
            predictor = _CostProbe(model, thresholds)
            predictor(example_input)  # uncounted: EarlyExit's first-call check that the stages do what forward does
        else:
            predictor.thresholds.copy_(thresholds)
        counter = _Counter()
        with counter:
            predictions, _ = predictor(example_input)
        _merge(uncounted, counter.uncounted)
        macs.append(counter.total // 2 // predictions.shape[0])
    incremental = [m - (macs[k - 1] if k else 0) for k, m in enumerate(macs)]
    return ExitCosts(macs, lazy.params, incremental)
