"""Harmonized loss weights learned by a one-step look-ahead (HDKD Eq. 6-8, Alg. 1)."""

from __future__ import annotations

import copy
import dataclasses
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.hooks import RemovableHandle

from metaweight._backends import BACKENDS, Backend, BackendName, make_backend
from metaweight._checks import IGNORE_INDEX
from metaweight._hypergradient import (Reducer, _clone_buffers, call_with, replay_randomness, step_length,
                                      validation_direction)
from metaweight._losses import DenseDistillLoss
from metaweight._protocols import Objective, Terms, call_model
from metaweight._record import MetaStepRecord
from metaweight._warn import warn_user
from metaweight._optimizers import (
    check_optimizer_covers_model,
    check_optimizer_options,
    lookahead_update,
    supports_exact_update,
    unwrap_optimizer,
)
from metaweight._validation import BalancedValidation

Batch = Sequence[Any]
GammaInit = Union[Literal["uniform", "last", "random"], Tensor, Sequence[float]]
INITS = ("uniform", "last", "random")
CONSTRAINTS = ("clamp", "normalize")
GAMMA_OPTIMIZERS = ("sgd", "adam")
NONFINITE = ("raise", "skip")


class HarmonizedWeighter:
    r"""Learns one weight :math:`\gamma_k \ge 0` per loss term by a one-step look-ahead.

    Wang & Li (AAAI 2021), Alg. 1. Each meta step computes, on a training batch and a
    held-out validation batch,

    .. math::
        \theta' = \theta - U\Big(\nabla_\theta \sum_k \gamma_k L_k(\theta)\Big), \qquad
        \gamma \leftarrow \Pi\big(\gamma - \epsilon\, \nabla_\gamma L_{val}(\theta')\big)

    where :math:`U` is one step of the wrapped optimizer (learning rate :math:`\xi`,
    momentum, Nesterov, weight decay, Adam moments: everything the optimizer would do,
    read from it at the time of the step), :math:`L_{val}` the validation objective
    (:class:`BalancedValidation`) and :math:`\Pi` the rule keeping :math:`\gamma`
    non-negative. The model's parameters, buffers and gradients and the optimizer's
    state are left exactly as they were. The model then takes its usual step on
    :math:`\sum_k \gamma_k L_k`, which :meth:`loss` returns.

    Like an LR scheduler, the weighter wraps the model and optimizer without changing
    them; its :meth:`state_dict` holds only its own state (:math:`\gamma`, the
    :math:`\gamma` optimizer, the validation average).

    Args:
        model: the multi-exit network; ``model(x)`` returns ``K`` logits tensors.
        optimizer: the optimizer of ``model`` (SGD, Adam, AdamW; others that `higher`
            implements also work).
        criterion: the loss terms :math:`L_k`: a :class:`DenseDistillLoss`, or any callable
            ``criterion(outputs, target) -> Tensor[n]`` with ``term_names`` (see
            :mod:`metaweight._protocols`: optional ``active`` mask and ``teacher_outputs``
            keyword). ``outputs`` is whatever the model returns.
        validation: the validation objective: :class:`BalancedValidation` (the default, built
            from ``criterion.num_exits`` and ``criterion.ignore_index``), or any callable ``validation(outputs, target) ->
            scalar`` to lower.
        term_names: the names of the criterion's terms, where it has no ``term_names``.
        gamma_lr: :math:`\epsilon`, the learning rate of the named ``gamma_optimizer``.
        gamma_optimizer: ``"adam"`` (the default: steps of about :math:`\epsilon` per meta
            step whatever the scale of the meta-gradient), ``"sgd"`` (the paper's
            :math:`\gamma \leftarrow \gamma - \epsilon \nabla_\gamma`; the meta-gradient is
            proportional to the model's learning rate, so these steps shrink 100-fold as a step
            schedule decays it), or a callable that takes ``[gamma]`` and returns a
            ``torch.optim.Optimizer`` for it (then ``gamma_lr`` is not used). The default was
            chosen on held-out data; docs/results.md gives the evidence.
        init: ``"uniform"`` (every active term 1: DS-like), ``"last"`` (the CE terms
            and the last exit's KD terms 1, other KD terms 0: DBT-like), ``"random"``
            (uniform in [0, 1) on active terms) or a tensor of ``num_terms`` weights.
        learn: ``False`` keeps :math:`\gamma` fixed (the non-harmonized baselines);
            :meth:`meta_step` then does nothing.
        constraint: ``"clamp"`` projects :math:`\gamma` onto :math:`\gamma \ge 0`;
            ``"normalize"`` also rescales it to keep the sum it started with.
        nonfinite: what to do when the validation objective or the meta-gradient is
            not finite: ``"raise"`` a ``ValueError`` or ``"skip"`` the meta step; either
            way :math:`\gamma` and the validation average are left unchanged.
        generator: the random generator for ``init="random"``.
        backend: how the meta-gradient is computed: ``"jvp"`` (exact: one forward-mode
            pass, the default), ``"finite_difference"`` (two forwards, approximate) or
            ``"higher"`` (exact: differentiates through the inner step; the reference).
            ``jvp``/``finite_difference`` know SGD, Adam and AdamW; other optimizers fall
            back to ``higher`` with a warning.
        meta_every: run the look-ahead on every N-th call only (gamma stays fixed between).
        lookahead_params: a callable ``name -> bool`` restricting the look-ahead to some
            parameters (e.g. the exit heads and the last stage); the others are held at
            :math:`\theta`. Cheaper; approximates the full look-ahead.
        reuse_forward: let :meth:`step` reuse the meta step's training forward (faster,
            more memory; see :meth:`step`).
        mode: ``"exact"`` (the paper's order: gamma is updated first, then the model steps
            with it) or ``"fast"`` (the model steps with the gamma it has, and that step is the
            look-ahead: about 2.5x a plain iteration instead of 4x on the CIFAR MSDNet; the
            one-call :meth:`step`, or :meth:`meta_step` after your own step; see the cost guide).
        fd_epsilon: step length in parameter space for ``finite_difference``; default
            :math:`\sqrt[3]{\text{machine eps}}` times the parameters' RMS.
        callbacks: hooks called after every successful meta step with its
            :class:`MetaStepRecord` (``iteration``, ``meta_step``, ``gamma`` and ``terms`` by
            term name, ``val_objective``, ``val_exit_losses``, ...), as if registered with
            :meth:`register_meta_step_hook`. See :class:`CSVLogger` and :class:`TensorBoardLogger`.

    Example:
        >>> import torch, metaweight as mw
        >>> model = mw.MultiExit([torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)],
        ...                      [torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)])
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> weighter = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(2), gamma_lr=0.01)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> metrics = weighter.step((x, y), (x, y))
        >>> sorted(weighter.gamma_dict())
        ['ce[1]', 'ce[2]', 'kd[2->1]']
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Any,
        validation: Any = None,
        *,
        term_names: Sequence[str] | None = None,
        gamma_lr: float = 0.01,
        init: GammaInit = "uniform",
        learn: bool = True,
        constraint: Literal["clamp", "normalize"] = "clamp",
        gamma_optimizer: Literal["adam", "sgd"] | Callable[[list[Tensor]], torch.optim.Optimizer] = "adam",
        nonfinite: Literal["raise", "skip"] = "raise",
        generator: torch.Generator | None = None,
        backend: BackendName = "jvp",
        meta_every: int = 1,
        lookahead_params: Callable[[str], bool] | None = None,
        reuse_forward: bool = False,
        mode: Literal["exact", "fast"] = "exact",
        fd_epsilon: float | None = None,
        callbacks: Sequence[Callable[[MetaStepRecord], None]] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` should be a torch.nn.Module. Found `{type(model).__name__}`.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` should be a torch.optim.Optimizer. Found `{type(optimizer).__name__}`.")
        terms = Terms(criterion, term_names)
        if validation is None:
            num_exits = getattr(criterion, "num_exits", None)
            if not isinstance(num_exits, int):
                raise ValueError(f"Pass a validation objective: `{type(criterion).__name__}` has no num_exits to build "
                                 f"the default BalancedValidation(num_exits) from.")
            # the criterion's padding label is the objective's too: padding is neither refused nor scored
            ignore_index = getattr(criterion, "ignore_index", IGNORE_INDEX)
            validation = BalancedValidation(num_exits, ignore_index=ignore_index if isinstance(ignore_index, int)
                                            and not isinstance(ignore_index, bool) else IGNORE_INDEX)
        objective = Objective(validation)
        k_terms, k_val = getattr(criterion, "num_exits", None), getattr(validation, "num_exits", None)
        if isinstance(k_terms, int) and isinstance(k_val, int) and k_terms != k_val:
            raise ValueError(
                f"The criterion has num_exits={k_terms} but the validation objective has "
                f"num_exits={k_val}. Build both for the model's number of exits."
            )
        if isinstance(gamma_lr, bool) or not (isinstance(gamma_lr, (int, float)) and math.isfinite(gamma_lr)
                                               and gamma_lr >= 0):
            raise ValueError(f"Invalid gamma_lr: {gamma_lr!r}. Expected a finite number >= 0.")
        if not (gamma_optimizer is None or callable(gamma_optimizer) or gamma_optimizer in GAMMA_OPTIMIZERS):
            raise ValueError(f"Invalid gamma_optimizer: {gamma_optimizer!r}. Expected one of {GAMMA_OPTIMIZERS} or "
                             f"a callable taking [gamma] and returning a torch.optim.Optimizer.")
        if constraint not in CONSTRAINTS:
            raise ValueError(f"Invalid constraint: {constraint!r}. Expected one of {CONSTRAINTS}.")
        if nonfinite not in NONFINITE:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r}. Expected one of {NONFINITE}.")
        inner = unwrap_optimizer(optimizer)
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}. Expected one of {BACKENDS}.")
        if isinstance(meta_every, bool) or not isinstance(meta_every, int) or meta_every < 1:
            raise ValueError(f"Invalid meta_every: {meta_every!r}. Expected an int >= 1.")
        if fd_epsilon is not None and not (isinstance(fd_epsilon, (int, float)) and math.isfinite(fd_epsilon)
                                           and fd_epsilon > 0):
            raise ValueError(f"Invalid fd_epsilon: {fd_epsilon!r}. Expected a finite number > 0, or None.")
        check_optimizer_covers_model(inner, model)
        ddp, module = _unwrap_model(model)
        distributed = ddp is not None
        if isinstance(module, nn.DataParallel) or isinstance(model, nn.DataParallel):
            raise TypeError("nn.DataParallel is not supported; use DistributedDataParallel (one process per GPU).")
        if mode not in ("exact", "fast"):
            raise ValueError(f"Invalid mode: {mode!r}. Expected 'exact' (the paper's order) or 'fast'.")
        if mode == "fast" and learn and not supports_exact_update(inner):
            raise ValueError(f"mode='fast' replays the step of SGD, Adam or AdamW in closed form; "
                             f"`{type(inner).__name__}` is none of them. Use mode='exact'.")
        if mode == "fast" and learn and lookahead_params is not None:
            raise ValueError("mode='fast' looks ahead with the model's real step, over every parameter; "
                             "`lookahead_params` applies to mode='exact' only.")
        if distributed and learn and reuse_forward:
            raise ValueError("reuse_forward=True bypasses DistributedDataParallel's forward; leave it False.")
        self._lookahead_names: set[str] | None = None
        if lookahead_params is not None:
            if not callable(lookahead_params):
                raise TypeError("`lookahead_params` should be a callable taking a parameter name and returning a bool.")
            self._lookahead_names = {n for n, p in module.named_parameters() if p.requires_grad and lookahead_params(n)}
            if not self._lookahead_names:
                raise ValueError("`lookahead_params` selects none of the model's trainable parameters.")
        self._backend: Backend | None = None
        if learn:
            check_optimizer_options(inner)
            self._backend = make_backend(backend, inner, distributed=distributed,
                                         restricted=self._lookahead_names is not None, terms=terms,
                                         fd_epsilon=fd_epsilon)
            backend = self._backend.name

        self.model = model
        self.module = module  # the look-ahead runs on the module itself, never through DDP's hooks
        self._reducer = Reducer(ddp.process_group) if ddp is not None else Reducer(enabled=False)
        self.optimizer = optimizer
        self._inner_optimizer = inner  # what the look-ahead replays (unwrapped from Accelerate/Lightning)
        self.criterion = criterion
        self.validation = validation
        self._terms = terms  # what the weighter asks of them (metaweight._protocols)
        self._objective = objective
        self.learn = bool(learn)
        self.constraint = constraint
        self.nonfinite = nonfinite
        self.gamma_lr = float(gamma_lr)
        self.backend = backend
        self.meta_every = meta_every
        self.reuse_forward = bool(reuse_forward)
        self.mode = mode
        self.fd_epsilon = fd_epsilon
        self.num_calls = 0
        self._hooks: OrderedDict[int, Callable[[MetaStepRecord], None]] = OrderedDict()
        self._deferring, self._unreported = False, None  # see _report
        for callback in callbacks:
            self.register_meta_step_hook(callback)

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        for part in (criterion, validation):
            if isinstance(part, nn.Module):
                part.to(device)
        self._active = terms.active.to(device)
        self.gamma: Tensor = self._initial_gamma(init, generator).to(device)  # a plain tensor; its optimizer reads .grad
        self._gamma_sum = float(self.gamma.detach().sum())
        if self.learn and constraint == "normalize" and self._gamma_sum == 0:
            raise ValueError("constraint='normalize' keeps the sum of gamma, but `init` gives every term weight 0: "
                             "gamma could never move. Start from a non-zero init (e.g. 'uniform').")
        self.num_skipped = 0  # meta steps and model steps refused as non-finite
        if gamma_optimizer is None:
            gamma_optimizer = "adam"
        if isinstance(gamma_optimizer, str):
            if gamma_optimizer == "sgd":
                self.gamma_optimizer: torch.optim.Optimizer = torch.optim.SGD([self.gamma], lr=self.gamma_lr)
            else:
                self.gamma_optimizer = torch.optim.Adam([self.gamma], lr=self.gamma_lr)
        else:
            self.gamma_optimizer = gamma_optimizer([self.gamma])
            if not isinstance(self.gamma_optimizer, torch.optim.Optimizer):
                raise TypeError(
                    "`gamma_optimizer` should return a torch.optim.Optimizer for [gamma]. "
                    f"It returned `{type(self.gamma_optimizer).__name__}`."
                )
        self.num_meta_steps = 0
        self.last_terms: Tensor | None = None
        self.last_meta: MetaStepRecord = MetaStepRecord(0)
        self._pending: _Pending | None = None  # mode="fast", two-call form: from loss() to meta_step()
        self._step_hook: RemovableHandle | None = None
        if self.mode == "fast" and self.learn:
            self._step_hook = inner.register_step_pre_hook(_StepCapture(self))

    # ----------------------------------------------------------------------------- set-up
    def _initial_gamma(self, init: GammaInit, generator: torch.Generator | None) -> Tensor:
        active = self._terms.active.cpu()
        n = self._terms.num_terms
        if isinstance(init, str):
            if init == "uniform":
                gamma = active.float()
            elif init == "last":
                if not isinstance(self.criterion, DenseDistillLoss):
                    raise ValueError("init='last' (DBT-like) needs a DenseDistillLoss criterion; give a tensor of "
                                     "initial weights instead.")
                K = self.criterion.num_exits
                gamma = torch.zeros(n)
                gamma[:K] = 1.0
                for idx, (i, _) in enumerate(self.criterion.pairs):
                    if i == K - 1:
                        gamma[K + idx] = 1.0
                gamma = gamma * active
            elif init == "random":
                gamma = torch.rand(n, generator=generator) * active
            else:
                raise ValueError(f"Invalid init: {init!r}. Expected one of {INITS} or a tensor of {n} weights.")
            return gamma
        gamma = torch.as_tensor(init, dtype=torch.float32).detach().clone().cpu()
        if gamma.shape != (n,):
            raise ValueError(
                f"`init` should hold one weight per term, shape ({n},) for terms {self._terms.term_names}. "
                f"Found shape {tuple(gamma.shape)}."
            )
        if not torch.isfinite(gamma).all() or (gamma < 0).any():
            raise ValueError(f"`init` weights should be finite and >= 0. Found {gamma.tolist()}.")
        inactive = [name for name, a, g in zip(self._terms.term_names, active, gamma) if not a and g != 0]
        if inactive:
            raise ValueError(
                f"`init` gives non-zero weight to terms the criterion does not compute (inactive): {inactive}. "
                f"Set them to 0 (or, for a DenseDistillLoss, use teachers='dense')."
            )
        return gamma

    # ----------------------------------------------------------------------------- logging
    @property
    def term_names(self) -> list[str]:
        """The names of the loss terms, in the order of :attr:`gamma`."""
        return self._terms.term_names

    def gamma_dict(self) -> dict[str, float]:
        """The current loss weights by term name."""
        return dict(zip(self.term_names, self.gamma.detach().cpu().tolist()))

    def terms_dict(self) -> dict[str, float]:
        """The unweighted loss terms of the last :meth:`loss` call, by term name (empty before it)."""
        if self.last_terms is None:
            return {}
        return dict(zip(self.term_names, self.last_terms.cpu().tolist()))

    # ----------------------------------------------------------------------------- the two calls
    def loss(self, outputs: Sequence[Tensor], target: Tensor) -> Tensor:
        r"""The weighted training loss :math:`\sum_k \gamma_k L_k` for the user's own backward.

        :math:`\gamma` enters as a constant: the backward reaches the model only.

        With ``mode="fast"`` this is the first of the two calls of an iteration: the terms,
        the outputs (as fixed teachers) and, when the optimizer steps, its update's Jacobian
        and the parameters before the step are kept for :meth:`meta_step`, which follows
        the step.
        """
        terms = self._terms(outputs, target)
        if self.mode == "fast" and self.learn:
            self._pending = None
            if self.num_calls % self.meta_every == 0:  # the next meta_step call runs a look-ahead
                device = terms.device.type
                low = torch.is_autocast_enabled(device) or any(
                    isinstance(o, Tensor) and o.dtype in (torch.float16, torch.bfloat16)
                    for o in tree_leaves(outputs))
                self._pending = _Pending(tree_map(lambda o: o.detach() if isinstance(o, Tensor) else o, outputs),
                                         terms.detach(), target, low)
        return self._weighted(terms)

    def _weighted(self, terms: Tensor) -> Tensor:
        """Remember the terms for :meth:`terms_dict` and weight them by gamma, as a constant."""
        self.last_terms = terms.detach()
        return (self.gamma.detach().to(terms) * terms).sum()

    def meta_step(self, train_batch: Batch, val_batch: Batch) -> MetaStepRecord:
        r"""Update :math:`\gamma` by one look-ahead step; leaves the model and optimizer unchanged.

        With ``meta_every=N`` only every N-th call does the look-ahead (the first call does).

        With ``mode="fast"`` the call comes *after* the model's step instead, and the step it
        took is the look-ahead (see :meth:`step`)::

            loss = weighter.loss(model(x), y)        # gamma as it is
            loss.backward()                          # or scaler.scale(loss).backward(); clipping, ...
            optimizer.step()                         # or scaler.step(optimizer)
            weighter.meta_step((x, y), val_batch)    # gamma for the next iteration

        The weighter sees the optimizer's step through a step pre-hook (the gradients as the
        optimizer gets them: unscaled by a ``GradScaler``, after your clipping); a step the
        optimizer did not take (a ``GradScaler`` that found inf/NaN) gives a skipped record
        and leaves gamma alone. Models with dropout (modules whose class name contains
        "Drop", in training mode) or a forward under autocast cost one forward more: the
        difference then recomputes its base point in float32 with the same random numbers.

        Args:
            train_batch: ``(x, y)``: the training inputs and labels of this iteration.
            val_batch: ``(x_val, y_val)``: a held-out validation batch.

        Returns:
            A :class:`MetaStepRecord`: ``ran``, ``skipped``, ``val_objective``
            (:math:`L_{val}(\theta')`), ``val_exit_losses``, ``gamma_grad``, ``gamma``, ...
            (``ran`` is ``False`` with ``learn=False`` or on a call that ``meta_every`` skips).
        """
        if self.mode == "fast" and self.learn:
            return self._fast_meta_step(train_batch, val_batch)
        metrics, _ = self._meta(train_batch, val_batch, keep_graph=False)
        return metrics

    def _meta(self, train_batch: Batch, val_batch: Batch, keep_graph: bool) -> tuple[MetaStepRecord, Tensor | None]:
        """The meta step; with ``keep_graph`` also the training terms with their graph (jvp/fd backends)."""
        self.num_calls += 1
        if not self.learn or (self.num_calls - 1) % self.meta_every:
            return MetaStepRecord(self.num_calls, meta_step=self.num_meta_steps, gamma=self.gamma_dict()), None
        train = _unpack(train_batch, "train_batch")
        val = _unpack(val_batch, "val_batch")
        assert self._backend is not None
        result = self._backend.meta_gradient(
            self.module, self._inner_optimizer, self._terms, self._objective, self.gamma.detach(), train, val,
            lookahead_names=self._lookahead_names, keep_graph=keep_graph, reducer=self._reducer,
        )
        gamma_grad = result.gamma_grad * self._active
        metrics = self._apply(gamma_grad, result.objective, result.exit_losses, result.terms.detach())
        return metrics, (result.terms if keep_graph else None)

    def _apply(self, gamma_grad: Tensor, objective: Tensor, exit_losses: Tensor, terms: Tensor) -> MetaStepRecord:
        """Check the meta-gradient, then step gamma, project it and update the validation average."""
        if not (torch.isfinite(objective) and torch.isfinite(gamma_grad).all() and torch.isfinite(exit_losses).all()):
            bad_terms = [n for n, t in zip(self.term_names, terms.tolist()) if not math.isfinite(t)]
            message = (
                f"Non-finite meta step: validation objective {float(objective)}, validation exit losses "
                f"{exit_losses.tolist()}, non-finite training terms {bad_terms or 'none'}. gamma and the "
                f"validation average were left unchanged. Check the data and the learning rates "
                f"(or pass nonfinite='skip' to skip such steps)."
            )
            return self._refuse(message, objective, exit_losses, terms)
        saved_gamma = self.gamma.detach().clone()
        saved_optimizer = copy.deepcopy(self.gamma_optimizer.state_dict())
        self.gamma_optimizer.zero_grad(set_to_none=True)
        self.gamma.grad = gamma_grad.to(self.gamma)
        self.gamma_optimizer.step()
        self.gamma.grad = None
        self._project()
        total = float(self.gamma.detach().sum())
        if not math.isfinite(total) or (self.constraint == "normalize" and total == 0):
            with torch.no_grad():
                self.gamma.copy_(saved_gamma)
            self.gamma_optimizer.load_state_dict(saved_optimizer)
            message = (f"gamma's own optimizer step gave {'non-finite' if not math.isfinite(total) else 'all-zero'} "
                       f"weights (meta-gradient {gamma_grad.tolist()}); gamma, its optimizer and the validation "
                       f"average were left unchanged. Lower gamma_lr or check the gamma optimizer.")
            return self._refuse(message, objective, exit_losses, terms)
        self._objective.update(exit_losses)
        self.num_meta_steps += 1
        record = MetaStepRecord(self.num_calls, ran=True, meta_step=self.num_meta_steps,
                                val_objective=float(objective), val_exit_losses=exit_losses.tolist(),
                                gamma_grad=gamma_grad.detach(), gamma=self.gamma_dict(),
                                terms=dict(zip(self.term_names, terms.tolist())))
        self.last_meta = record
        self._unreported = record
        if not self._deferring:
            self._report()
        return record

    def _report(self) -> None:
        """Hand the meta step's record to the hooks, once it stands (:meth:`step` defers this until the
        model's step is taken: a step it undoes is never logged)."""
        record, self._unreported = self._unreported, None
        if record is not None:
            for hook in list(self._hooks.values()):
                hook(record)

    def _refuse(self, message: str, objective: Tensor, exit_losses: Tensor, terms: Tensor) -> MetaStepRecord:
        """A meta step that changed nothing: raise, or count it, warn and report it skipped."""
        if self.nonfinite == "raise":
            raise ValueError(message)
        self.num_skipped += 1
        warn_user(f"Skipped a meta step ({self.num_skipped} so far): {message}")
        return MetaStepRecord(self.num_calls, ran=True, skipped=True, meta_step=self.num_meta_steps,
                              val_objective=float(objective), val_exit_losses=exit_losses.tolist(),
                              gamma=self.gamma_dict(), terms=dict(zip(self.term_names, terms.tolist())),
                              message=message)

    def register_meta_step_hook(self, hook: Callable[[MetaStepRecord], None]) -> RemovableHandle:
        """Call ``hook(record)`` after every successful meta step, like
        ``torch.optim.Optimizer.register_step_post_hook``; ``handle.remove()`` unregisters it.

        Args:
            hook: a callable taking the :class:`MetaStepRecord` (a mapping with ``iteration``,
                ``meta_step``, ``gamma``, ``terms``, ``val_objective``, ``val_exit_losses``, ...).
        """
        if not callable(hook):
            raise TypeError(f"`hook` should be callable with a MetaStepRecord. Found `{type(hook).__name__}`.")
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    @property
    def callbacks(self) -> list[Callable[[MetaStepRecord], None]]:
        """The registered meta-step hooks, in order (the constructor's ``callbacks`` first)."""
        return list(self._hooks.values())

    @torch.no_grad()
    def _project(self) -> None:
        gamma = self.gamma
        gamma.clamp_(min=0.0)
        gamma.mul_(self._active)
        if self.constraint == "normalize":
            total = float(gamma.sum())
            if total > 0:
                gamma.mul_(self._gamma_sum / total)

    # ----------------------------------------------------------------------------- the one call
    def step(self, train_batch: Batch, val_batch: Batch) -> MetaStepRecord:
        """One full HDKD iteration: :meth:`meta_step`, then the model's step on :meth:`loss`.

        With the ``jvp``/``finite_difference`` backends and ``reuse_forward=True`` the model's
        step backpropagates the new weights through the meta step's own training forward
        (same batch, same parameters, same dropout masks, BatchNorm statistics updated once),
        so the iteration runs one forward fewer; the price is holding that forward's graph
        during the validation pass (on the CIFAR MSDNet: about 8% less time, but 1.67x instead
        of 1.15x the peak memory of a plain iteration). If anything fails, the model's buffers
        are restored.

        A step whose weighted loss or gradient is not finite (on any rank) is never taken:
        the model's parameters, buffers and optimizer state, gamma and the validation
        average are left as they were before the call; with ``nonfinite="raise"`` a
        ``ValueError`` says so, with ``"skip"`` a ``RuntimeWarning`` does and
        :attr:`num_skipped` counts it.

        Returns the meta step's :class:`MetaStepRecord` with ``loss``, the weighted training
        loss, ``terms`` and ``model_step_skipped`` filled in.
        """
        if self.mode == "fast" and self.learn:
            return self._fast_step(train_batch, val_batch)
        x, y = _unpack(train_batch, "train_batch")
        keep = self.reuse_forward and self._backend is not None and self._backend.reuses_forward
        saved = self._snapshot()
        self._deferring, self._unreported = True, None  # the hooks hear of the meta step once the model step stands
        try:
            metrics, terms = self._meta(train_batch, val_batch, keep_graph=keep)
            if terms is None:
                terms = self._terms(call_model(self.model, x), y)
            loss = self._weighted(terms)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # on every rank, so DDP's gradient all-reduce never waits for a rank that stopped
            finite = self._finite_update(loss)
        except Exception:
            self._unreported = None
            self._restore(saved)
            raise
        finally:
            self._deferring = False
        if not finite:
            self._unreported = None  # the meta step is undone with the model step: nothing to report
            message = self._refuse_model_step(loss, saved)
            return dataclasses.replace(metrics, loss=float(loss.detach()), model_step_skipped=True,
                                       terms=self.terms_dict(), message=message)
        self.optimizer.step()
        self._report()
        return dataclasses.replace(metrics, loss=float(loss.detach()), model_step_skipped=False,
                                   terms=self.terms_dict())

    def _refuse_model_step(self, loss: Tensor, saved: tuple[dict[str, Tensor], dict[str, Any], int]) -> str:
        """A non-finite model step: put everything back as ``saved``, then raise or warn and count it.
        Returns the message (``nonfinite="skip"``)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._restore(saved)
        message = (f"The weighted training loss ({float(loss.detach())}), its gradient or a buffer the forward "
                   f"updated (e.g. BatchNorm statistics) is not finite "
                   f"(non-finite terms: {[n for n, t in self.terms_dict().items() if not math.isfinite(t)] or 'none'}"
                   f"). The step was not taken: parameters, buffers, optimizer state, gamma and the validation "
                   f"average are as before this call. Check the batch and the learning rate.")
        if self.nonfinite == "raise":
            raise ValueError(message + " (Pass nonfinite='skip' to skip such steps.)")
        self.num_skipped += 1
        warn_user(f"Skipped a model step ({self.num_skipped} skipped so far): {message}")
        return message

    def _fast_step(self, train_batch: Batch, val_batch: Batch) -> MetaStepRecord:
        r"""``mode="fast"``: the model steps with the gamma it has (one meta step stale); that step is the
        look-ahead, :math:`\theta' = \theta - U(g)`. Then :math:`v = \nabla L_{val}(\theta')` at the
        parameters the model moved to, and the directional derivative of the terms at :math:`\theta`
        along :math:`w = D \odot v` by one forward difference (teachers and dropout masks held fixed)
        gives :math:`\nabla_\gamma = -\partial_w L(\theta)`, which updates gamma for the next step."""
        x, y = _unpack(train_batch, "train_batch")
        xv, yv = _unpack(val_batch, "val_batch")
        self.num_calls += 1
        run_meta = (self.num_calls - 1) % self.meta_every == 0
        saved = self._snapshot()
        self._pending = None
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        device = next(p.device for _, p in named)
        low = torch.is_autocast_enabled(device.type)  # the difference's base point is then recomputed in float32
        try:
            with replay_randomness(device) as replay:
                outputs = call_model(self.model, x)
                terms = self._terms(outputs, y)
                loss = self._weighted(terms)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                finite = self._finite_update(loss)
                if finite and run_meta:
                    theta, jac = _before_step(self._inner_optimizer, named, [p.grad for _, p in named])
                if finite:
                    self.optimizer.step()
        except Exception:
            self._restore(saved)
            raise
        if not finite:
            message = self._refuse_model_step(loss, saved)
            return MetaStepRecord(self.num_calls, meta_step=self.num_meta_steps, gamma=self.gamma_dict(),
                                  terms=self.terms_dict(), loss=float(loss.detach()), model_step_skipped=True,
                                  message=message)
        if not run_meta:
            return MetaStepRecord(self.num_calls, meta_step=self.num_meta_steps, gamma=self.gamma_dict(),
                                  terms=self.terms_dict(), loss=float(loss.detach()), model_step_skipped=False)
        record = self._fast_meta(named, theta, jac, terms.detach(), outputs, x, y, xv, yv, saved[0], replay,
                                 recompute_base=low)
        return dataclasses.replace(record, loss=float(loss.detach()), model_step_skipped=False, terms=self.terms_dict())

    def _fast_meta_step(self, train_batch: Batch, val_batch: Batch) -> MetaStepRecord:
        """``mode="fast"``, two-call form: the meta step after the user's own step (see :meth:`meta_step`)."""
        x, y = _unpack(train_batch, "train_batch")
        xv, yv = _unpack(val_batch, "val_batch")
        run_meta = self.num_calls % self.meta_every == 0
        pending = self._pending
        if run_meta and pending is None:
            raise ValueError("mode='fast': meta_step comes after the model's step, and needs the training loss from "
                             "weighter.loss(outputs, y) of this iteration: loss = weighter.loss(model(x), y); "
                             "loss.backward(); optimizer.step(); weighter.meta_step((x, y), val_batch). "
                             "(Or call weighter.step(train_batch, val_batch), which does all of it.)")
        if run_meta and not _same_target(pending.target, y):
            raise ValueError("meta_step got another training batch than the weighter.loss call before it: pass the "
                             "batch (x, y) whose loss the optimizer just stepped on.")
        self._pending = None
        self.num_calls += 1
        if not run_meta:
            return MetaStepRecord(self.num_calls, meta_step=self.num_meta_steps, gamma=self.gamma_dict())
        assert pending is not None
        if pending.theta is None or pending.jac is None:
            message = ("The optimizer did not step since weighter.loss (e.g. a GradScaler found inf/NaN gradients "
                       "and skipped it): there is no look-ahead to score, gamma is unchanged.")
            return MetaStepRecord(self.num_calls, skipped=True, meta_step=self.num_meta_steps,
                                  gamma=self.gamma_dict(), message=message)
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        stochastic = any(m.training and "drop" in type(m).__name__.lower() for m in self.module.modules())
        device = next(p.device for _, p in named)
        with replay_randomness(device) as replay:
            return self._fast_meta(named, pending.theta, pending.jac, pending.terms, pending.outputs, x, y, xv, yv,
                                   _clone_buffers(self.module), replay, recompute_base=pending.low or stochastic)

    def _fast_meta(self, named: list[tuple[str, Tensor]], theta: dict[str, Tensor], jac: list[Tensor | float],
                   terms: Tensor, outputs: Any, x: Any, y: Any, xv: Any, yv: Any, buffers: dict[str, Tensor],
                   replay: Callable[[], Any], recompute_base: bool) -> MetaStepRecord:
        r"""Fast mode's meta-gradient, the model having stepped from ``theta`` to where it is now:
        :math:`v = \nabla L_{val}` here, and the one-sided difference of the terms at ``theta`` along
        :math:`w = D \odot v` (``jac`` is D), from ``terms`` (or, with ``recompute_base``, from the terms
        recomputed in float32 under ``replay``, for half-precision or random forwards)."""
        reported = terms  # the terms of the training forward, whatever the difference recomputes
        # the model stepped in place: half-precision copies autocast cached of the old weights are stale
        torch.clear_autocast_cache()
        # validation at the parameters the model has now moved to (on copies of its buffers)
        params = {n: p for n, p in self.module.named_parameters()}
        objective, exit_losses, direction = validation_direction(self.module, self._objective, params, xv, yv,
                                                                 named, jac, self._reducer)
        if direction is None:
            return self._apply(torch.full_like(self.gamma, math.nan), objective, exit_losses, reported.detach())
        h = step_length(theta, direction, self.fd_epsilon, order=1)  # one-sided: sqrt(machine eps) x RMS
        with torch.no_grad():
            if h is None:
                derivative = torch.zeros_like(terms)
            else:
                device = next(iter(theta.values())).device
                here = {n: p.detach() for n, p in self.module.named_parameters()}

                def outputs_at(moved: dict[str, Tensor]) -> Any:
                    # differences of half-precision forwards drown in rounding: these run in full precision
                    with replay(), torch.autocast(device.type, enabled=False):
                        return call_with(self.module, {**here, **moved}, {k: b.clone() for k, b in buffers.items()}, x)

                if recompute_base:  # the base point, and the teachers, from the same masks in float32
                    outputs = outputs_at(theta)
                teachers = tree_map(lambda o: o.detach() if isinstance(o, Tensor) else o, outputs)
                if recompute_base:
                    terms = self._terms(outputs, y, teacher_outputs=teachers)
                plus = self._terms(outputs_at({n: theta[n] + h * direction[n] for n in theta}), y,
                                   teacher_outputs=teachers)
                derivative = (plus.double() - terms.double()) / h
            derivative = self._reducer.mean([derivative])[0]
        gamma_grad = (-derivative).to(self.gamma) * self._active
        return self._apply(gamma_grad, objective, exit_losses, reported.detach())

    def _snapshot(self) -> tuple[dict[str, Tensor], dict[str, Any], int]:
        """What one call of :meth:`step` may change besides the parameters: buffers and our own state."""
        buffers = {n: b.clone() for n, b in self.module.named_buffers()}
        return buffers, self.state_dict(), self.num_calls

    def _restore(self, saved: tuple[dict[str, Tensor], dict[str, Any], int]) -> None:
        buffers, state, num_calls = saved
        with torch.no_grad():
            for n, b in self.module.named_buffers():
                b.copy_(buffers[n])
            self.gamma.copy_(state["gamma"].to(self.gamma))
        self.gamma_optimizer.load_state_dict(state["gamma_optimizer"])
        self._objective.load_state_dict(state["validation"])
        self.num_meta_steps, self.num_calls, self.num_skipped = state["num_meta_steps"], num_calls, state["num_skipped"]

    def _finite_update(self, loss: Tensor) -> bool:
        """Whether the loss, every gradient and every floating-point buffer (BatchNorm statistics, just
        updated by the forward) are finite, on every rank (one all-reduce under DDP)."""
        finite = torch.isfinite(loss.detach()).all()
        for p in self.module.parameters():
            if p.grad is not None:
                finite = finite & torch.isfinite(p.grad).all()
        for b in self.module.buffers():
            if b.is_floating_point():
                finite = finite & torch.isfinite(b).all()
        flag = finite.float().reshape(1)
        return bool(self._reducer.mean([flag])[0].item() == 1.0)

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The weighter's own state: gamma, its optimizer and the validation average."""
        return {
            "term_names": list(self.term_names),
            "teachers": getattr(self.criterion, "teachers", None),
            "gamma": self.gamma.detach().cpu().clone(),
            "gamma_optimizer": copy.deepcopy(self.gamma_optimizer.state_dict()),
            "gamma_optimizer_type": type(self.gamma_optimizer).__name__,
            "validation": self._objective.state_dict(),
            "num_meta_steps": self.num_meta_steps,
            "num_calls": self.num_calls,
            "num_skipped": self.num_skipped,
            "gamma_sum": self._gamma_sum,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. The whole checkpoint is checked first; a checkpoint saved for
        other terms, with another gamma optimizer, with a key missing or with non-finite or negative
        values is refused with a ``ValueError`` (a ``TypeError`` for a non-dict), changing nothing."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"`state_dict` should be a dict from HarmonizedWeighter.state_dict(). "
                            f"Found `{type(state_dict).__name__}`.")
        required = ("term_names", "teachers", "gamma", "gamma_optimizer", "validation", "num_meta_steps", "gamma_sum")
        missing = [k for k in required if k not in state_dict]
        if missing:
            raise ValueError(f"This checkpoint lacks {missing}: it is not a complete HarmonizedWeighter.state_dict() "
                             f"(keys found: {sorted(state_dict)}). Nothing was changed.")
        names = state_dict["term_names"]
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"The checkpoint's term_names should be a list of names. Found `{type(names).__name__}`.")
        if list(names) != self.term_names:
            raise ValueError(
                f"This checkpoint is for the terms {names} ({_count_exits(names)} exits), but this weighter "
                f"has {self.term_names} ({_count_exits(self.term_names)} exits). Build the weighter with the "
                f"criterion the checkpoint was saved with."
            )
        teachers = getattr(self.criterion, "teachers", None)
        if not (state_dict["teachers"] is None or isinstance(state_dict["teachers"], str)) or \
                state_dict["teachers"] != teachers:
            raise ValueError(
                f"This checkpoint was saved with teachers={state_dict['teachers']!r}, but this criterion has "
                f"teachers={teachers!r}."
            )
        gamma = state_dict["gamma"]
        if not isinstance(gamma, Tensor) or gamma.shape != self.gamma.shape or not gamma.is_floating_point():
            raise ValueError(f"The checkpoint's gamma should be a float tensor of shape {tuple(self.gamma.shape)}. "
                             f"Found {gamma!r}.")
        if not torch.isfinite(gamma).all() or (gamma < 0).any():
            raise ValueError(f"The checkpoint's gamma {gamma.tolist()} holds non-finite or negative weights.")
        if (gamma[~self._terms.active.cpu()] != 0).any():
            raise ValueError(f"The checkpoint's gamma {gamma.tolist()} does not fit the terms {self.term_names}.")
        self._objective.check_state(state_dict["validation"])  # check before touching our own
        self._check_gamma_optimizer_state(state_dict)
        counts = {k: state_dict.get(k, 0) for k in ("num_meta_steps", "num_calls", "num_skipped")}
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts.values()):
            raise ValueError(f"The checkpoint's counters {counts} should be ints >= 0.")
        gamma_sum = state_dict["gamma_sum"]
        if not (isinstance(gamma_sum, (int, float)) and math.isfinite(gamma_sum) and gamma_sum >= 0):
            raise ValueError(f"The checkpoint's gamma_sum {gamma_sum!r} should be a finite number >= 0.")
        # everything checked: now apply
        self.gamma_optimizer.load_state_dict(copy.deepcopy(state_dict["gamma_optimizer"]))
        with torch.no_grad():
            self.gamma.copy_(gamma)
        self._objective.load_state_dict(state_dict["validation"])
        self.num_meta_steps = counts["num_meta_steps"]
        self.num_calls = int(state_dict.get("num_calls", self.num_meta_steps))
        self.num_skipped = counts["num_skipped"]
        self._gamma_sum = float(gamma_sum)

    def _check_gamma_optimizer_state(self, state_dict: Mapping[str, Any]) -> None:
        """Refuse a gamma-optimizer state that this weighter's gamma optimizer could not use."""
        saved = state_dict["gamma_optimizer"]
        mine = type(self.gamma_optimizer).__name__
        kind = state_dict.get("gamma_optimizer_type")
        if kind is not None and kind != mine:
            raise ValueError(f"This checkpoint's gamma optimizer is {kind}, but this weighter's is {mine}. Build the "
                             f"weighter with the gamma_optimizer the checkpoint was saved with.")
        if not (isinstance(saved, Mapping) and isinstance(saved.get("param_groups"), list)
                and isinstance(saved.get("state"), Mapping) and len(saved["param_groups"]) == 1):
            raise ValueError("The checkpoint's `gamma_optimizer` is not the state_dict of an optimizer of gamma.")
        # an optimizer's hyper-parameters name its kind: SGD's momentum/nesterov, Adam's betas/eps
        current = self.gamma_optimizer.state_dict()["param_groups"][0]
        telling = {"momentum", "dampening", "nesterov", "betas", "eps", "amsgrad", "alpha", "centered", "lr_decay",
                   "rho", "etas", "step_sizes"}
        if {k for k in saved["param_groups"][0] if k in telling} != {k for k in current if k in telling}:
            raise ValueError(f"This checkpoint's gamma optimizer has the settings {sorted(saved['param_groups'][0])}, "
                             f"which are not those of this weighter's {mine}. Build the weighter with the "
                             f"gamma_optimizer the checkpoint was saved with.")
        scratch = copy.deepcopy(self.gamma_optimizer)
        try:
            scratch.load_state_dict(copy.deepcopy(saved))
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise ValueError(f"The checkpoint's gamma optimizer state does not load into {mine}: {exc}") from None
        for value in saved["state"].values():
            for t in value.values() if isinstance(value, Mapping) else []:
                if isinstance(t, Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError("The checkpoint's gamma optimizer state holds non-finite values.")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(terms={self.term_names}, criterion={type(self.criterion).__name__}, "
            f"learn={self.learn}, backend={self.backend!r}, meta_every={self.meta_every}, "
            f"gamma_lr={self.gamma_lr}, constraint={self.constraint!r}, "
            f"optimizer={type(self.optimizer).__name__}, gamma_optimizer={type(self.gamma_optimizer).__name__}, "
            f"validation={self.validation!r})"
        )


def _unwrap_model(model: nn.Module) -> tuple[nn.parallel.DistributedDataParallel | None, nn.Module]:
    """The DistributedDataParallel wrapper (if any) and the plain module under it and under
    ``torch.compile``: the look-ahead runs the plain module eagerly (forward-mode AD and
    ``functional_call`` need it), while the model's own step runs ``model`` as the user built it."""
    ddp = None
    for _ in range(4):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            ddp, model = model, model.module
        elif callable(getattr(model, "_orig_mod", None)) and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            break
    return ddp, model


def _unpack(batch: Batch, name: str) -> tuple[Any, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"`{name}` should be a pair (inputs, labels). Found `{type(batch).__name__}`"
                         f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}.")
    return batch[0], batch[1]


def _count_exits(names: Iterable[str] | None) -> int:
    return sum(1 for n in names or [] if n.startswith("ce["))


@dataclasses.dataclass
class _Pending:
    """``mode="fast"``, two-call form: what :meth:`HarmonizedWeighter.loss` saw, and what the
    optimizer's step pre-hook captured (the parameters before the step, the update's Jacobian)."""

    outputs: Any
    terms: Tensor
    target: Any
    low: bool
    theta: dict[str, Tensor] | None = None
    jac: list[Tensor | float] | None = None


class _StepCapture:
    """The optimizer step pre-hook of ``mode="fast"``: before the step the optimizer is about to take
    on the weighted loss of :meth:`HarmonizedWeighter.loss`, keep the parameters and the step's
    diagonal Jacobian. Holds the weighter weakly; copies of the optimizer get an inert hook."""

    def __init__(self, weighter: HarmonizedWeighter) -> None:
        self._ref: Callable[[], HarmonizedWeighter | None] = weakref.ref(weighter)

    def __deepcopy__(self, memo: dict) -> _StepCapture:
        inert = _StepCapture.__new__(_StepCapture)
        inert._ref = lambda: None
        return inert

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._ref = lambda: None

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

    @staticmethod
    def _capture(weighter: HarmonizedWeighter, optimizer: torch.optim.Optimizer) -> None:
        pending = weighter._pending
        if pending is None or pending.theta is not None:
            return
        found_inf = getattr(optimizer, "found_inf", None)  # a GradScaler stepping a fused optimizer
        if found_inf is not None and float(found_inf) > 0:
            return
        scale = getattr(optimizer, "grad_scale", None)
        named = [(n, p) for n, p in weighter.module.named_parameters() if p.requires_grad]
        grads = [p.grad for _, p in named]
        if scale is not None:
            grads = [g / scale.to(g) if g is not None else None for g in grads]
        pending.theta, pending.jac = _before_step(optimizer, named, grads)


@torch.no_grad()
def _before_step(optimizer: torch.optim.Optimizer, named: list[tuple[str, Tensor]],
                 grads: list[Tensor | None]) -> tuple[dict[str, Tensor], list[Tensor | float]]:
    """Fast mode, just before the optimizer's step: the parameters and the step's diagonal Jacobian D."""
    _, jac = lookahead_update(optimizer, [p for _, p in named], grads)
    return {n: p.detach().clone() for n, p in named}, jac


def _same_target(a: Any, b: Any) -> bool:
    """Whether two label batches (tensors, or nestings of them) are the same, cheaply."""
    if a is b:
        return True
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and (a.data_ptr() == b.data_ptr() or bool(torch.equal(a, b.to(a.device))))
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(_same_target(u, v) if isinstance(u, Tensor) else u == v for u, v in zip(la, lb))
