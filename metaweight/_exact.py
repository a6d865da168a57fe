"""``mode="exact"``: the paper's order (HDKD Alg. 1), gamma's meta step first, then the model's step.

The meta step asks the backend (:mod:`metaweight._backends`) for :math:`\\nabla_\\gamma
L_{val}(\\theta')` on the parameters as they are, without changing the model or its optimizer, and
steps gamma on the device; :meth:`ExactMode.step` then takes the model's step on the loss weighted
by the new gamma, inside the step transaction (:mod:`metaweight._transaction`), with one read for
both decisions. This module owns that order and its rules: ``meta_every``'s calls without a
look-ahead, ``step()``'s refusal of sparse gradients, and ``reuse_forward`` (the model's step
backpropagates through the meta step's training forward, where the backend keeps its graph).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from torch import Tensor

from metaweight._backends import Backend
from metaweight._capture import sparse_trained
from metaweight._gradcheck import check_gradients_once
from metaweight._checks import (NO_TRAINING_GRADIENT, check_differentiable, one_sample_batchnorm, summarize_step_labels,
                               unpack_batch)
from metaweight._protocols import call_model
from metaweight._randomness import model_generators, rng_state, set_rng_state
from metaweight._record import MetaStepRecord
from metaweight._transaction import PendingMeta, explained, host_read
from metaweight._walk import walk

if TYPE_CHECKING:  # (the weighter imports this module)
    from metaweight._weighter import HarmonizedWeighter


class ExactMode:
    """The meta step by a backend on the parameters as they are, then the model's step with its gamma.

    Args:
        backend: how the meta-gradient is computed (``None`` with ``learn=False``).
        lookahead_names: the parameters the look-ahead moves (``None``: all; ``lookahead_params``).
    """

    def __init__(self, backend: Backend | None, lookahead_names: set[str] | None) -> None:
        self.backend = backend
        self.lookahead_names = lookahead_names

    def meta_step(self, w: HarmonizedWeighter, train_batch: Any, val_batch: Any) -> MetaStepRecord:
        """:meth:`HarmonizedWeighter.meta_step`: the look-ahead and its decision, the model untouched."""
        calls = w.num_calls
        try:
            pending, _ = self.lookahead(w, train_batch, val_batch, keep_graph=False)
        except BaseException:  # (an interruption too)
            w.num_calls = calls  # a call that raised counts for nothing
            raise
        if isinstance(pending, MetaStepRecord):
            return pending
        try:
            return w._meta_outcome(pending, host_read(pending.values))
        except BaseException:  # (a hook's interrupt too)
            w.num_calls = calls  # a refused meta step (nonfinite="raise") counts for nothing either
            raise

    def lookahead(self, w: HarmonizedWeighter, train_batch: Any, val_batch: Any, keep_graph: bool,
                  read_gamma: bool = True, checked: bool = False) -> tuple[MetaStepRecord | PendingMeta, Tensor | None]:
        """The meta step up to its decision, on the device: a :class:`PendingMeta` for
        ``_meta_outcome`` (or, on a call without a look-ahead, its record); with ``keep_graph`` also
        the training terms with their graph (jvp/fd backends). A call without a look-ahead reads gamma
        for its record only with ``read_gamma`` (``step`` reads it with its own decision instead).
        ``checked``: the caller ran the loop's checks and the gradient check of this call already."""
        if w.learn and w.num_calls % w.meta_every == 0 and not checked:
            w._check_loop()  # options and hooks set since the last meta step, before anything changes
            check_gradients_once(w, train_batch, val_batch)  # (once)
        w.num_calls += 1
        if not w.learn or (w.num_calls - 1) % w.meta_every:
            gamma = w.gamma_dict() if read_gamma else {}
            return MetaStepRecord(w.num_calls, meta_step=w.num_meta_steps, gamma=gamma), None
        train = unpack_batch(train_batch, "train_batch")
        val = unpack_batch(val_batch, "val_batch")
        assert self.backend is not None
        device = w.gamma.device
        # the look-ahead's training forward draws the random numbers (dropout masks) the model's own forward
        # of this iteration then draws again: the generators are put back where they were, so that the step
        # taken is the step looked ahead with. Where the model's step reuses the look-ahead's forward
        # (keep_graph), the backend leaves them where that forward left them instead, where the model's own
        # forward would (and where they were if it raises): the same state either way, so reuse_forward
        # changes no later dropout mask
        start = None if keep_graph else rng_state(device, model_generators(w.module))
        try:
            result = self.backend.meta_gradient(
                w.module, w._inner_optimizer, w._terms, w._objective, w.gamma.detach(), train, val,
                lookahead_names=self.lookahead_names, keep_graph=keep_graph, reducer=w._reducer,
            )
        except BaseException as exc:  # (an interruption too)
            w.num_calls -= 1  # a meta step that raised did not happen
            said = one_sample_batchnorm(exc, {"training": train[1], "validation": val[1]})
            if said is exc:
                raise
            raise said from exc
        finally:
            if start is not None:
                set_rng_state(start, device)
        gamma_grad = result.gamma_grad * w._active
        pending = w._step_gamma(gamma_grad, result.objective, result.exit_losses, result.terms.detach(), val[0])
        return pending, (result.terms if keep_graph else None)

    def step(self, w: HarmonizedWeighter, train_batch: Any, val_batch: Any) -> MetaStepRecord:
        """:meth:`HarmonizedWeighter.step`: the meta step, then the model's step on the loss weighted by
        the new gamma (by the old one where the meta step is refused); one read decides both."""
        x, y = unpack_batch(train_batch, "train_batch")
        keep = w.reuse_forward and self.backend is not None and self.backend.reuses_forward
        sparse = sparse_trained(walk(w.module).embeddings)  # (the step's walk; read now: frozen or not)
        if sparse:
            raise ValueError(f"step() takes the model's step itself, checking every gradient for finiteness, which the "
                             f"sparse gradients of {sparse} (sparse=True) do not allow. Build them with sparse=False, "
                             f"freeze them (requires_grad_(False)), or call meta_step (backend='higher' or 'finite_difference') in your own loop. Nothing "
                             f"was changed.")
        if w.learn and w.num_calls % w.meta_every == 0:
            w._check_loop(own_backward=True)  # before the transaction: a refusal leaves the gradients as they are too
            check_gradients_once(w, train_batch, val_batch)  # (once)
        transaction = w._transaction
        saved = transaction.begin(w)
        summarize_step_labels(train_batch, val_batch, w.criterion, w.validation, w._reducer)
        try:
            pending, terms = self.lookahead(w, train_batch, val_batch, keep_graph=keep, read_gamma=False,
                                            checked=True)
            if terms is None:
                terms = w._terms(call_model(w.model, x), y)
            loss = w._weighted(terms)  # with the new gamma, or the old one where the meta step is refused
            check_differentiable(loss, NO_TRAINING_GRADIENT)
            w._zero_grad()
            loss.backward()  # on every rank, so DDP's gradient all-reduce never waits for a rank that stopped
            # one read for both decisions: the meta step's and the model step's
            meta_values = pending.values if isinstance(pending, PendingMeta) else []
            step = transaction.decide(w, loss, terms, meta_values)
            if isinstance(pending, PendingMeta):
                metrics = w._meta_outcome(pending, step.meta, call_hooks=False)  # raises if refused, "raise"
            else:
                metrics = pending
            if step.finite:  # (an optimizer that raises part-way may have written to its own state)
                if w.clip_grad_norm is not None:  # (learn=False: exact mode with learning refuses clipping)
                    w.clip_grad_norm(p for _, p in w._trainable())
                w.optimizer.step()
        except BaseException as exc:  # (an interruption too: put back, then on its way)
            w._zero_grad()
            transaction.rollback(w, saved)
            if not isinstance(exc, Exception):
                raise
            why = explained(exc, w._trainable(), "step() checks every gradient for finiteness", w._inner_optimizer)
            if why is exc:
                raise
            raise why from exc
        if not step.finite:
            message = transaction.refuse(w, step, saved)
            return dataclasses.replace(metrics, loss=step.loss, skipped=True, model_step_skipped=True, terms=step.terms,
                                       gamma=metrics.gamma or step.gamma, message=message)
        record = dataclasses.replace(metrics, loss=step.loss, model_step_skipped=False, terms=step.terms,
                                     gamma=metrics.gamma or step.gamma)
        if record.ran and not record.skipped:  # the hooks, once the step it reports stands
            w.last_meta = record
            w._report(record, lambda: transaction.keep_model_step(w, saved), f"the model's step stands and is counted (num_calls={w.num_calls}); gamma, its "
                      f"optimizer and the validation average are as before the call (the model stepped with the "
                      f"gamma of this call's meta step, which is not kept). Do not call step() again on this batch "
                      f"(the model would step twice): go on with the next batch.")
        return record
