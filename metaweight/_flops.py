"""Cost of reaching each exit, measured with PyTorch's own FLOP counting rules.

We run one forward under a dispatch mode that counts every op with the rules of
``torch.utils.flop_counter`` (matrix multiplications and convolutions; a multiply-add counts
as 2 FLOPs there) and remembers, for every tensor, which ops and which parameters it depends
on. The cost of exit ``k`` is then the union of what exits ``1..k`` depend on: the shared trunk
is counted once, each head on its own, and nothing about the model's structure is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from metaweight._checks import check_exit_outputs, check_flag, holds_meta, integer_value
from metaweight._modes import eval_mode
from metaweight._protocols import call_model


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


class _Tracer(TorchDispatchMode):
    def __init__(self, params: dict[int, int]) -> None:
        super().__init__()
        self.params = params  # id(parameter) -> index
        self.flops: list[int] = []
        self.ops: dict[int, int] = {}  # id(tensor) -> bitset of ops it depends on
        self.uses: dict[int, int] = {}  # id(tensor) -> bitset of parameters it depends on
        self.keep: list[Tensor] = []  # keep every tensor alive so ids are never reused

    def _deps(self, t: Tensor) -> tuple[int, int]:
        key = id(t)
        if key in self.ops:
            return self.ops[key], self.uses[key]
        index = self.params.get(key)
        return 0, (0 if index is None else 1 << index)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in flop_registry and func is not torch.ops.prim.device.default:
            with self:  # let composite ops decompose into counted ones, as FlopCounterMode does
                result = func.decompose(*args, **kwargs)
                if result is not NotImplemented:
                    return result
        out = func(*args, **kwargs)
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
        ops, uses = 0, 0
        for t in inputs:
            o, u = self._deps(t)
            ops |= o
            uses |= u
        count = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        index = len(self.flops)
        self.flops.append(int(count))
        ops |= 1 << index
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.ops[id(t)], self.uses[id(t)] = ops, uses
                self.keep.append(t)
        return out


@torch.no_grad()
def exit_costs(model: nn.Module, example_input: Any, *, num_exits: int | None = None,
               executed: bool = False) -> ExitCosts:
    """Multiply-adds and parameters needed to reach each exit of ``model``, per sample.

    Two counts, both with the rules of ``torch.utils.flop_counter``:

    * ``executed=False`` (the default): what exit ``k``'s output *depends on* — the least any
      early-exit inference must compute (MSDNet's convention: the finer scales that only later
      exits need are not charged to exit ``k``);
    * ``executed=True``: what :class:`EarlyExit` *runs* for a sample that leaves at exit ``k`` —
      whole stages ``1..k`` and heads ``1..k``, counted while it runs. Use these costs in the
      budgeted curve to predict the FLOPs of real early exit.

    Args:
        model: any multi-exit model (``forward`` returns ``K`` logits tensors); with
            ``executed=True`` one :class:`EarlyExit` can run (``exit_stages()`` or
            :func:`attach_exits`).
        example_input: one input batch; its first dimension is the batch size, and the
            counts are divided by it (use a batch of 1 when the model's cost depends on it).
        num_exits: checked against the model's output when given.
        executed: count what early exit executes instead of what each exit depends on.

    Raises:
        ValueError: the model's parameters on the meta device and ``example_input`` not (or the
            other way round): counting needs both there, or both real; ``executed=True`` with
            either on the meta device.

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
        lazy = exit_costs(model, example_input, num_exits=num_exits)
        return _executed_costs(model, example_input, lazy)
    _check_meta_agrees(model, example_input)
    params = {id(p): i for i, p in enumerate(model.parameters())}
    sizes = [p.numel() for p in model.parameters()]
    tracer = _Tracer(params)
    with eval_mode(model), tracer:
        outputs = call_model(model, example_input, "exit_costs")
    outputs = check_exit_outputs(outputs, num_exits if num_exits is not None else
                                 (len(outputs) if isinstance(outputs, (list, tuple)) else 1),
                                 fix="Pass exit_costs num_exits={n} (or leave it out to take the model's)")
    batch = outputs[0].shape[0]
    if batch == 0:
        raise ValueError("`example_input` holds no sample (batch size 0); the costs are per sample. Pass a batch "
                         "of at least one input.")
    macs, used, incremental = [], [], []
    ops_so_far, params_so_far, previous = 0, 0, 0
    for logits in outputs:
        o, u = tracer.ops.get(id(logits), 0), tracer.uses.get(id(logits), 0)
        ops_so_far |= o
        params_so_far |= u
        flops = sum(f for i, f in enumerate(tracer.flops) if f and ops_so_far >> i & 1)
        m = flops // 2 // batch
        macs.append(m)
        incremental.append(m - previous)
        previous = m
        used.append(sum(s for i, s in enumerate(sizes) if params_so_far >> i & 1))
    return ExitCosts(macs, used, incremental)


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


def _executed_costs(model: nn.Module, example_input: Any, lazy: ExitCosts) -> ExitCosts:
    """Count the FLOPs :class:`EarlyExit` runs when every sample is made to leave at exit ``k``."""
    from torch.utils.flop_counter import FlopCounterMode

    from metaweight._budget import NO_EXIT
    from metaweight._early_exit import EarlyExit

    K = len(lazy.macs)
    macs = []
    for k in range(K):
        thresholds = torch.full((K,), NO_EXIT, dtype=torch.float32)
        thresholds[k] = -NO_EXIT  # everyone leaves at exit k (the last takes all anyway)
        predictor = EarlyExit(model, thresholds)
        counter = FlopCounterMode(display=False)
        with counter:
            predictions, _ = predictor(example_input)
        macs.append(counter.get_total_flops() // 2 // predictions.shape[0])
    incremental = [m - (macs[k - 1] if k else 0) for k, m in enumerate(macs)]
    return ExitCosts(macs, lazy.params, incremental)
