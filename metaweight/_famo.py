"""FAMO: Fast Adaptive Multitask Optimization (Liu, Liu, Jin, Stone & Liu, NeurIPS 2023)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from metaweight._checks import check_has_values, in_dtype, per_term, real_numbers
from metaweight._hypergradient import call_with
from metaweight._randomness import model_generators, rewound_to, rng_state
from metaweight._record import MetaStepRecord
from metaweight._transaction import Scratch, host_equal, host_read
from metaweight._walk import current_walk, walk
from metaweight._warn import warn_user
from metaweight._weighting import Weighting, adam_update, batch_samples, check_number, first_labels

EPS = 1e-8  # as the official implementation: keeps log(L - L*) finite at the bound
# a term weighing less than 1 / this of the heaviest in FAMO's step (z / (L - L* + EPS)) stalls: warned of
NEAR_BOUND_RATIO = 1000.0


def famo_softmax(logits: Tensor, active: Tensor) -> Tensor:
    """:math:`z = \\mathrm{softmax}(\\xi)` over the active terms (0 on the others)."""
    return torch.softmax(torch.where(active, logits, torch.full_like(logits, -torch.inf)), 0)


def famo_logit_gradient(logits: Tensor, before: Tensor, after: Tensor, min_losses: Tensor, active: Tensor) -> Tensor:
    r""":math:`J_{\mathrm{softmax}}(\xi)^\top \delta` with
    :math:`\delta_k = \log(L_k^{before} - L_k^*) - \log(L_k^{after} - L_k^*)` (0 on inactive terms)."""
    z = famo_softmax(logits, active)
    delta = torch.where(active, (before - min_losses + EPS).log() - (after - min_losses + EPS).log(),
                        torch.zeros_like(before))
    return z * (delta - (z * delta).sum())


class FAMO(Weighting):
    r"""FAMO: weights that make every term's log-loss fall at the same rate, in :math:`O(1)` time and memory.

    Liu, Liu, Jin, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
    following the official implementation (``famo.py`` in ``Cranial-XIX/FAMO``). With logits
    :math:`\xi` (one per term, starting at 0), :math:`z = \mathrm{softmax}(\xi)` and
    :math:`D_k = L_k - L_k^* + 10^{-8}`, the model steps on

    .. math::
        \mathcal{L} = \frac{1}{c} \sum_k z_k \log D_k, \qquad c = \sum_k z_k / D_k
        \ \text{(a constant)},

    i.e. on :math:`\sum_k \frac{z_k}{c D_k} L_k`. After the model's step the terms are computed
    again on the same batch at the new parameters, and

    .. math::
        \delta_k = \log D_k^{\text{before}} - \log D_k^{\text{after}}, \qquad
        \xi \leftarrow \mathrm{Adam}\big(\xi,\ J_{\mathrm{softmax}}(\xi)^\top \delta\big)

    with learning rate ``lr`` (:math:`\beta` in the paper, 0.025) and L2 decay ``weight_decay``
    (the paper's regularisation :math:`\gamma`; 1e-3 here, the official ``famo.py`` example uses
    0.01). :attr:`gamma` and :meth:`gamma_dict` report :math:`z`, the paper's weights (a softmax:
    positive, sum 1); the weight each raw term gets in the gradient is :math:`z_k / (c D_k)`.

    :meth:`meta_step` needs ``train_batch`` (the batch of the step just taken) and runs one
    forward without gradient on it, with the model's buffers copied (BatchNorm statistics are
    not updated twice) and the random state restored (dropout draws are not consumed): the
    method's one extra cost; it runs under the autocast the :meth:`loss` call ran under. Under DDP
    both loss vectors are averaged over the ranks, so every rank holds the same :math:`\xi`; the
    raw terms' weights :math:`z_k / (c D_k)` in :meth:`loss` are each rank's own (no collective in
    :meth:`loss`, which ranks may call unevenly: logging, uneven accumulation, ``Join``), so the
    model's step is close to, not equal to, that of one process on the ranks' batches together
    (every rank's the same).

    With gradient accumulation (several :meth:`loss` calls and backwards, one optimizer step),
    :math:`L^{\text{before}}` is the mean of those calls' terms, weighted by the labels each
    scores, and :meth:`meta_step` needs the whole batch, the micro-batches concatenated in order
    (``weighting.meta_step((torch.cat(xs), torch.cat(ys)))``): its one forward gives
    :math:`L^{\text{after}}` on the same samples (a part of them is refused, nothing changed). The
    model's step is not the whole batch's FAMO step: each :meth:`loss` call weighs its raw terms by
    :math:`z_k / (c D_k)` with its own micro-batch's :math:`D_k` and :math:`c` (the whole batch's
    are not known until its last micro-batch), so an accumulated step differs from one on the
    micro-batches concatenated as :math:`\log` of a mean differs from a mean of :math:`\log`\ s
    (on the digits CNN at 10 steps, two micro-batches of 32: raw-term weights 0.397, 0.358, 0.245
    and 0.375, 0.372, 0.253, against 0.386, 0.365, 0.249 on the 64 together). An
    optimizer that evaluates a closure several times per step (``torch.optim.LBFGS``) is read at
    its last evaluation, in the two calls (:meth:`step` has no closure to give it and refuses it).
    A :meth:`meta_step` after backwards that no optimizer step followed (a ``GradScaler`` skipped
    it) learns nothing: no loss changed.

    Args:
        model: the network; ``model(x)`` returns what ``criterion`` takes.
        optimizer: the model's optimizer (used by :meth:`step` only).
        criterion: the loss terms (any criterion with ``term_names``; see :class:`Weighting`).
        lr: the learning rate of the logits' Adam (the paper's :math:`\beta`).
        weight_decay: the logits' L2 regularisation (the paper's :math:`\gamma`).
        min_losses: :math:`L^*`, a lower bound of each term (default 0: cross-entropies and
            distillation terms are >= 0): one per term, or a dict from term name to bound.
        term_names: the criterion's term names, where it has none.
        nonfinite: ``"raise"`` or ``"skip"`` a non-finite update or model step.
        callbacks: hooks called with each update's :class:`MetaStepRecord`.

    Example:
        >>> import torch, metaweight as mw
        >>> net = mw.MultiExit([torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)], [torch.nn.Linear(8, 3)] * 2)
        >>> w = mw.FAMO(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2))
        >>> record = w.step((torch.randn(8, 4), torch.randint(0, 3, (8,))))
        >>> round(sum(record.gamma.values()), 6)
        1.0
    """

    reads_train_batch = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Any, *, lr: float = 0.025,
                 weight_decay: float = 1e-3, min_losses: Sequence[float] | Mapping[str, float] | Tensor | None = None,
                 term_names: Sequence[str] | None = None, nonfinite: Literal["raise", "skip"] = "raise",
                 callbacks: Sequence[Callable[[MetaStepRecord], None]] = ()) -> None:
        self.lr = check_number("lr", lr)
        self.weight_decay = check_number("weight_decay", weight_decay)
        super().__init__(model, optimizer, criterion, term_names=term_names, nonfinite=nonfinite,
                         callbacks=callbacks)
        n = self._terms.num_terms
        if min_losses is None:
            bound = torch.zeros(n, dtype=torch.float32)
        else:
            check_has_values(min_losses, "`min_losses`", "FAMO")
            # bools, complex numbers, strings: not bounds
            values = real_numbers(per_term(min_losses, self.term_names, "min_losses"))
            if values is None or len(values) != n or not all(math.isfinite(v) for v in values):
                raise ValueError(f"`min_losses` should hold one finite lower bound per term, shape ({n},) for "
                                 f"{self.term_names}. Found {min_losses!r}.")
            bound = in_dtype(values, torch.float32, "min_losses")
        self.min_losses = bound.to(self.device)
        # the active terms' bounds on the host, for the warning of terms at them (read in no step)
        self._bounds = {name: value for name, value, on in zip(self.term_names, bound.tolist(),
                                                                self._terms.active.tolist()) if on}
        self.logits = torch.zeros(n, device=self.device, dtype=torch.float32)
        self.exp_avg = torch.zeros(n, device=self.device, dtype=torch.float32)
        self.exp_avg_sq = torch.zeros(n, device=self.device, dtype=torch.float32)
        self._scratch = Scratch()  # the buffers' copy for the forward after the step, kept between steps
        self._setup()

    _said_at_bound = False  # whether terms at their bound were warned of

    def _initial_gamma(self) -> Tensor:
        return famo_softmax(torch.zeros(self._terms.num_terms, dtype=torch.float32), self._terms.active.cpu())

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"logits": self.logits, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    _nonnegative = {"exp_avg_sq": "Adam's second moment is a mean of squares"}
    _gamma_sum = "one"

    def _gamma_of(self, state: Mapping[str, Any]) -> Tensor:
        return famo_softmax(state["logits"].float().cpu(), self._terms.active.cpu())

    def loss(self, outputs: Any, target: Any) -> Tensor:
        device = self.device.type
        # the terms after the step are computed under the same autocast as these, so that delta compares like with like
        self._autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return super().loss(outputs, target)

    def _combine(self, terms: Tensor) -> Tensor:
        z = self._constant_weights()
        d = torch.where(self._active, terms - self.min_losses.to(terms) + EPS, torch.ones_like(terms))
        c = (z / d).sum().detach()
        return (z * d.log()).sum() / c

    def _check_batch(self, train_batch: Any) -> None:
        if train_batch is None:
            raise ValueError("FAMO.meta_step(train_batch) needs the batch of the step just taken, to compute the "
                             "terms again at the new parameters: weighting.meta_step((x, y)). Nothing was changed.")
        super()._check_batch(train_batch)
        given, group = batch_samples(train_batch[1]), self._iteration()
        if group is not None and group.calls > 1 and given != group.samples:
            raise ValueError(f"FAMO.meta_step got a batch of {given} samples, but this iteration's {group.calls} "
                             f"loss() calls (gradient accumulation) scored {group.samples}: FAMO compares the terms "
                             f"before and after the step on the same samples. Pass the whole batch, the "
                             f"micro-batches concatenated in order: weighting.meta_step((torch.cat(xs), "
                             f"torch.cat(ys))). Nothing was changed.{self._load_note}")
        self._check_same_labels(train_batch[1], group)

    def _check_same_labels(self, target: Any, group: Any) -> None:
        """Refuse a ``train_batch`` whose labels are not those this iteration's :meth:`loss` calls scored (in
        order): FAMO's delta compares the terms of one batch before and after the step, and another batch's
        would make it noise. Free when the labels are the very tensor loss() got; one comparison on the device
        and one read otherwise. Labels only: another batch with the same labels is not caught."""
        saved = [t for _, t in sorted(group.labels, key=lambda call: call[0])] if group is not None else []
        given = first_labels(target)
        if not saved or given is None or any(t is None for t in saved) or (len(saved) == 1 and saved[0] is given):
            return
        expected = saved[0] if len(saved) == 1 else torch.cat([t.reshape(t.shape[0], -1) for t in saved])
        given_flat = given if len(saved) == 1 else given.reshape(given.shape[0], -1)
        if given_flat.shape == expected.shape and given_flat.dtype == expected.dtype and \
                host_equal(given_flat, expected.to(given_flat.device)):
            return
        unreached = self._unreached[1] if self._unreached is not None else None
        if unreached is not None and (unreached is given or (
                unreached.shape == given.shape and unreached.dtype == given.dtype and
                host_equal(given, unreached.to(given.device)))):
            raise ValueError("FAMO.meta_step got the batch of a loss() call that no backward and no optimizer step "
                             "have followed yet: FAMO compares the terms of a batch before and after the step taken "
                             "on it, so meta_step comes after it: loss = weighting.loss(model(x), y); "
                             "loss.backward(); optimizer.step(); weighting.meta_step((x, y)). Nothing was changed.")
        raise ValueError("FAMO.meta_step got a batch whose labels are not those of this iteration's loss() "
                         f"call{'s' if len(saved) > 1 else ''}: FAMO compares the terms of the same batch before and "
                         "after the step. Pass the batch the step was taken on: loss = weighting.loss(model(x), y); "
                         "...; weighting.meta_step((x, y))" + (", the micro-batches concatenated in order"
                                                                if len(saved) > 1 else "") +
                         ". Nothing was changed." + self._load_note)

    @torch.no_grad()
    def _terms_after_step(self, train_batch: Any) -> Tensor:
        """The terms on ``train_batch`` at the current parameters, leaving buffers and random state as they were."""
        x, y = train_batch
        module = self.module
        params = dict(walk(module).parameters)
        buffers = self._scratch.copy_of(dict(current_walk(module).buffers))  # (as the step's forward left them)
        # every generator the forward may draw from put back after it (torch's, NumPy's, Python's, the module's
        # own: torch.random.fork_rng keeps torch's alone)
        start = rng_state(self.device, model_generators(module))
        enabled, dtype = getattr(self, "_autocast", (False, None))
        # without autocast's cache: inside the loss() call's autocast region (step() run under autocast, or a
        # meta_step in the loop's `with autocast`) the cache holds the parameters cast *before* the step, and the
        # forward would compute the terms at the old parameters: a delta of about 0, the update lost
        with rewound_to(start, self.device), torch.autocast(self.device.type, dtype=dtype, enabled=enabled,
                                                            cache_enabled=False):
            outputs = call_with(module, params, buffers, x)
        return self._terms(outputs, y).float()

    def _propose(self, terms: Tensor | None, train_batch: Any) -> dict[str, Tensor]:
        assert terms is not None
        after = self._mean_over_ranks(self._terms_after_step(train_batch))
        # (read only by this update's refusal, for its hint: a term below its bound after the step)
        self._after = (self.num_calls, after.detach())
        grad = famo_logit_gradient(self.logits, terms.to(self.logits), after.to(self.logits), self.min_losses,
                                   self._active)
        xi, m, v = adam_update(self.logits, grad, self.exp_avg, self.exp_avg_sq, self.num_meta_steps + 1,
                               lr=self.lr, weight_decay=self.weight_decay)
        xi = xi * self._active
        return {"logits": xi, "exp_avg": m, "exp_avg_sq": v, "gamma": famo_softmax(xi, self._active)}

    def _said_of_terms(self, terms: dict[str, float], gamma: dict[str, float]) -> None:
        """Warn (once) where some active terms weigh less than 1 / :data:`NEAR_BOUND_RATIO` of the heaviest in the
        next step, naming the others (a term at or near its bound, or several, e.g. margins met; terms 1000 times
        nearer their bound than others, of a smaller scale, too): FAMO weighs each term's gradient by z_k / (L_k -
        min_losses_k + 1e-8) over the sum of those weights, so a term at or near its bound (a margin penalty met or
        nearly, a task with no labels in the batch scored 0) takes nearly all of the weight and each of the others
        gets about its distance from its bound over theirs: training on them stalls, without a refusal (the log
        stays finite). Terms whose weights differ less than that (distillation terms beside cross-entropies at the
        start of dense distillation) are not warned of. From the host values of the update (``gamma`` the new z),
        and the terms it read: under gradient accumulation the mean of the calls' (averaged over the ranks, so that
        every rank judges alike). Each call weighs its terms by their own distances from their bounds, but a task
        without labels in one micro-batch leaves the others trained on the rest, and a term at 0 in a small trailing
        micro-batch stalls nothing: judging each call alone warned of those (helper-187), and per rank under
        DistributedDataParallel, on one rank only (helper-188)."""
        if self._said_at_bound:
            return
        bounds = getattr(self, "_bounds", {})  # (a FAMO pickled by an earlier metaweight has none: not warned)
        active = [n for n, value in terms.items() if n in bounds and math.isfinite(value) and value >= bounds[n]]
        if len(active) < 2:
            return
        weights = {n: gamma[n] / (terms[n] - bounds[n] + EPS) for n in active}
        total = sum(weights.values())
        if not total > 0 or not math.isfinite(total):
            return
        # the terms that stall: each weighs less than 1 / NEAR_BOUND_RATIO of the heaviest (a gap between neighbours
        # missed cross-entropies at 0.04 % each under distillation terms graded between 5e-4 and 2e-3, helper-184; a
        # share looked at one split missed a penalty at 99.79 %, helper-183); named: the others, which take the weight
        heaviest = max(weights.values())
        stalled = [n for n in active if weights[n] * NEAR_BOUND_RATIO < heaviest]
        if stalled:
            taking = sorted((n for n in active if n not in stalled), key=lambda n: -weights[n])
            share = sum(weights[n] for n in taking) / total
            self._said_at_bound = True
            said = ", ".join(f"{n} = {terms[n]:.6g} (min_losses {bounds[n]:.6g})" for n in taking)
            low = ", ".join(f"{n} = {terms[n]:.6g}" for n in stalled)
            warn_user(f"FAMO: the term(s) {said} are near their bound, against the others, and take "
                      f"{100 * share:.6g} % of the next step's weight; the term(s) {low} each weigh under "
                      f"1/{NEAR_BOUND_RATIO:g} of the heaviest ({100 * (1 - share):.3g} % together). FAMO weighs each "
                      f"term's gradient by z_k / (L_k - min_losses_k + 1e-8), normalised over the terms: with a plain "
                      f"SGD step their gradients count that much less, and training on them may stall (an optimizer "
                      f"that rescales each parameter's step, such as Adam, still moves the parameters only they "
                      f"reach). Where a term sits at or near a bound it reaches (a margin penalty met, a distillation "
                      f"term between heads that agree, a task without labels in a batch), pass min_losses well below "
                      f"it (e.g. -1); where the terms' scales merely differ (an MSE in the thousands beside a "
                      f"cross-entropy), scale the terms, or use another weighting. (Said once.)")

    def _nonfinite_hint(self, terms: Mapping[str, float] | None) -> str:
        if not terms:
            return ""
        n = len(self.term_names)
        kept = getattr(self, "_after", None)  # (the terms after the step, where this call's update took them)
        after = kept[1] if kept is not None and kept[0] == self.num_calls else None
        values = host_read([self.min_losses, self._active] + ([after] if after is not None else []))
        bounds, active = dict(zip(self.term_names, values[:n])), dict(zip(self.term_names, values[n:2 * n]))
        stepped = dict(zip(self.term_names, values[2 * n:]))
        below = [f"{n} = {v:.6g} <= {bounds[n]:.6g}{when}" for when, seen in (("", terms), (" after the step", stepped))
                 for n, v in seen.items() if active[n] and math.isfinite(v) and not v - bounds[n] + EPS > 0]
        if not below:
            return ""
        return (f"FAMO takes log(L_k - min_losses_k), before and after each step, which needs every term above its "
                f"bound; these terms are at or below their min_losses: {', '.join(below)} (the log of a "
                f"non-positive number). Pass min_losses under every value the terms can take: 0 (the default) for "
                f"cross-entropies and distillation terms, a lower bound for a loss that can go below 0. ")

    def _options(self) -> str:
        return f"lr={self.lr}, weight_decay={self.weight_decay}"
