"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from metaweight._record import MetaStepRecord
from metaweight._warn import warn_user
from metaweight._transaction import host_read
from metaweight._weighting import Weighting, adam_update, check_number, unwrap_model


def gradnorm_gradient(weights: Tensor, norms: Tensor, terms: Tensor, initial: Tensor, active: Tensor,
                      alpha: float) -> Tensor:
    r"""The gradient in :math:`w` of :math:`L_{grad} = \sum_k |G_k - \bar G\, r_k^\alpha|`, the target held constant.

    :math:`G_k = w_k \|\nabla_W L_k\|` (``norms`` holds :math:`\|\nabla_W L_k\|`),
    :math:`\bar G` their mean, :math:`r_k = \tilde L_k / \overline{\tilde L}` with
    :math:`\tilde L_k = L_k / L_k(0)`; all means over the active terms. A term whose :math:`L_k(0)` is 0 has no
    rate: its :math:`r_k` is 1 (its norm is drawn to the mean) and it takes no part in the mean of the rates. The
    rates need terms :math:`\ge 0`: with an active term negative now or at the first step, the target is NaN
    (whatever :math:`\alpha`; before, only a negative rate raised to a fractional :math:`\alpha` was, and terms
    negative from the start gave rates that grow as the term falls, silently), and a NaN target makes the
    gradient NaN, not 0 (as ``torch.sign`` would): the update is refused.
    """
    count = active.sum()
    known = active & (initial != 0)
    ratio = torch.where(known, terms / torch.where(known, initial, torch.ones_like(initial)), torch.zeros_like(terms))
    mean = ratio.sum() / known.sum().clamp_min(1)
    r = torch.where(known, ratio / mean, active.to(terms.dtype))
    g = weights * norms
    target = (g * active).sum() / count * r.pow(alpha)
    negative = (active & ((terms < 0) | (known & (initial < 0)))).any()
    target = torch.where(negative, torch.full_like(target, torch.nan), target)
    sign = torch.where(target.isnan(), target, torch.sign(g - target))
    return sign * norms * active


def renormalize(weights: Tensor, active: Tensor) -> Tensor:
    """Clamped at 0 and scaled to sum to the number of active terms (GradNorm's renormalisation)."""
    w = weights.clamp(min=0) * active
    return w * (active.sum() / w.sum())


WATCHED = 3  # the first meta steps at which a term's gradient norm of exactly 0 is watched for


