r"""``mode="fast"``, two-call form: how the user's own step was taken, read from the loop itself.

In the two-call form the look-ahead *is* the user's step, :math:`\theta' = \theta - U(T(g))`,
where :math:`g` is what the backwards left in ``.grad`` and :math:`T` whatever the loop did to
it before ``optimizer.step()``. The meta-gradient of that step is

.. math::
    \frac{\partial L_{val}(\theta')}{\partial \gamma_k}
      = -\sum_i m_i \big\langle J_T^\top (D \odot v),\; \nabla L_k^{(i)}(\theta) \big\rangle ,

summed over the losses :math:`i` that :meth:`HarmonizedWeighter.loss` returned and the loop
backpropagated with the factor :math:`m_i` (``(loss / 4).backward()``: 1/4; a ``GradScaler``: its
scale), :math:`v = \nabla L_{val}(\theta')` and :math:`D` the optimizer's diagonal Jacobian. What
this module reads, without changing anything the loop sees:

* :math:`m_i`: a hook on each returned loss tensor (the gradient it receives in backward);
* :math:`g`: the gradients at the end of each backward (an engine callback), kept by value;
* :math:`T`: at the optimizer's step pre-hook, the gradients the optimizer gets are compared
  with :math:`g`. Unchanged: :math:`J_T = I`. A common rescale :math:`s` of every gradient, with
  :math:`r = s \sum_i m_i` (the rescale relative to the losses' own scale): :math:`r = 1` is
  unscaling (``GradScaler.unscale_``; :math:`J_T = sI`); clipping by norm declared with
  :class:`~metaweight.ClipGradNorm` is checked against the gradients the optimizer got and
  differentiated through (:mod:`metaweight._clipping`). Any other rescale is refused: from one
  step, a factor below 1 fits ``clip_grad_norm_`` of every norm and ``p.grad.mul_(c)`` alike, each
  with another Jacobian. So is anything that is not a common rescale (value clipping, clipping
  part of the parameters, noise);
* the random numbers, train/eval modes and inputs of the training forward: a forward pre-hook
  and hook on the model record, for each forward with gradients enabled, the state of every
  generator it can draw from (:mod:`metaweight._randomness`) before it, whether it drew from
  them, whether a generator appeared during it, and its inputs; ``loss()`` takes the record of
  the forward its outputs came from.
"""

from __future__ import annotations

import dataclasses
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.autograd import Variable
from torch.utils._pytree import tree_leaves

from metaweight._hooks import OwnHook
from metaweight._moves import FROZEN_WITH_GRAD, fingerprint, frozen_with_grad, moved, outside_model
from metaweight._randomness import RngState, model_generators, new_generators, rng_state, same_rng_state

TOLERANCE = 1e-6  # relative: a rescale that far from 1 is a rescale; a residual that large is no rescale


def module_modes(module: nn.Module) -> tuple[bool, ...]:
    return tuple(m.training for m in module.modules())


@dataclasses.dataclass
class ForwardRecord:
    """One forward of the user's model: the generators' state before it, whether it drew random
    numbers (dropout, stochastic depth, functional dropout: any consumer), the modules' modes, the
    inputs it got (the tensors and their versions), its outputs (weakly, to be told apart from other
    forwards') and where a generator was created or replaced during it (its start state unknown)."""

    start: RngState
    drew: bool
    modes: tuple[bool, ...]
    inputs: list[tuple[Tensor, int, Tensor | None]] = dataclasses.field(default_factory=list)
    outputs: list[weakref.ref] = dataclasses.field(default_factory=list)
    appeared: list[str] = dataclasses.field(default_factory=list)
    # an output that died before loss() (the loop kept only a copy of it, [o.clone() for o in model(x)]):
    # its shape and value fingerprint, taken as it died
    gone: dict[int, tuple[torch.Size, torch.device, Tensor]] = dataclasses.field(default_factory=dict)
    taken: bool = False
    stateful: list[str] = dataclasses.field(default_factory=list)  # buffers it changed, BatchNorm's statistics
    #                                                                     aside (spectral_norm's vectors)
    versions: list[int] = dataclasses.field(default_factory=list)
    grads: list[bool] = dataclasses.field(default_factory=list)

    def watch_outputs(self, leaves: list[Tensor]) -> None:
        """Hold the outputs weakly; an output that dies while this record waits for ``loss()`` leaves its
        fingerprint (two reductions, only then)."""
        self.outputs = [weakref.ref(t) for t in leaves]
        self.versions = [t._version for t in leaves]  # (changed in place before loss(): not the forward's outputs)
        self.grads = [t.requires_grad for t in leaves]  # (a copy of one that did must carry its gradient)
        me = weakref.ref(self)
        for i, t in enumerate(leaves):
            weakref.finalize(t, _output_died, me, i, t.detach())

    def made(self, leaves: list[Tensor]) -> bool:
        """Whether these tensors are this forward's outputs as it returned them: the same tensors (or
        copies of them: a clone, a cast to float32), in the forward's order (some may be left out).
        Outputs transformed before the loss (a temperature, a prior added, exits reordered) are not,
        nor outputs whose gradient path was cut (``.detach()``, on all or part of them): the look-ahead
        recomputes the forward's own outputs, so their meta-gradient would be another."""
        mine = [r() for r in self.outputs]
        j = 0
        for leaf in leaves:
            while j < len(mine) and not _same_output(mine[j], leaf, self.gone.get(j),
                                                    self.versions[j] if j < len(self.versions) else None,
                                                    j < len(self.grads) and self.grads[j]):
                j += 1
            if j == len(mine):
                return False
            j += 1
        return bool(leaves)


