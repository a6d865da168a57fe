"""The step transaction: what a refused step must put back, kept on the device, and its one decision.

A call of :meth:`HarmonizedWeighter.step` may change the model's buffers (the forward updates
BatchNorm statistics), gamma, gamma's optimizer state, the validation average and the counters.
A step found non-finite must leave all of them as they were. This module keeps exactly that:

* :class:`BufferSnapshot` copies the buffers into flat storage allocated once
  (:class:`FlatCopies`: one ``torch.cat`` per device and dtype), and copies them back only when a
  step is refused;
* :class:`StateSnapshot` keeps gamma, its optimizer's state and the validation objective's
  state as device copies (a few small tensors), never through ``state_dict()`` or ``.cpu()``;
* :class:`OptimizerSnapshot` keeps the model optimizer's state in flat storage, for
  ``mode="fast"``, which takes the model's step before its one decision (see :class:`StepTransaction`);
* :func:`nonfinite_flag` decides whether a loss and all gradients
  are finite with one fused kernel per device and dtype
  (``torch._amp_foreach_non_finite_check_and_unscale_``, as ``torch.amp.GradScaler`` does) and
  leaves the answer on the device;
* :func:`host_read` is the one place the weighter reads values back to the host, once per step
  (the decision and the numbers of the step's record in one transfer);
* :class:`StepTransaction` is one call of ``step()`` built from them, for both modes: ``begin``
  (snapshot), ``decide`` (the one read), and ``rollback`` or ``refuse`` (put everything back).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from metaweight._capture import sparse_message
from metaweight._randomness import RngState, model_generators, rng_state, set_rng_state
from metaweight._walk import current_walk, tree_changed, walk
from metaweight._warn import raise_or_skip_step, warn_user

if TYPE_CHECKING:  # (it imports this module's snapshots)
    from metaweight._hypergradient import Reducer

HOST_READ = "metaweight::host_read"  # the profiler range around every read back to the host
_META = operator.attrgetter("shape", "dtype", "device")  # what a tensor's copy in flat storage is laid out by
_SPARSE = operator.attrgetter("is_sparse")


def host_read(values: Sequence[Tensor]) -> list[float]:
    """The values of ``values`` (scalars or vectors, any float dtype) on the host, in one transfer.

    This is the weighter's only synchronisation with the device per step; it runs under a
    profiler range named ``metaweight::host_read`` so benchmarks can count it on any device.
    """
    with torch.profiler.record_function(HOST_READ):
        flat = torch.cat([v.detach().reshape(-1).to(torch.float64) for v in values])
        return flat.cpu().tolist()


def host_equal(a: Tensor, b: Tensor) -> bool:
    """``torch.equal(a, b)`` (same shape, same values after type promotion) read through :func:`host_read`.

    ``torch.equal`` on a GPU is a synchronisation its C++ makes (``.item()`` of the comparison), outside
    ``host_read``: a step's count would miss it on the CPU, where it reads nothing through the dispatcher."""
    if a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return host_read([torch.eq(a, b).all()])[0] == 1.0


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (a host tensor, typically a temporary) on ``device``, without a blocking copy where that is safe.

    On CUDA a copy from pageable host memory with ``non_blocking=True`` is staged before the call
    returns, so the host tensor may be freed at once and the host does not wait for the device's
    queue. Elsewhere (MPS, XPU, ...) a non-blocking copy may still read the host memory after the call
    returns, and a freed temporary would be read after reuse: the copy there is the ordinary one.
    """
    device = torch.device(device)
    return t.to(device, non_blocking=device.type == "cuda")


@torch.no_grad()
def nonfinite_flag(loss: Tensor, tensors: Iterable[Tensor | None]) -> Tensor:
    """A float tensor of shape ``[1]`` on ``loss``'s device: 1 if ``loss`` or any floating-point
    entry of ``tensors`` (gradients, buffers; ``None`` and integer tensors are passed over,
    sparse tensors are checked through their values) is inf or NaN, else 0. No host read.

    The check is ``torch._amp_foreach_non_finite_check_and_unscale_`` with an inverse scale of
    1, which leaves every value as it is.
    """
    found = (~torch.isfinite(loss.detach())).any().to(torch.float32).reshape(1)
    present = [t for t in tensors if t is not None]
    if not present:  # (torch's grouping asserts on an empty list: an integer input's leaves, no gradients at all)
        return found.clamp_max(1.0)
    if any(map(_SPARSE, present)):
        present = [t._values() if t.is_sparse else t for t in present]
    # (grouped by device and dtype in C, as torch's multi-tensor optimizers group theirs: one call, where a Python
    # loop read each tensor's device and dtype)
    for (device, dtype), (groups, _) in torch._C._group_tensors_by_device_and_dtype([present], False).items():
        if not dtype.is_floating_point:
            continue
        flag = torch.zeros(1, device=device, dtype=torch.float32)  # (the kernel wants float32, whatever the default dtype)
        torch._amp_foreach_non_finite_check_and_unscale_(groups[0], flag,
                                                         torch.ones(1, device=device, dtype=torch.float32))
        found = found + flag.to(found.device)
    return found.clamp_max(1.0)


def gradients_moved(grads: Sequence[Tensor | None]) -> bool:
    """Whether the gradients ``grads`` (the trainable parameters', in any order) are there, finite and not
    all zero: what a backward leaves for a step to come, where a ``GradScaler``'s skipped step leaves inf or
    NaN in them (and a ``zero_grad(set_to_none=False)`` after it, zeros; ``set_to_none=True``, none). One
    host read."""
    present = [g for g in grads if g is not None]
    if not present:
        return False
    device = present[0].device
    nonzero = torch.stack([(g._values() if g.is_sparse else g).ne(0).any().to(device) for g in present]).any()
    flags = torch.stack([nonfinite_flag(torch.zeros((), device=device), present)[0], nonzero.float()])
    nonfinite, moved = flags.tolist()
    return not nonfinite and bool(moved)


# said where meta_step finds no loss() call of the iteration after a load_state_dict
LOADED_SINCE = (" (It was loaded from a checkpoint since its last loss() call: a checkpoint keeps the state, not the "
                "loss() calls of an iteration under way; save it after meta_step.)")
# said where meta_step refuses another batch than its loss() calls' after a load in the middle of an iteration
LOADED_DURING = (" (It was loaded from a checkpoint during this iteration: a checkpoint keeps the state, not the loss() "
                 "calls of an iteration under way, so this iteration's calls are those since the load; save it after "
                 "optimizer.step() and meta_step.)")
COPIED_SINCE = (" (It is a copy (copy.deepcopy, pickle) made since its last loss() call: a copy keeps the state, "
                "not the loss() calls of the iteration under way, which stay with the original; copy it after "
                "meta_step.)")


def resumed_mid_step_message(who: str, calls: int, unchanged: str) -> str:
    """What a two-call ``meta_step`` says when the optimizer's step used gradients of ``calls`` loss() calls made
    before a ``load_state_dict`` (restored ``.grad``, or a backward onto them) whose terms the checkpoint does not
    hold: the checkpoint was saved in the middle of an accumulated step."""
    return (f"{who}.meta_step: the optimizer's step used gradients accumulated before a load_state_dict: the "
            f"checkpoint was saved in the middle of an accumulated step, with {calls} loss() call{'s' * (calls != 1)} "
            f"of it made, and a checkpoint keeps the state, not those calls' terms, so this update would read only "
            f"the micro-batches since the load. {unchanged} Save checkpoints after optimizer.step() and meta_step; "
            f"to resume from this one, start its step over: optimizer.zero_grad() (or leave the saved .grad "
            f"unrestored) and run all its micro-batches again.")


def not_stepped_message(who: str, outcome: str, moved: bool, kept: str = "") -> str:
    """What a two-call ``meta_step`` says when the optimizer did not step since ``loss()``, warned to the user
    (:func:`~metaweight._warn.warn_user`) where it was not a ``GradScaler``'s skip: the gradients of the loss
    ``moved`` (:func:`gradients_moved`), so ``meta_step`` came before ``optimizer.step()`` (or the loop
    skipped its step, or stepped once per several micro-batches and called ``meta_step`` after each).

    Args:
        who: ``"weighting"`` or ``"weighter"``, as the user's loop names the object.
        outcome: what stays unchanged, a clause (``"gamma is unchanged"``).
        moved: :func:`gradients_moved` of the trainable parameters' gradients.
        kept: where the gradients moved, what becomes of this iteration's losses, a sentence.
    """
    if moved:
        message = (f"The optimizer did not step since {who}.loss, and that loss's gradients are finite, so no "
                   f"GradScaler skipped it: meta_step was called before optimizer.step() (or the loop skipped its "
                   f"step, or called meta_step after a micro-batch it did not step on): {outcome}.{kept} Call "
                   f"{who}.meta_step(...) once per optimizer step, after optimizer.step(); with gradient "
                   f"accumulation, after the micro-batch the optimizer steps on only (Accelerate: under `if "
                   f"accelerator.sync_gradients:`), with the whole batch.")
        warn_user(message)
        return message
    return (f"The optimizer did not step since {who}.loss (a GradScaler found inf/NaN gradients and skipped it, or "
            f"meta_step came before optimizer.step()): {outcome}.")


class FlatCopies:
    """Copies of a list of tensors in flat storage allocated once and kept between calls (on their
    devices): one ``torch.cat`` per device and dtype (``torch.stack`` for 0-d tensors, such as
    BatchNorm's ``num_batches_tracked``) copies them all, one op and one launch where a per-tensor
    copy is one op per tensor (a CPU ``torch._foreach_copy_`` runs one ``copy_`` per tensor).
    :attr:`copies` are views of the storage, shaped as the sources, valid until the next copy; each has a
    version counter of its own (writing one is no change of another to autograd). Those who keep copies
    between calls read them here (:attr:`copies`), never from a list of their own: pickled, they are made
    again as views of the storage."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._plan: list[tuple[list[int], Tensor, str]] = []  # (source positions, flat storage, "stack" | "cat" |
        # "flatten": the op that copies them, by their dimensions)
        self.copies: list[Tensor] = []

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without :attr:`copies`: ``pickle`` (unlike ``torch.save`` and ``copy.deepcopy``) gives each
        view a storage of its own, so an unpickled copy wrote into its flat storage and returned the copies of
        the pickling time (a refused step put back the parameters and buffers of an earlier one)."""
        return {**self.__dict__, "copies": []}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.copies = self._views() if self._key is not None else []

    @torch.no_grad()
    def copy(self, tensors: Sequence[Tensor], key: tuple[Any, ...] | None = None) -> list[Tensor]:
        """Copy ``tensors`` into the storage (new storage when their shapes, dtypes or devices
        changed) and return the copies. ``key``: their shapes, dtypes and devices (``(t.shape, t.dtype,
        t.device)`` of each) where the caller has them."""
        key = tuple(map(_META, tensors)) if key is None else key
        if key != self._key:
            self._allocate(tensors)
            self._key = key
        for index, flat, how in self._plan:
            sources = list(map(tensors.__getitem__, index))
            if how == "stack":
                torch.stack(sources, out=flat)
            elif how == "cat":
                torch.cat(sources, out=flat)
            else:
                torch.cat([t.reshape(-1) for t in sources], out=flat)
        return self.copies

    @property
    def key(self) -> tuple[Any, ...] | None:
        """The shapes, dtypes and devices of the tensors of the last copy (``None`` before the first)."""
        return self._key

    @torch.no_grad()
    def copy_from(self, other: FlatCopies) -> list[Tensor]:
        """Copy ``other``'s copies into this storage (allocated as ``other``'s): one ``copy_`` per device and
        dtype, where :meth:`copy` from the tensors themselves is one view per tensor and a ``cat``."""
        if self._key != other._key:
            self._allocate(other.copies)
            self._key = other._key
        for (_, flat, _), (_, source, _) in zip(self._plan, other._plan):
            flat.copy_(source)
        return self.copies

    def _allocate(self, tensors: Sequence[Tensor]) -> None:
        self._plan = []
        scalars: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        others: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(tensors):
            (scalars if t.dim() == 0 else others).setdefault((t.device, t.dtype), []).append(i)
        for zero_d, grouped in ((True, scalars), (False, others)):
            for (device, dtype), index in grouped.items():
                flat = torch.empty(sum(1 if zero_d else tensors[i].numel() for i in index), device=device, dtype=dtype)
                how = "stack" if zero_d else "cat" if all(tensors[i].dim() == 1 for i in index) else "flatten"
                self._plan.append((index, flat, how))
        self.copies = self._views([t.shape for t in tensors])

    def _views(self, shapes: Sequence[torch.Size] | None = None) -> list[Tensor]:
        """:attr:`copies` made from the storage: one view per source tensor, shaped as it (``shapes``; by
        default those of the last copy's key)."""
        shapes = [shape for shape, _, _ in self._key] if shapes is None else shapes  # type: ignore[union-attr]
        views: dict[int, Tensor] = {}
        for index, flat, _ in self._plan:
            for i, piece in zip(index, flat.split([shapes[i].numel() for i in index])):
                # (.data: a version counter of its own; views of one storage share one, and a forward's
                # in-place write to one copy, spectral_norm's power iteration, made autograd refuse the
                # running statistics BatchNorm saved from another: "modified by an inplace operation")
                views[i] = piece.view(shapes[i]).data
        return [views[i] for i in range(len(shapes))]


class Layout:
    """A module's buffers by name, with which submodules it holds and which buffer slots are empty
    (``register_buffer(name, None)``, a cache filled at the first forward), from one walk over its modules:
    what :meth:`put_back` needs to undo what a forward built (a buffer registered, a submodule created)."""

    def __init__(self, module: nn.Module) -> None:
        walked = current_walk(module)  # (named_buffers' order and its removal of duplicates)
        self.walk = walked  # (a walk's lists are never changed: a tree that changed is walked anew)
        self.names: list[str] = [n for n, _ in walked.buffers]
        self.buffers: list[Tensor] = [b for _, b in walked.buffers]
        self.empty: set[tuple[int, str]] = walked.empty
        self._named = walked.modules  # (for put_back: which submodule each slot held)

    @functools.cached_property
    def modules(self) -> set[int]:
        """The ids of the submodules held (what a refused step compares and puts back: computed then)."""
        return {id(m) for _, m in self._named}

    def put_back(self, module: nn.Module) -> None:
        """Undo what was built since: remove the submodules created (whole), or put back the one a created
        submodule replaced in its slot (a placeholder ``nn.Identity`` a first forward swaps for a layer), remove
        the buffers registered, and empty again the slots that were empty. Buffers that were there are left to
        the caller."""
        tree_changed()  # (written to the modules' dicts: no registration hook sees it)
        name_of = {id(m): n for n, m in self._named}
        at = dict(self._named)
        for m in list(module.modules()):
            if id(m) in self.modules:
                prefix = name_of[id(m)]
                for key, child in list(m._modules.items()):
                    if child is not None and id(child) not in self.modules:
                        original = at.get(f"{prefix}.{key}" if prefix else key)
                        if original is not None:
                            m._modules[key] = original
                        else:
                            del m._modules[key]
        known = set(self.names)
        for name, _ in list(module.named_buffers()):
            if name not in known:
                owner, _, leaf = name.rpartition(".")
                m = module.get_submodule(owner)
                if (id(m), leaf) in self.empty:
                    m._buffers[leaf] = None
                else:
                    del m._buffers[leaf]


@contextlib.contextmanager
def registered_buffers_removed(module: nn.Module) -> Iterator[None]:
    """On exit, undo every buffer registered and submodule created in ``module`` inside the block (a mask, a
    table or a layer a model builds at its first forward; :meth:`Layout.put_back`): for forwards outside the
    user's step, which must leave the model as they found it."""
    layout = Layout(module)
    try:
        yield
    finally:
        layout.put_back(module)


class BufferSnapshot:
    """The module's buffers before a step, in flat storage kept between steps (:class:`FlatCopies`)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._flat = FlatCopies()
        self._now = FlatCopies()  # the buffers after the step, for became_nonfinite
        self._current: FlatCopies | None = None  # every buffer after the step, for restore_where
        self._live: list[Tensor] = []
        self._names: list[str] = []
        self._layout: Layout | None = None
        self._float_cache: tuple[Any, list[Tensor], list[Tensor], tuple[Any, ...]] | None = None  # (_floats)

    def save(self) -> None:
        """Copy every buffer (floating point or not) into the snapshot."""
        if self._layout is None or self._layout.walk is not current_walk(self.module):
            # (a walk kept from the last step, the tree unchanged since: the same buffers, the same layout)
            self._layout = Layout(self.module)
        self._names, self._live = self._layout.names, self._layout.buffers
        self._flat.copy(self._live)

    @property
    def _saved(self) -> list[Tensor]:
        """The copies of the last :meth:`save`: views of the flat storage, one per buffer, its shape."""
        return self._flat.copies

    @property
    def names(self) -> list[str]:
        """The buffers' names as the last :meth:`save` found them."""
        return self._names

    @property
    def flat(self) -> FlatCopies:
        """The flat storage of the last :meth:`save`."""
        return self._flat

    @torch.no_grad()
    def restore(self) -> None:
        """Put the buffers back as :meth:`save` found them: a buffer the forward re-assigned (``self.b =
        self.b + 1``) or registered anew (a mask grown to a longer sequence) is put back under its name, and
        a buffer the forward registered (a mask built on the first call) or a submodule it created is removed,
        a slot it filled (``register_buffer(name, None)``) emptied again, and a buffer it resized, retyped or
        moved in place (``self.mask.data = bigger``) given back its size, dtype and device."""
        if self._layout is None:
            return
        if self.unchanged() and Layout(self.module).modules == self._layout.modules:
            if self._live:
                torch._foreach_copy_(self._live, self._saved)
            return
        current = dict(self.module.named_buffers())
        self._layout.put_back(self.module)  # (marks the walks stale: these are writes to the modules' dicts)
        for name, old, saved in zip(self._names, self._live, self._saved):
            if current.get(name) is not old:
                owner, _, leaf = name.rpartition(".")
                self.module.get_submodule(owner)._buffers[leaf] = old
            if _META(old) != _META(saved):
                old.data = saved.clone()  # (resized, retyped or moved in place: ``.data =`` again)
            else:
                old.copy_(saved)

    def unchanged(self) -> bool:
        """Whether the module holds the very buffers :meth:`save` found, at their shapes, dtypes and devices (none
        registered, replaced, removed, or resized, retyped or moved in place)."""
        current = list(self.module.named_buffers())
        return len(current) == len(self._names) and all(n == m and b is c and _META(b) == _META(v)
                                                        for (n, b), m, c, v in
                                                        zip(current, self._names, self._live, self._saved))

    @torch.no_grad()
    def restore_where(self, refused: Tensor) -> None:
        """Put the buffers back as :meth:`save` found them if ``refused`` (a bool tensor of one element) is
        true, else leave them: one flat copy, one ``torch.where`` and one multi-tensor copy per device and
        dtype, with no host read and the same operations whatever ``refused`` holds (for
        :mod:`metaweight._capturable`). The buffers must be those :meth:`save` found (:meth:`unchanged`)."""
        if not self._live:
            return
        if self._current is None:
            self._current = FlatCopies()
        now = self._current.copy(self._live)
        for (_, after, _), (_, before, _) in zip(self._current._plan, self._flat._plan):
            torch.where(refused.to(after.device), before, after, out=after)
        torch._foreach_copy_(self._live, now)

    def _floats(self) -> tuple[list[Tensor], tuple[Any, ...]]:
        """The floating-point buffers of the last :meth:`save` and their layout (as :class:`FlatCopies` keys it),
        kept while the buffers and their layout are those of the save before."""
        key, cached = self._flat.key, self._float_cache
        if cached is None or cached[0] is not key or cached[1] is not self._live:
            assert key is not None
            positions = [i for i, (_, dtype, _) in enumerate(key) if dtype.is_floating_point]
            cached = (key, self._live, [self._live[i] for i in positions], tuple(key[i] for i in positions))
            self._float_cache = cached
        return cached[2], cached[3]

    def as_dict(self) -> dict[str, Tensor]:
        """The saved buffers by name (views of the snapshot; valid until the next :meth:`save`)."""
        return dict(zip(self._names, self._saved))

    @torch.no_grad()
    def became_nonfinite(self, device: torch.device) -> Tensor:
        """A float tensor of shape ``[1]`` on ``device``: 1 if the step made an entry of a floating-point buffer
        non-finite, else 0. No host read.

        An entry counts where it is inf or NaN now and was different at :meth:`save`, finite or not, unless it
        was NaN then: a buffer that holds non-finite values by design (an attention mask of ``-inf``) is left
        to the model, and what the step made non-finite (BatchNorm statistics of a diverging forward, a mask
        entry turned NaN) counts. A buffer the forward registered, or registered anew at another shape (a
        mask built on the first call, or grown to a longer sequence), has nothing to compare with: it counts
        where it is NaN, never a value by design. The buffers are compared through flat storage kept between
        calls: one ``torch.cat`` per device and dtype, and a handful of elementwise ops on each flat vector.
        """
        found = torch.zeros(1, device=device, dtype=torch.float32)
        walked = current_walk(self.module)
        pairs: list[tuple[Tensor, Tensor | None]] = []
        floats: list[Tensor] | None = None  # the floating-point buffers, where laid out as at the save
        key = None
        current: dict[str, Tensor] | None = None  # the buffers by name now, where read
        if self._layout is not None and walked is self._layout.walk:
            # the walk of the save, still current (no forward changed the tree): the very buffers the snapshot
            # holds, in its order; laid out as then unless one was resized or retyped in place (``.data = ...``)
            if tuple(map(_META, self._live)) == self._flat.key:
                floats, key = self._floats()
        else:
            current = dict(walked.buffers)
            now = [current.get(n) for n in self._names]
            if len(current) == len(now) and all(b is not None and _META(b) == _META(s)
                                                for b, s in zip(now, self._saved)):
                floats = [b for b in now if b is not None and b.is_floating_point()]
        if floats is not None:
            # the floating-point buffers only (not BatchNorm's integer counters), flat: their groups come in
            # the snapshot's order, so that the two flat vectors of a group hold the same buffers
            self._now.copy(floats, key)
            before = [flat for _, flat, _ in self._flat._plan if flat.is_floating_point()]
            pairs = list(zip([flat for _, flat, _ in self._now._plan], before))
        else:  # a buffer registered, or registered anew at another shape or dtype: compared one by one
            current = dict(walked.buffers) if current is None else current
            saved = dict(zip(self._names, self._saved))
            pairs = [(b, saved[n] if n in saved and _META(saved[n]) == _META(b) else None)
                     for n, b in current.items() if b.is_floating_point()]
        for after, before in pairs:
            if before is None:
                bad = torch.isnan(after)
            else:  # non-finite now, changed (NaN != NaN), and not NaN before
                bad = ~torch.isfinite(after) & (after != before) & ~torch.isnan(before)
            found = found + bad.any().to(device=device, dtype=torch.float32)
        return found.clamp_max(1.0)


def step_unless(optimizer: torch.optim.Optimizer, inner: torch.optim.Optimizer, refused: Tensor) -> None:
    """The optimizer's step, skipped on the device where ``refused``: the fused kernels read ``found_inf``
    (a float32 ``[]`` tensor), as they do when ``torch.amp.GradScaler`` steps them: a refused step leaves the
    parameters and the state's values as they were (Adam's step counts are raised, then lowered by
    ``found_inf``), though a first step still creates the state's entries. ``inner`` must be fused
    (:func:`fused_step`)."""
    before = {k: inner.__dict__[k] for k in ("found_inf", "grad_scale") if k in inner.__dict__}
    inner.found_inf = refused.to(torch.float32)  # type: ignore[attr-defined]
    inner.grad_scale = None  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        for k in ("found_inf", "grad_scale"):
            if k in before:
                setattr(inner, k, before[k])
            else:
                delattr(inner, k)


def fused_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is a torch SGD, Adam or AdamW whose every parameter group is fused (its kernels read
    ``found_inf``: :func:`step_unless`)."""
    return type(optimizer) in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW) and \
        all(g.get("fused") for g in optimizer.param_groups)


_ABSENT = object()  # (an attribute the optimizer did not have)


class OptimizerSnapshot:
    """An optimizer's per-parameter state before a step taken ahead of its decision, in flat storage kept
    between calls (:class:`FlatCopies`: one ``torch.cat`` per device and dtype), and what :meth:`restore`
    needs to put it back bit for bit: which parameters had state and under which keys, and the very
    tensors that held it (an entry or a key the step created, as a first step creates momentum buffers,
    Adam's moments and step counts, is removed again). Values that are not tensors are kept as they are
    (torch's optimizers replace them, never change them in place)."""

    def __init__(self) -> None:
        self._flat = FlatCopies()
        self._called: Any = _ABSENT
        self._optimizer: torch.optim.Optimizer | None = None
        self._entries: dict[Any, dict[str, Any]] = {}
        self._tensors: list[Tensor] = []

    def save(self, optimizer: torch.optim.Optimizer, values: bool = True) -> None:
        """Copy ``optimizer.state``: its tensors into the flat storage, the rest by reference. With
        ``values=False`` only which entries, keys and tensors it holds (a fused optimizer's step that
        :func:`step_unless` skips leaves the values as they were; a first step still creates entries)."""
        self._optimizer = optimizer
        # torch's note that the optimizer stepped, which an LR scheduler reads (its warning of a scheduler step
        # before the optimizer's first): a step put back did not happen
        self._called = optimizer.__dict__.get("_opt_called", _ABSENT)
        self._entries = {p: dict(s) for p, s in optimizer.state.items() if isinstance(s, dict)}
        self._tensors = [v for s in self._entries.values() for v in s.values() if isinstance(v, Tensor)] \
            if values else []
        if self._tensors:
            self._flat.copy(self._tensors)

    @torch.no_grad()
    def restore(self) -> None:
        """Put ``optimizer.state`` back as :meth:`save` found it (entries, keys, tensors and their values)."""
        if self._optimizer is None:
            return
        if self._called is _ABSENT:
            self._optimizer.__dict__.pop("_opt_called", None)
        else:
            self._optimizer.__dict__["_opt_called"] = self._called
        state = self._optimizer.state
        for p in list(state):
            if p not in self._entries:
                del state[p]
        for p, saved in self._entries.items():
            current = state.get(p)
            if not isinstance(current, dict):
                state[p] = current = {}
            for k in [k for k in current if k not in saved]:
                del current[k]
            current.update(saved)
        if self._tensors:
            torch._foreach_copy_(self._tensors, self._flat.copies)

    def release(self) -> None:
        """Drop the references to the optimizer's state (the flat storage is kept for the next :meth:`save`):
        state the user replaces between steps (``optimizer.load_state_dict``) is not held alive."""
        self._optimizer, self._entries, self._tensors = None, {}, []


class Scratch:
    """Copies of a dict of tensors in flat storage kept between calls (:class:`FlatCopies`; valid
    until the next call)."""

    def __init__(self) -> None:
        self._flat = FlatCopies()

    def copy_of(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return dict(zip(tensors, self._flat.copy(list(tensors.values()))))


class StateSnapshot:
    """Gamma, its optimizer's state and the validation objective's state, as device copies."""

    def __init__(self, gamma: Tensor, optimizer: torch.optim.Optimizer, objective: nn.Module | None) -> None:
        self.gamma = gamma.detach().clone()
        self.optimizer = optimizer
        self.optimizer_state = {p: _copy_state(s) for p, s in optimizer.state.items()}
        self.objective = objective
        self.objective_state = ([b.detach().clone() for b in objective.buffers()]
                                if isinstance(objective, nn.Module) else None)

    @torch.no_grad()
    def restore(self, gamma: Tensor) -> None:
        gamma.copy_(self.gamma)
        state = self.optimizer.state
        for p in list(state):
            if p not in self.optimizer_state:
                del state[p]
        for p, saved in self.optimizer_state.items():
            current = state.get(p)
            if isinstance(current, dict) and current.keys() == saved.keys():
                for k, v in saved.items():
                    if isinstance(v, Tensor) and isinstance(current[k], Tensor) and current[k].shape == v.shape:
                        current[k].copy_(v)
                    else:
                        current[k] = copy_value(v)
            else:
                state[p] = _copy_state(saved)
        if self.objective_state is not None and isinstance(self.objective, nn.Module):
            for b, v in zip(self.objective.buffers(), self.objective_state):
                b.copy_(v)


def copy_value(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)


def _copy_state(state: Any) -> Any:
    return {k: copy_value(v) for k, v in state.items()} if isinstance(state, dict) else copy.deepcopy(state)


class Owner(Protocol):
    """What the transaction reads and puts back of the weighter (:class:`HarmonizedWeighter`)."""

    gamma: Tensor
    gamma_optimizer: torch.optim.Optimizer
    optimizer: torch.optim.Optimizer
    validation: Any
    learn: bool
    nonfinite: str
    num_calls: int
    num_meta_steps: int
    num_skipped: int
    last_meta: Any

    @property
    def term_names(self) -> list[str]: ...


@dataclasses.dataclass
class Saved:
    """What :meth:`StepTransaction.rollback` puts back besides the buffers (see ``begin``)."""

    state: StateSnapshot | None
    num_calls: int
    num_meta_steps: int
    num_skipped: int
    last_meta: Any = None  # the record of the last meta step kept (a MetaStepRecord)
    rng: RngState | None = None  # the generators' states (the forward's dropout masks are drawn again on a retry)


@dataclasses.dataclass
class PendingMeta:
    """A meta step stepped on the device, awaiting its decision (see ``HarmonizedWeighter._step_gamma``):
    the state to put back, the tensors to read (decision flags, objective, exit losses, meta-gradient,
    proposed gamma, terms), what the record keeps as tensors, and the validation inputs (read only by a refusal)."""

    saved: StateSnapshot
    values: list[Tensor]
    gamma_grad: Tensor
    exit_losses: Tensor
    val_inputs: Any = None  # the validation inputs, named by a refusal's message where they are not finite


@dataclasses.dataclass
class ModelStep:
    """The model step's decision and record numbers, read back to the host together."""

    finite: bool
    loss: float
    terms: dict[str, float]
    gamma: dict[str, float]
    meta: list[float]


class StepTransaction:
    """One call of ``step()``, in either mode: what it may change is kept on the device before it
    (:meth:`begin`), its one decision is one read (:meth:`decide`), and a step that raised or was
    refused puts everything back (:meth:`rollback`, :meth:`refuse`). In the exact mode the parameters and
    the optimizer's state need no copy: the optimizer steps only once the step is decided. ``mode="fast"``
    takes the model's step ahead of its decision (:meth:`flag` first, on the device), so that the meta
    step at the parameters it moved to is decided with it, in the same read; it keeps the parameters (its
    look-ahead's base point) and the optimizer's state (:attr:`optimizer_state`) to put back."""

    def __init__(self, module: nn.Module, reducer: Reducer) -> None:
        self.module = module
        self.reducer = reducer
        self.buffers = BufferSnapshot(module)  # what a refused step puts back, kept between steps
        self.optimizer_state = OptimizerSnapshot()  # mode="fast": the state before its step, kept between steps

    def begin(self, owner: Owner) -> Saved:
        """What one call may change besides the parameters and the optimizer: the buffers, and with
        ``learn`` gamma, its optimizer's state and the validation average, all kept on the device; the
        counters; and the random generators' states (host copies: the global ones, NumPy's, Python's and
        the model's own), which the call's forwards advance (dropout)."""
        self.buffers.save()
        state = None
        if owner.learn:
            state = StateSnapshot(owner.gamma, owner.gamma_optimizer,
                                  owner.validation if isinstance(owner.validation, nn.Module) else None)
        return Saved(state, owner.num_calls, owner.num_meta_steps, owner.num_skipped, owner.last_meta,
                     rng_state(owner.gamma.device, model_generators(self.module)))

    def rollback(self, owner: Owner, saved: Saved, *, buffers: bool = True) -> None:
        """Put back ``saved``: the buffers and the random generators (unless ``buffers=False``: the weighter's
        own state only, the model's step standing), gamma, its optimizer, the validation average, the counters
        and the last meta step's record. A call refused or raised so draws the same random numbers again when
        it is made again (its dropout masks), as a run without the refused call would."""
        if buffers:
            self.buffers.restore()
            if saved.rng is not None:
                set_rng_state(saved.rng, owner.gamma.device)
        if saved.state is not None:
            saved.state.restore(owner.gamma)
        owner.num_calls, owner.num_meta_steps, owner.num_skipped = saved.num_calls, saved.num_meta_steps, \
            saved.num_skipped
        owner.last_meta = saved.last_meta

    def keep_model_step(self, owner: Owner, saved: Saved) -> int:
        """An error after the model's step, found finite: the step stands and is counted; gamma, its optimizer,
        the validation average and the other counters are put back (the buffers are the step's). Returns
        ``num_calls``."""
        calls = owner.num_calls
        self.rollback(owner, saved, buffers=False)
        owner.num_calls = calls
        return calls

    def flag(self, loss: Tensor) -> Tensor:
        """On the device, no host read: 1 (shape ``[1]``) unless the loss, every gradient and every
        floating-point buffer the forward changed are finite on every rank (one all-reduce under DDP)."""
        grads = [p.grad for _, p in walk(self.module).parameters]
        flag = nonfinite_flag(loss, grads)
        flag = (flag + self.buffers.became_nonfinite(flag.device)).clamp_max(1.0)
        return self.reducer.mean([flag])[0]

    def decide(self, owner: Owner, loss: Tensor, terms: Tensor, meta: Sequence[Tensor] = (),
               flag: Tensor | None = None, gamma: Tensor | None = None) -> ModelStep:
        """The step's one decision and the numbers of its record, in one read back to the host: whether the
        loss, every gradient and every floating-point buffer are finite on every rank (:meth:`flag`, or
        ``flag`` taken before), the loss, the terms and gamma (``owner.gamma``, or ``gamma``: the one the
        step was taken with, where a meta step has moved it since); and ``meta``, a pending meta step's values."""
        if flag is None:
            flag = self.flag(loss)
        values = host_read([flag, loss, terms, owner.gamma if gamma is None else gamma, *meta])
        n = owner.gamma.numel()
        return ModelStep(finite=values[0] == 0.0, loss=values[1],
                         terms=dict(zip(owner.term_names, values[2:2 + n])),
                         gamma=dict(zip(owner.term_names, values[2 + n:2 + 2 * n])), meta=values[2 + 2 * n:])

    def refuse(self, owner: Owner, step: ModelStep, saved: Saved) -> str:
        """A non-finite model step: put everything back as ``saved``, then raise or warn and count it.
        Returns the message (``nonfinite="skip"``)."""
        from metaweight._checks import half_precision_eps_hint, masked_label_hint  # (_checks reads through host_read)

        owner.optimizer.zero_grad(set_to_none=True)
        self.rollback(owner, saved)
        message = (f"The weighted training loss ({step.loss}), its gradient or a buffer the forward "
                   f"updated (e.g. BatchNorm statistics) is not finite "
                   f"(non-finite terms: {[n for n, t in step.terms.items() if not math.isfinite(t)] or 'none'}"
                   f"). The step was not taken: parameters, buffers, optimizer state, gamma and the validation "
                   f"average are as before this call. Check the batch and the learning rate."
                   f"{masked_label_hint(step.terms)}"
                   f"{half_precision_eps_hint(getattr(owner, '_inner_optimizer', owner.optimizer))}")
        raise_or_skip_step(owner, message)
        return message


def explained(exc: Exception, named: list[tuple[str, Tensor]], why: str,
              optimizer: torch.optim.Optimizer | None = None) -> Exception:
    """``exc``, or a ValueError saying what to do where sparse gradients caused it, or (given the
    ``optimizer``) optimizer state in another dtype or on another device than its parameter."""
    if any(p.grad is not None and p.grad.layout != torch.strided for _, p in named):
        return ValueError(sparse_message(named, why) + " gamma, the parameters, buffers and optimizer state are "
                                                       "unchanged.")
    if optimizer is not None:
        from metaweight._optimizers import check_optimizer_state  # (the whole check: on this failure's path only)

        try:
            check_optimizer_state(optimizer, after_failed_step=True)
        except ValueError as cause:
            return cause
    return exc