class GradNorm(Weighting):
    r"""GradNorm: weights that balance the terms' gradient norms on a shared layer by their training rates.

    Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018, Eq. 1-2 and Alg. 1. At every iteration,
    with :math:`W` the chosen shared parameters,

    .. math::
        G_k = \|\nabla_W\, w_k L_k\|, \quad \bar G = \mathrm{mean}_k G_k, \quad
        r_k = \frac{L_k(t)/L_k(0)}{\mathrm{mean}_i\, L_i(t)/L_i(0)}, \quad
        L_{grad} = \sum_k \big|G_k - \bar G\, r_k^{\alpha}\big|,

    the target :math:`\bar G r_k^\alpha` held constant; :math:`w` takes a step on
    :math:`\nabla_w L_{grad}` and is renormalised to sum to the number of terms :math:`K`
    (clamped at 0 first, which the paper does not need to say). :math:`\alpha = 1.5` is the
    paper's value for its NYUv2 experiments. :math:`L_k(0)` are the terms of the first iteration; a
    term that is exactly 0 there (a distillation term between heads initialised to zero, which all
    give the uniform distribution) has no rate of training: its :math:`r_k` is 1 for the whole run
    (its gradient norm drawn to the mean) and the mean of the rates is over the others (its rate
    from 0 would be infinite or NaN, and one from its first value above 0, tiny, would inflate it).

    The paper takes the gradient norms on the last layer shared by all tasks. In a multi-exit
    network the parameters every exit's loss depends on are those of the first stage (exit 1
    sees nothing deeper), so pass its last layer, e.g. the last convolution of stage 1
    (``model.stages[0][-3].weight`` for the examples' BranchyNet). A later stage is not shared
    by exit 1, whose norm there would be 0.

    Cost: :meth:`loss` takes the gradient of each active term with respect to :math:`W` (a
    backward from each exit down to stage 1, batched into one vectorised backward where
    autograd can, one per term otherwise), keeping the graph for the user's backward. The
    paper updates :math:`w` with the network's optimizer; here :math:`w` has its own Adam
    (``lr``, 0.01 by default: the paper gives no one value) stepped in :meth:`meta_step`, from the
    closed-form gradient (:func:`gradnorm_gradient`). Under DDP the per-term gradients on
    :math:`W` and the terms are averaged over the ranks before the norms are taken.

    Args:
        model: the network; ``model(x)`` returns what ``criterion`` takes.
        optimizer: the model's optimizer (used by :meth:`step` only).
        criterion: the loss terms (any criterion with ``term_names``; see :class:`Weighting`).
        shared_parameters: :math:`W`, parameters of ``model`` that every term depends on.
        alpha: :math:`\alpha`, the strength of the restoring force (1.5).
        lr: the learning rate of :math:`w`'s Adam.
        term_names: the criterion's term names, where it has none.
        nonfinite: ``"raise"`` or ``"skip"`` a non-finite update or model step.
        callbacks: hooks called with each update's :class:`MetaStepRecord`.

    Example:
        >>> import torch, metaweight as mw
        >>> net = mw.MultiExit([torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)], [torch.nn.Linear(8, 3)] * 2)
        >>> w = mw.GradNorm(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2),
        ...                 shared_parameters=net.stages[0].parameters())
        >>> record = w.step((torch.randn(8, 4), torch.randint(0, 3, (8,))))
        >>> round(sum(record.gamma.values()), 4)
        3.0
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Any, *,
                 shared_parameters: Iterable[Tensor], alpha: float = 1.5, lr: float = 0.01,
                 term_names: Sequence[str] | None = None, nonfinite: Literal["raise", "skip"] = "raise",
                 callbacks: Sequence[Callable[[MetaStepRecord], None]] = ()) -> None:
        self.alpha = check_number("alpha", alpha)
        self.lr = check_number("lr", lr)
        if isinstance(shared_parameters, Tensor):
            shared_parameters = [shared_parameters]
        shared = list(shared_parameters) if isinstance(shared_parameters, Iterable) else None
        if not shared or not all(isinstance(p, Tensor) for p in shared):
            raise ValueError(f"`shared_parameters` should be a non-empty list of the model's parameters (e.g. the "
                             f"last layer of the first stage). Found {shared_parameters!r}.")
        _refuse_static_graph(model)
        super().__init__(model, optimizer, criterion, term_names=term_names, nonfinite=nonfinite,
                         callbacks=callbacks)
        owned = {id(p) for p in self.module.parameters() if p.requires_grad}
        if not all(id(p) in owned for p in shared):
            raise ValueError("`shared_parameters` should be trainable parameters of `model` (requires_grad=True).")
        self.shared_parameters = shared
        n = self._terms.num_terms
        self._index = torch.nonzero(self._terms.active).flatten().tolist()
        self.initial_losses = torch.zeros(n, device=self.device, dtype=torch.float32)
        self.exp_avg = torch.zeros(n, device=self.device, dtype=torch.float32)
        self.exp_avg_sq = torch.zeros(n, device=self.device, dtype=torch.float32)
        self._norms: Tensor | None = None
        self._grads: Tensor | None = None  # the last loss() call's term gradients
        self._zero: set[str] | None = None  # the terms whose norm was 0 at every meta step so far (the first few)
        self._batched = True  # vectorised per-term backward, until autograd refuses it once
        self._setup()

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"initial_losses": self.initial_losses, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    _nonnegative = {"exp_avg_sq": "Adam's second moment is a mean of squares",
                    "initial_losses": "L_k(0), the terms of its first update, are refused negative"}
    _gamma_sum = "active"  # (renormalised to the number of active terms)

    def _term_gradients(self, terms: Tensor) -> Tensor:
        """``[A, P]``: the gradient of each active term on the shared parameters, flattened."""
        selected = terms[self._index]
        count = len(self._index)
        grads: Sequence[Tensor | None] | None = None
        if self._batched:
            try:
                eye = torch.eye(count, dtype=selected.dtype, device=selected.device)
                grads = torch.autograd.grad(selected, self.shared_parameters, grad_outputs=eye, retain_graph=True,
                                            allow_unused=True, is_grads_batched=True)
            except RuntimeError:
                self._batched = False
        if grads is None:
            per_term = [torch.autograd.grad(selected[i], self.shared_parameters, retain_graph=True, allow_unused=True)
                        for i in range(count)]
            grads = [None if all(g[j] is None for g in per_term) else
                     torch.stack([g[j] if g[j] is not None else torch.zeros_like(p) for g in per_term])
                     for j, p in enumerate(self.shared_parameters)]
        flat = [g.reshape(count, -1) if g is not None else torch.zeros(count, p.numel(), device=p.device, dtype=p.dtype)
                for g, p in zip(grads, self.shared_parameters)]
        return torch.cat(flat, 1).float()

    def _combine(self, terms: Tensor) -> Tensor:
        _refuse_static_graph(self.model)  # (set after the weighting was built, with ddp._set_static_graph())
        self._grads = self._mean_over_ranks(self._term_gradients(terms)) if terms.requires_grad else None
        return super()._combine(terms)

    def _per_call(self, terms: Tensor) -> dict[str, Tensor]:
        assert self._grads is not None  # (a training loss: its terms have a graph)
        return {"terms": terms, "grads": self._grads}  # (with accumulation: the whole batch's gradients)

    def meta_step(self, train_batch: Any = None, val_batch: Any = None) -> MetaStepRecord:
        grads = self._accumulated("grads")
        if self._iteration_terms() is not None and grads is None:
            raise ValueError("GradNorm.meta_step needs the gradients of the terms, but the last loss() call had no "
                             "graph (was it under torch.no_grad()?). Call weighting.loss(model(x), y) with autograd "
                             "on before the step. Nothing was changed.")
        if grads is not None:
            norms = torch.zeros(self._terms.num_terms, device=grads.device, dtype=torch.float32)
            norms[self._index] = torch.linalg.vector_norm(grads, dim=1)
            if self.num_calls < WATCHED:
                self._watch_zero_norms(norms)
            self._norms = norms
        try:
            return super().meta_step(train_batch, val_batch)
        finally:
            self._norms = None

    def _watch_zero_norms(self, norms: Tensor) -> None:
        """Warn, once, where an active term's gradient norm on the shared parameters was exactly 0 at each of the
        first :data:`WATCHED` meta steps: it does not reach them (an early exit's terms do not pass through a later
        stage), and GradNorm would raise its weight without bound while the others fall. A 0 at one step (heads
        initialised to zero) passes. One read at each of those steps, none after."""
        zero = {n for n, z in zip(self.term_names, host_read([(norms == 0) & self._active])) if z}
        self._zero = zero if self._zero is None else self._zero & zero
        if self.num_calls + 1 == WATCHED and self._zero:
            warn_user(f"GradNorm: the terms {sorted(self._zero, key=self.term_names.index)} had a gradient of exactly "
                      f"0 on the shared parameters at each of the first {WATCHED} meta steps: they do not depend on "
                      f"them (an early exit's terms do not pass through a later stage), and GradNorm raises their "
                      f"weights without bound while the others fall. Give shared_parameters that every term depends "
                      f"on, the last layer all exits share (e.g. the first stage's last layer).")

    def _propose(self, terms: Tensor | None, train_batch: Any) -> dict[str, Tensor]:
        assert terms is not None and self._norms is not None
        terms = terms.to(self.gamma)
        initial = terms * self._active if self.num_meta_steps == 0 else self.initial_losses
        grad = gradnorm_gradient(self.gamma, self._norms, terms, initial, self._active, self.alpha)
        w, m, v = adam_update(self.gamma, grad, self.exp_avg, self.exp_avg_sq, self.num_meta_steps + 1, lr=self.lr)
        return {"initial_losses": initial, "exp_avg": m, "exp_avg_sq": v, "gamma": renormalize(w, self._active)}

    def _refuses(self, terms: Tensor) -> Tensor:
        """An active term negative (:func:`gradnorm_gradient`'s NaN target): L_k(0), the terms of the first update,
        are never negative (refused there and in a checkpoint), so the terms now decide."""
        return (self._active & (terms < 0)).any()

    def _nonfinite_hint(self, terms: Mapping[str, float] | None) -> str:
        # (L_k(0) is never negative: the first update refuses it, and so does load_state_dict)
        active = {n for n, a in zip(self.term_names, host_read([self._active])) if a}  # (an error path)
        negative = [n for n, v in (terms or {}).items() if v < 0 and n in active]
        if negative:
            return (f"GradNorm's training rates L_k(t)/L_k(0) need terms >= 0, now and at its first meta step "
                    f"(L_k(0)); {negative} are negative. Shift such a term by a constant (its gradient is the same) "
                    f"or weigh it with another method. ")
        return ""

    def _options(self) -> str:
        return f"alpha={self.alpha}, lr={self.lr}, shared_parameters={sum(p.numel() for p in self.shared_parameters)}"


def _refuse_static_graph(model: nn.Module) -> None:
    """GradNorm's ``loss()`` takes each term's gradient with ``torch.autograd.grad`` before the loop's backward;
    under ``DistributedDataParallel(static_graph=True)`` that desynchronises DDP's gradient buckets, and the ranks'
    parameters drift apart without an error (PyTorch's behaviour, without metaweight too; helper-182 measured 0.39
    between the ranks after 4 steps)."""
    ddp, _ = unwrap_model(model)  # (under torch.compile too; helper-183)
    if ddp is not None and getattr(ddp, "static_graph", False):
        raise ValueError("GradNorm takes each term's gradient with torch.autograd.grad in loss(), before your "
                         "backward: under DistributedDataParallel(static_graph=True) that leaves DDP's gradient "
                         "all-reduce out of step, and the ranks' parameters drift apart without an error. Build the "
                         "DDP model without static_graph (find_unused_parameters=True works), or use another "
                         "weighting. Nothing was changed.")