def value_print(t: Tensor) -> Tensor:
    """On the device, float64: the sum and the norm of ``t``'s values (any dtype), to tell equal values
    from changed ones without a read."""
    with torch.no_grad():
        t = t.detach()
        if not t.is_floating_point():
            t = t.to(torch.float64)
        return torch.stack([t.sum(dtype=torch.float64), torch.linalg.vector_norm(t, dtype=torch.float64)])


def values_print(tree: Any) -> Tensor | None:
    """:func:`value_print` of every tensor in ``tree``, concatenated (``None`` for none)."""
    leaves = [t for t in tensor_leaves(tree) if not t.is_complex()]
    if not leaves:
        return None
    device = leaves[0].device
    return torch.cat([value_print(t).to(device) for t in leaves])


def _output_died(record: weakref.ref, i: int, alias: Tensor) -> None:
    r = record()
    if r is not None and not r.taken and alias.is_floating_point():
        r.gone[i] = (alias.shape, alias.device, value_print(alias))


# the autograd nodes that move values without computing (a clone, a cast, views, reshapes): made of the output
# by these alone, a tensor of its shape and values carries its gradient unchanged (shape and values are checked)
_COPIES = frozenset({"CloneBackward0", "ToCopyBackward0", "AliasBackward0", "ViewBackward0", "UnsafeViewBackward0",
                     "ReshapeAliasBackward0", "ExpandBackward0", "SqueezeBackward0", "SqueezeBackward1",
                     "SqueezeBackward2", "UnsqueezeBackward0", "SliceBackward0", "SelectBackward0", "TBackward0",
                     "TransposeBackward0", "PermuteBackward0", "AsStridedBackward0", "UnbindBackward0",
                     "SplitBackward0", "SplitWithSizesBackward0"})


def _copied_from(leaf: Tensor, output: Tensor | None) -> bool:
    """Whether ``leaf`` is made from ``output`` by copies alone (:data:`_COPIES`); for an output that is
    gone, from some tensor by at least one copy."""
    node, target, copies = leaf.grad_fn, None if output is None else output.grad_fn, 0
    while node is not None:
        if output is not None and (node is target or getattr(node, "variable", None) is output):
            return True
        if type(node).__name__ not in _COPIES:
            return output is None and copies > 0
        inputs = [f for f, _ in node.next_functions if f is not None]
        if len(inputs) != 1:
            return False
        node, copies = inputs[0], copies + 1
    return False


def _same_output(output: Tensor | None, leaf: Tensor,
                 gone: tuple[torch.Size, torch.device, Tensor] | None = None, version: int | None = None,
                 grad: bool = False) -> bool:
    if output is None:  # the forward's output is gone: a copy of it (equal values), or something made from it
        if gone is None or gone[0] != leaf.shape or gone[1] != leaf.device or not leaf.is_floating_point():
            return False
        if grad and not _copied_from(leaf, None):  # (its gradient path cut, or not a copy)
            return False
        a, b = gone[2], value_print(leaf.detach())
        return bool(torch.allclose(a, b, rtol=1e-12, atol=0.0, equal_nan=True))  # (off the usual path)
    if output is leaf:
        return version is None or leaf._version == version  # (z /= 2 in place: another output)
    if output.shape != leaf.shape or output.device != leaf.device:
        return False
    if output.requires_grad and not _copied_from(leaf, output):  # detached, or made by more than copies
        return False
    with torch.no_grad():  # a copy or a cast: equal values (one read, off the usual path)
        return bool(torch.equal(output.detach().to(leaf.dtype), leaf.detach())) and bool(
            torch.equal(leaf.detach().to(output.dtype), output.detach()))


def _state_buffers(module: nn.Module) -> list[tuple[str, Tensor, int]]:
    """The buffers a forward may change and read (all but BatchNorm's running statistics, which a
    training-mode forward writes and does not read), with their names and versions."""
    return [(f"{prefix}.{name}" if prefix else name, b, b._version) for prefix, m in module.named_modules()
            if not isinstance(m, _BatchNorm) for name, b in m._buffers.items() if b is not None]


def version_of(t: Tensor) -> int | None:
    """``t``'s version counter; ``None`` for a tensor made under ``torch.inference_mode()``, which keeps none (a
    change to it is seen by the values' fingerprint alone)."""
    return None if t.is_inference() else t._version


def tensor_leaves(tree: Any) -> list[Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, Tensor)]


class _Inert(OwnHook):
    """Copies and pickles of the user's model or optimizer carry our hooks inert."""

    _ref: Callable[[], Any]

    def __deepcopy__(self, memo: dict) -> _Inert:
        inert = type(self).__new__(type(self))
        inert._ref = lambda: None
        return inert

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._ref = lambda: None


def drop_inert_hooks(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Remove from ``model`` and ``optimizer`` the hooks of ours tied to no weighter: a dropped weighter's (a
    later weighter on the same model: Lightning's next fit, a notebook cell run again) or a copy's inert ones.
    Each weighter built on the model left two forward hooks there for good, called at every forward."""
    for hooks, extras in ((model._forward_pre_hooks, ("_forward_pre_hooks_with_kwargs",)),
                          (model._forward_hooks, ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
                          (optimizer._optimizer_step_pre_hooks, ()), (optimizer._optimizer_step_post_hooks, ())):
        for key, hook in list(hooks.items()):
            owner = hook.__self__ if isinstance(hook, types.MethodType) else hook
            if isinstance(owner, _Inert) and owner._ref() is None:
                del hooks[key]
                for extra in extras:
                    getattr(model, extra, {}).pop(key, None)


class ForwardWatch(_Inert):
    """A forward pre-hook and hook on the user's model, ``mode="fast"`` only: the records of its last
    few forwards with gradients enabled, for :meth:`HarmonizedWeighter.loss` to take the one its
    outputs came from. Each forward costs a scan of the modules' attributes for generators and two
    reads of every generator's state."""

    KEEP = 4  # forwards between the training forward and loss() (logging, another view)

    def __init__(self, weighter: Any, device: torch.device) -> None:
        self._ref = weakref.ref(weighter)
        self.device = device
        self._open: list[Any] = []  # per open forward: generators' state, generators, inputs, buffers
        self.records: list[ForwardRecord] = []
        self.dropped: list[ForwardRecord] = []  # records pushed out before any loss() took them (inputs let go)
        self.paused = False  # the weighter's own forwards need no record

    # Run eagerly when the loop calls the model through torch.compile (``torch.compile(model)(x)`` with the plain
    # model handed to the weighter): traced, the hooks would record tracing-time values, and dynamo refuses
    # the weakref finalizers they register ("Guard failed on the same frame it was created").
    @torch.compiler.disable
    def before(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        weighter = self._ref()
        if weighter is None:  # a copy's inert hook
            return
        if self.paused or not torch.is_grad_enabled():
            self._open.append(None)
            return
        generators = model_generators(weighter.module)
        # the inputs, their versions and values (a loader may write the next batch into the same buffer
        # without a version change: torch.from_numpy, .data)
        inputs = [(t, version_of(t), value_print(t) if not t.is_complex() else None)
                  for t in tensor_leaves((args, kwargs))]
        self._open.append((rng_state(self.device, generators), generators, inputs, _state_buffers(weighter.module)))

    @torch.compiler.disable
    def after(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        weighter = self._ref()
        if weighter is None:
            return
        opened = self._open.pop() if self._open else None
        if opened is None:
            return
        start, generators, inputs, buffers = opened
        drew = not same_rng_state(start, rng_state(self.device, generators))
        record = ForwardRecord(start, drew, module_modes(weighter.module), inputs, [],
                               new_generators(weighter.module, generators))
        record.stateful = [n for n, b, v in buffers if b._version != v]
        record.watch_outputs(tensor_leaves(output))
        for old in self.records[:-(self.KEEP - 1)]:  # pushed out: kept only to say so at loss() (see unseen)
            if not old.taken:
                old.taken, old.inputs = True, []
                self.dropped = [*self.dropped[-(self.KEEP - 1):], old]
        self.records = [*self.records[-(self.KEEP - 1):], record]

    def take(self, outputs: Any) -> ForwardRecord | None:
        """The record of the forward ``outputs`` came from (``None`` for none). The records stay until
        :meth:`forget` (at ``meta_step``) or until newer forwards push them out: a ``loss()`` whose result no
        backward reaches (logging, on these outputs or another forward's) takes a record as well, and
        another ``loss()`` on the same forward's outputs must find it again; which ``loss()`` counts, the
        backward decides (:func:`watch_backward`). The records before the one taken no longer fingerprint
        outputs that die (as when they were forgotten here)."""
        leaves = tensor_leaves(outputs)
        for k in range(len(self.records) - 1, -1, -1):
            if self.records[k].made(leaves):
                for r in self.records[:k + 1]:
                    r.taken = True  # (no fingerprint for outputs dying from now on)
                return self.records[k]
        return None

    def unseen(self, outputs: Any) -> str | None:
        """Why no record holds the forward ``outputs`` came from, where the watch can tell: more forwards with
        gradients enabled came between it and ``loss()`` than it keeps (``None`` where it cannot tell)."""
        leaves = tensor_leaves(outputs)
        if any(r.made(leaves) for r in self.dropped):
            return _PUSHED_OUT.format(keep=self.KEEP)
        return None

    def forget(self) -> None:
        """The iteration is over (``meta_step``): no later ``loss()`` takes its forwards' records (their inputs
        are let go)."""
        self.records, self.dropped = [], []


_PUSHED_OUT = ("The outputs given to weighter.loss came from a forward of the model that more than {keep} other forwards "
               "with gradients enabled followed before that loss() (for logging, another view): mode='fast' keeps the "
               "records (random numbers, modes, inputs) of the last {keep} forwards only. Run the other forwards under "
               "torch.no_grad(), or call weighter.loss sooner after the training forward. gamma is unchanged.")


@dataclasses.dataclass
class Micro:
    """One loss that :meth:`HarmonizedWeighter.loss` returned: ``factor`` is the gradient it got in
    backward (``None`` until then)."""

    outputs: Any
    terms: Tensor
    target: Any
    low: bool
    forward: ForwardRecord | None
    factor: Tensor | None = None
    target_versions: tuple[int | None, ...] = ()  # the labels' versions at loss(): changed in place since, if they differ
    target_print: Tensor | None = None  # and their values' fingerprint (a buffer rewritten without a version)
    params_print: Tensor | None = None  # the parameters' fingerprint at this loss() (metaweight._moves)
    since: GradSnapshot | None = None  # the gradients at this loss(), after an earlier loss's backward ended ...
    since_of: GradSnapshot | None = None  # ... that one (Pending.after_backward then)
    clears: bool = False  # they had changed since that backward's end: the earlier losses are not in this step
    muddled: bool = False  # they had changed since by something other than a zeroing (refused if its backward comes)
    unseen: str | None = None  # why no forward record was found for its outputs, where the watch could tell

    def __post_init__(self) -> None:
        if not self.target_versions:
            self.target_versions = tuple(version_of(t) for t in tensor_leaves(self.target))
        if self.target_print is None:
            self.target_print = values_print(self.target)

    def target_changed(self) -> bool:
        """Whether the labels were changed in place since :meth:`HarmonizedWeighter.loss` got them."""
        return tuple(version_of(t) for t in tensor_leaves(self.target)) != self.target_versions


@dataclasses.dataclass
class GradSnapshot:
    """The gradients at the end of a backward: the objects and their versions (to see cheaply whether
    anything touched them since) and their values."""

    refs: list[tuple[Tensor | None, int]]
    values: list[Tensor | None]
    names: list[str] | None = None  # the parameters that required gradients then
    # on the device, one flag per gradient that had values then (``rows``: each gradient's, -1 for none): whether it
    # held a nonzero value
    nonzero: Tensor | None = None
    rows: list[int] | None = None

    @staticmethod
    def of(grads: Sequence[Tensor | None], names: list[str] | None = None) -> GradSnapshot:
        present = [g for g in grads if g is not None]
        copies = iter(torch._foreach_mul(present, 1.0) if present else [])
        return GradSnapshot(GradSnapshot.refs_of(grads).refs, [next(copies) if g is not None else None for g in grads],
                            names)

    @staticmethod
    def refs_of(grads: Sequence[Tensor | None], nonzero: bool = False) -> GradSnapshot:
        """The objects and versions only (for :meth:`changed`; no values copied); with ``nonzero``, also whether
        each gradient holds a nonzero value, on the device in one tensor (for :meth:`zeroed`: a few ops over the
        whole list, no host read)."""
        snapshot = GradSnapshot([(g, g._version if g is not None else -1) for g in grads], [])
        if nonzero:
            present = [i for i, g in enumerate(grads) if g is not None and g.numel()]
            snapshot.rows = [-1] * len(grads)
            for row, i in enumerate(present):
                snapshot.rows[i] = row
            if present:
                with torch.no_grad():  # (the 2-norm, the cheapest on every device: a gradient whose squares
                    # underflow, all below about 1e-19, reads as zeros here and in zeroing's test alike, so is no
                    # zeroing there, as one holding zeros is not)
                    norms = torch._foreach_norm([dense_values(grads[i]) for i in present])
                    snapshot.nonzero = _stacked(norms) != 0
        return snapshot

    def changed(self, grads: Sequence[Tensor | None]) -> bool:
        return len(grads) != len(self.refs) or any(
            g is not ref or (g is not None and g._version != version) for g, (ref, version) in zip(grads, self.refs))

    def zeroed(self, grads: Sequence[Tensor | None]) -> bool:
        """Whether a ``zero_grad`` came since these references were taken (:meth:`zeroing`)."""
        return self.zeroing(grads)[0]

    def zeroing(self, grads: Sequence[Tensor | None]) -> tuple[bool, bool]:
        """Whether a ``zero_grad`` came since these references were taken: a gradient present then is ``None``
        now (``set_to_none=True``, the default), or one present then and written since (in place, or another
        object) is all zeros where it held a nonzero value then (``set_to_none=False``; where :meth:`refs_of`
        took no ``nonzero``, every such gradient is all zeros: one that held zeros then and was scaled since, by
        clipping, is no zeroing). A gradient written since with values is no
        zeroing: a backward adding to it (another loss's; or, in the backward reaching a training ``loss()``, its
        own writes to parameters only other losses of the sum reach, which autograd may finish before the hook on
        that loss runs); nor is one that held zeros then and holds zeros now (such a backward adding zeros, e.g.
        ``0 * p.sum()`` for a parameter the weighted loss does not reach: clearing it would change nothing).
        And whether that zeroing was partial: with ``nonzero``, a gradient that held a nonzero value then is the
        same object at the same version now (untouched, so not zeroed); without, any gradient present then with
        values is (a ``zero_grad`` clears every one: this is a part of the model's, e.g. one frozen in the loop).
        Python objects, and one host read only where a gradient was written since."""
        if len(grads) != len(self.refs):
            return True, False
        written, then, untouched = [], [], []
        gone = kept_plain = False  # (kept_plain: without flags, a gradient with values untouched)
        rows = self.rows
        for i, (g, (ref, version)) in enumerate(zip(grads, self.refs)):
            row = rows[i] if rows is not None else -1
            if g is None:
                gone = gone or ref is not None
            elif (g is not ref or g._version != version) and g.numel():
                if ref is not None and (rows is None or row >= 0):  # (none then, or no value: no sign of a
                    # zeroing, which leaves a missing gradient missing; a backward's write)
                    written.append(dense_values(g))
                    then.append(row)
            elif row >= 0:
                untouched.append(row)
            elif rows is None and ref is not None and g.numel():
                kept_plain = True
        if not written and not (gone and untouched):
            return gone, gone and kept_plain
        with torch.no_grad():
            flags = self.nonzero
            device = flags.device if flags is not None else written[0].device
            zero = torch.tensor(False, device=device)
            if written:
                # with flags, the 2-norm they were taken with; without, the 1-norm: no squares to underflow (a
                # GradScaler's gradients at a scale below 1 read as zeros by the 2-norm), a third of the max's cost
                now = _stacked(torch._foreach_norm(written, 2 if flags is not None else 1), device) == 0
                if flags is not None:
                    now = now & flags[torch.tensor(then, device=device)]
                zero = now.any() if flags is not None else now.all()
            kept = flags[torch.tensor(untouched, device=device)].any() if untouched else zero.new_tensor(False)
            zeroed, partial = torch.stack([zero | gone, kept]).tolist()
        return bool(zeroed), bool(zeroed) and (bool(partial) or kept_plain)


def _stacked(norms: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """Scalars (``torch._foreach_norm``'s, one per tensor) as one float32 tensor on ``device`` (the first one's)."""
    device = norms[0].device if device is None else device
    if all(n.device == device for n in norms):
        return torch.stack(list(norms)).float()  # (stack promotes mixed dtypes)
    return torch.stack([n.to(device, torch.float32) for n in norms])


def dense_values(g: Tensor) -> Tensor:
    """A gradient's values as a strided tensor (a sparse one's coalesced values)."""
    return g if g.layout == torch.strided else g.coalesce().values()


@dataclasses.dataclass
class Pending:
    """From :meth:`HarmonizedWeighter.loss` to :meth:`HarmonizedWeighter.meta_step`: the losses, the
    gradients as backward left them, and what the step pre-hook captured: the parameters before
    the step (``theta``), the step's diagonal Jacobian (``jac``), and the gradients' rescale."""

    micro: list[Micro]
    after_backward: GradSnapshot | None = None
    cleared: Tensor | None = None  # on the device: whether what changed between backwards was a zeroing
    theta: dict[str, Tensor] | None = None
    jac: list[Tensor | float] | None = None
    rescale: Tensor | None = None  # on the device: [is a common rescale, s, |T(g)|^2]
    seen: list[Tensor | None] | None = None  # g, whose direction a common rescale keeps
    outside: list[Tensor | None] | None = None  # the gradients of trainable parameters no optimizer holds, if any
    inv_scale: Tensor | None = None  # 1 / the scale a fused optimizer unscales by inside its step
    error: str | None = None
    names: list[str] | None = None  # the parameters that required gradients at the step
    presence: list[str] | None = None  # those with a gradient at the step but none after backward, or the reverse
    moved_before: Tensor | None = None  # on the device: whether they moved between loss() and the step
    end_print: Tensor | None = None  # their fingerprint as the step left them
    stepped_on: bool = False  # the optimizer stepped while error was set (nothing captured)
    # the trainable tensors outside the model the optimizer stepped with a gradient, and on the device whether each
    # gradient was nonzero (a criterion's parameter; meta_step judges them, as a zero_grad may have cleared them)
    stepped_outside: tuple[list[Tensor], Tensor] | None = None
    outside_print: Tensor | None = None  # their fingerprint before the step (read where the step is not reproduced)

    def stepped(self) -> list[Micro]:
        """The losses whose backward the step used, in order."""
        return [m for m in self.micro if m.factor is not None]


def grads_of(named: Sequence[tuple[str, Tensor]]) -> list[Tensor | None]:
    return [p.grad for _, p in named]


def watch_backward(weighter: Any, pending: Pending, micro: Micro, loss: Tensor) -> None:
    """Hook ``loss`` so that its backward records its factor and, at the end, the gradients. What changed in the
    gradients since the last backward's end is first looked at here, at ``loss()``, before anything of this loss's
    own backward is written (:meth:`GradSnapshot.zeroed`)."""
    ref = weakref.ref(weighter)
    if weighter._let_go is not None or pending.after_backward is not None:
        grads = grads_of(weighter._trainable())
        if weighter._let_go is not None:  # (what comes after this loss() is looked at by its backward's hook)
            weighter._let_go = None if weighter._let_go.zeroed(grads) else GradSnapshot.refs_of(grads, True)
        if pending.after_backward is not None and any(m.factor is not None for m in pending.micro if m is not micro):
            if pending.after_backward.changed(grads):  # a zero_grad since the earlier losses' backward, or else
                if bool(_all_zero(grads, None)):  # (one host read, where they changed)
                    micro.clears = True
                else:  # (not known to be no transform of them, e.g. clipping each micro-batch: refused at meta_step
                    # once this loss's backward comes; a loss() no backward reaches, for logging, is no micro-batch)
                    micro.muddled = True
            micro.since, micro.since_of = GradSnapshot.refs_of(grads, True), pending.after_backward

    def snapshot() -> None:
        w = ref()
        if w is None or w._pending is not pending or pending.theta is not None:
            return
        named = w._trainable()
        grads = grads_of(named)
        if any(g is not None and g.layout != torch.strided for g in grads):
            pending.error = sparse_message(named)
            return
        pending.after_backward = GradSnapshot.of(grads, [n for n, _ in named])

    def on_gradient(grad: Tensor) -> None:
        w = ref()
        if w is None or w._pending is not pending or pending.theta is not None:
            return
        earlier = [m for m in pending.micro if m.factor is not None and m is not micro]
        let_go, w._let_go = w._let_go, None
        if let_go is not None and not earlier and not let_go.zeroed(grads_of(w._trainable())):
            pending.error = LET_GO  # (no zero_grad since: this backward adds to the gradients of losses let go)
        if earlier and pending.after_backward is not None:
            grads = grads_of(w._trainable())
            if micro.since is not None and micro.since_of is pending.after_backward:  # looked at in loss()
                cleared, partial = micro.since.zeroing(grads)
                cleared = micro.clears or cleared
                if partial or (micro.muddled and not cleared):  # (some gradients zeroed, others not; or changed
                    # otherwise since the earlier backward: not known to be no transform of them; refused)
                    pending.cleared = torch.tensor(False)
            else:  # (loss() came before the earlier backward ended: what changed since that end)
                cleared = pending.after_backward.changed(grads)
                if cleared:
                    pending.cleared = _all_zero(grads, pending.cleared)
            if cleared:  # a zero_grad between two backwards: the earlier losses are not in this step
                for m in earlier:
                    m.factor = None
        micro.factor = grad.detach().clone() if micro.factor is None else micro.factor + grad.detach()
        # twice deferred: after DistributedDataParallel's own end-of-backward callback has averaged
        Variable._execution_engine.queue_callback(lambda: Variable._execution_engine.queue_callback(snapshot))

    loss.register_hook(on_gradient)


def _all_zero(grads: Sequence[Tensor | None], cleared: Tensor | None) -> Tensor:
    """``cleared`` and whether the present gradients are all zeros, on the device: what changed between two
    backwards was a zeroing (or else the step's meta-gradient is not known: refused at ``meta_step``)."""
    present = [g for g in grads if g is not None and g.numel()]  # (an empty one is all zeros; it has no max)
    # (the 1-norm: no squares to underflow, as a GradScaler's gradients at a scale below 1 would; the max's is
    # three times slower on the CPU)
    zero = torch.stack(torch._foreach_norm(present, 1)).sum() == 0 if present else torch.tensor(True)
    return zero if cleared is None else cleared & zero


LET_GO = ("This backward accumulates onto gradients of earlier weighter.loss calls whose meta_step already ran and "
          "was skipped, the optimizer having not stepped (gradient accumulation with a meta_step after every "
          "micro-batch): the step to come uses the whole batch, and a meta_step scoring its last micro-batch would "
          "score another step than the one taken. Call weighter.meta_step once per optimizer step, after it, with "
          "the whole batch (the micro-batches' inputs and labels concatenated in order); with Accelerate, under "
          "`if accelerator.sync_gradients:`.")


def sparse_trained(embeddings: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """The names of those of ``embeddings`` (``nn.Embedding`` and ``nn.EmbeddingBag`` modules, by name: a
    walk's :attr:`~metaweight._walk.ModelWalk.embeddings`) that give a sparse gradient now: ``sparse=True``
    and a trained weight (``requires_grad``; a frozen embedding gives no gradient and is no obstacle). Read
    at every call: either may be switched between steps."""
    return [name for name, m in embeddings if m.sparse and m.weight.requires_grad]


def sparse_message(named: Sequence[tuple[str, Tensor]],
                   why: str = "mode='fast' replays the optimizer's step on dense gradients only") -> str:
    sparse = [n for n, p in named if p.grad is not None and p.grad.layout != torch.strided]
    return (f"The parameters {sparse} have sparse gradients (e.g. nn.Embedding(..., sparse=True)): {why}. Build the "
            f"embedding with sparse=False, or use mode='exact' with backend='higher' or 'finite_difference' and call "
            f"meta_step in your own loop.")


def requires_grad_message(before: Sequence[str], after: Sequence[str], between: str) -> str:
    """Which parameters started or stopped requiring gradients between two points of the loop."""
    started = [n for n in after if n not in set(before)]
    stopped = [n for n in before if n not in set(after)]
    return (f"Between {between} the parameters that require gradients changed (now requiring them: {started}; no "
            f"longer: {stopped}): the step's meta-gradient is over the parameters it stepped. Change requires_grad "
            f"after meta_step (or before the iteration's forward).")


@torch.no_grad()
def rescale_between(before: Sequence[Tensor | None], after: Sequence[Tensor | None]) -> Tensor:
    """``[is a common rescale, s, |after|^2]`` on the device, float64: whether ``after = s * before``
    for one ``s > 0`` (to :data:`TOLERANCE` relative), with ``s`` fitted by least squares."""
    pairs = [(a, b) for a, b in zip(before, after) if a is not None or b is not None]
    if not pairs:
        return torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    device = next(t for pair in pairs for t in pair if t is not None).device
    if any((a is None) != (b is None) for a, b in pairs):
        return torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64, device=device)
    a = torch.cat([t.reshape(-1).double() for t, _ in pairs])
    b = torch.cat([t.reshape(-1).double() for _, t in pairs])
    aa, ab, bb = a @ a, a @ b, b @ b
    s = torch.where(aa > 0, ab / torch.where(aa > 0, aa, 1.0), 1.0)
    residual = (b - s * a).square().sum()
    both_zero = (aa == 0) & (bb == 0)
    # a rescale rounds each entry once: half-precision gradients get a tolerance of their own rounding
    tolerance = max(TOLERANCE, 16 * max(torch.finfo(t.dtype).eps for t, _ in pairs))
    common = both_zero | ((residual <= tolerance**2 * bb) & (s > 0) & (aa > 0))
    return torch.stack([common.double(), s, bb])


class StepCapture(_Inert):
    """The optimizer step pre-hook of ``mode="fast"``: before the step the optimizer is about to take
    on the weighted loss of :meth:`HarmonizedWeighter.loss`, keep the parameters, the step's
    diagonal Jacobian and how the gradients it gets differ from what backward left. Holds the
    weighter weakly; copies of the optimizer get an inert hook. Never raises into the user's step:
    what it cannot read is reported by ``meta_step``."""

    def __init__(self, weighter: Any, before_step: Callable[..., tuple[dict[str, Tensor], list[Tensor | float]]]
                 ) -> None:
        self._ref = weakref.ref(weighter)
        self._before_step = before_step

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        weighter = self._ref()
        if weighter is None or optimizer is not weighter._inner_optimizer:
            return None
        # args are step()'s positional arguments, the optimizer itself first
        closure = (kwargs or {}).get("closure") or (args[1] if len(args) > 1 else None)
        if closure is None:
            self._capture(weighter, optimizer)
            return None

        def then_capture() -> Any:  # a closure (Lightning) runs the forward and backward inside step()
            result = closure()
            self._capture(weighter, optimizer)
            return result

        if kwargs and "closure" in kwargs:
            return args, {**kwargs, "closure": then_capture}
        return (args[0], then_capture, *args[2:]), kwargs

    def _capture(self, weighter: Any, optimizer: torch.optim.Optimizer) -> None:
        pending: Pending | None = weighter._pending
        if pending is None and weighter._let_go is not None and \
                not weighter._let_go.zeroed(grads_of(weighter._trainable())):
            # this step uses the gradients of loss() calls whose meta_step came before it (and was skipped, with
            # nothing to score): the loop calls meta_step before optimizer.step(), or after every micro-batch of an
            # accumulated step, so no meta step would ever score a step; the next meta_step refuses
            weighter._stepped_let_go = True
        if pending is not None and pending.error is not None:
            pending.stepped_on = True  # (a refused step: nothing captured, but meta_step must know it came)
        if pending is None or pending.theta is not None or pending.error is not None:
            return
        found_inf = getattr(optimizer, "found_inf", None)  # a GradScaler stepping a fused optimizer
        if found_inf is not None and float(found_inf) > 0:
            return
        try:
            named = weighter._trainable()
            grads = grads_of(named)
            if any(g is not None and g.layout != torch.strided for g in grads):
                pending.error = sparse_message(named)
                return
            scale = getattr(optimizer, "grad_scale", None)
            if scale is not None:
                pending.inv_scale = 1.0 / scale.double()
                grads = [g / scale.to(g) if g is not None else None for g in grads]
            outside = [p for p in outside_model(optimizer, (p for _, p in named)) if p.grad is not None]
            if outside:  # (no read here: meta_step reads the flags with its own)
                device = weighter.gamma.device
                pending.stepped_outside = (outside, torch.stack([p.grad.ne(0).any().to(device, torch.float32)
                                                                 for p in outside]))
                pending.outside_print = fingerprint(outside)
            frozen = frozen_with_grad(optimizer, weighter.module)
            if frozen:
                pending.error = FROZEN_WITH_GRAD.format(names=frozen[:8])
                return
            names = [n for n, _ in named]
            pending.names = names
            snapshot = pending.after_backward
            if snapshot is not None and snapshot.names is not None and snapshot.names != names:
                pending.error = requires_grad_message(snapshot.names, names, "loss.backward() and optimizer.step()")
                return
            if snapshot is not None:  # compared by value: GradScaler.unscale_ leaves the versions as they were
                # the gradients of parameters the optimizer does not hold move nothing (held fixed): left out
                held = {id(p) for group in optimizer.param_groups for p in group["params"]}
                inside = [id(p) in held for _, p in named]
                then = [g if k else None for g, k in zip(snapshot.values, inside)]
                now = [g if k else None for g, k in zip(grads_of(named), inside)]
                pending.presence = [n for n, a, b in zip(names, then, now) if (a is None) != (b is None)]
                pending.rescale = rescale_between(then, now)
                pending.seen = then  # a common rescale keeps the direction
                # (a clip_grad_norm_ over model.parameters() takes these too, in its norm)
                outside = [None if k else g for g, k in zip(snapshot.values, inside)]
                pending.outside = outside if any(g is not None for g in outside) else None
            pending.theta, pending.jac = self._before_step(optimizer, named, grads, weighter.gamma, weighter._active)
            # every loss the step used was taken at the parameters the step starts from (not at a perturbed
            # point, as sharpness-aware minimization's second forward is)
            now_print = fingerprint([p for _, p in named])
            prints = [m.params_print for m in pending.micro if m.factor is not None and m.params_print is not None] \
                or [pending.micro[0].params_print]
            flags = [moved(q, now_print) for q in prints]
            pending.moved_before = torch.stack([f.to(flags[0].device) for f in flags]).any()
            weighter._stepped = None  # an earlier step, superseded
        except Exception as exc:  # noqa: BLE001 - the user's step must go on; meta_step reports it
            pending.theta = None
            pending.error = f"The weighter could not read the optimizer's step ({type(exc).__name__}: {exc})."


class StepEnd(_Inert):
    """The optimizer step post-hook of ``mode="fast"``: the parameters' fingerprint as the step the
    pre-hook captured left them, for ``meta_step`` to see whether anything moved them since
    (:mod:`metaweight._moves`)."""

    def __init__(self, weighter: Any) -> None:
        self._ref = weakref.ref(weighter)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        weighter = self._ref()
        if weighter is None or optimizer is not weighter._inner_optimizer:
            return
        pending: Pending | None = weighter._pending
        if pending is None or pending.theta is None or pending.end_print is not None:
            return
        try:
            pending.end_print = fingerprint([p for _, p in weighter._trainable()])
        except Exception as exc:  # noqa: BLE001 - the user's step must go on; meta_step reports it
            pending.error = f"The weighter could not read the parameters after the step ({type(exc).__name__}: {exc})."
