r"""``mode="fast"``: the model's real step is the look-ahead, and gamma learns from it for the next one.

The model steps with the gamma it has (one meta step stale), :math:`\theta' = \theta - U(g)`; then
:math:`v = \nabla L_{val}(\theta')` at the parameters it moved to, and the directional derivative of
the terms at :math:`\theta` along :math:`w = D \odot v` (:math:`D` the step's diagonal Jacobian) by
one forward difference gives :math:`\nabla_\gamma = -\partial_w L(\theta)`. This module owns the
mode's rules: what it refuses at construction, the one-call :meth:`FastMode.step` (the model's step
inside the step transaction, :mod:`metaweight._transaction`), and :meth:`FastMode.meta`, the
meta-gradient of a step taken, which the two-call form (``loss``, the user's own step,
``meta_step``; its capture is :mod:`metaweight._capture`) uses too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

from metaweight._backends import optimizer_refusal
from metaweight._checks import (NO_TRAINING_GRADIENT, all_padding_message, check_differentiable, checked_target,
                               float_leaves, one_sample_batchnorm, summarize_step_labels, unpack_batch)
from metaweight._clipping import EPSILON, clip_transpose
from metaweight._gradcheck import check_gradients_once
from metaweight._hypergradient import along, call_with, difference, step_length, validation_direction
from metaweight._optimizers import lookahead_update, unweighted_term
from metaweight._protocols import call_model
from metaweight._randomness import (NEW_GENERATOR, model_generators, new_generators, replay_randomness, rng_state,
                                   same_rng_state)
from metaweight._record import MetaStepRecord
from metaweight._transaction import (FlatCopies, ModelStep, Scratch, explained, fused_step, host_read,
                                    nonfinite_flag, step_unless)
from metaweight._walk import walk
from metaweight._warn import SKIP_META_STEPS
from metaweight._weighting import HOOK_RAISED

if TYPE_CHECKING:  # (the weighter imports this module)
    from metaweight._weighter import HarmonizedWeighter

COMPILED_RANDOM = ("The torch.compile'd model drew random numbers (dropout or the like) in its training forward: "
                   "mode='fast' replays that forward eagerly, whose random numbers differ from the compiled ones. "
                   "Use mode='exact', or compile a model without random layers (or call the weighter with the "
                   "uncompiled model).")


class NotReproduced(ValueError):
    """The training forward, replayed at the step's parameters, gave other terms than ``loss()`` got
    (:data:`NOT_REPRODUCED`); the two-call form looks for a cause it can name (``_refuse_outside_moved`` in :mod:`metaweight._twocall`)."""


NOT_REPRODUCED = (
    "The training forward could not be reproduced: run again at the step's parameters, inputs and random numbers, "
    "the model and criterion give other terms than weighter.loss got. Something they depend on changed since "
    "loss(), or changes at each call, which the look-ahead does not replay: an attribute set between loss() and "
    "meta_step (a temperature, a prior, a KD temperature of the criterion), a buffer or frozen weights updated "
    "(an EMA teacher), a forward argument that is not a tensor (model(x, scale=0.5) but meta_step((x, y))), random "
    "numbers the criterion draws, or Python state the forward changes (a call counter setting a drop rate). "
    "mode='fast' cannot score that step: change such state after meta_step, pass the same arguments, or use "
    "mode='exact'. gamma is unchanged.")

_NONFINITE_VAL = ("The validation batch's inputs hold inf or NaN: the meta step cannot be scored. Check the validation "
                  "data. gamma and the validation average are unchanged.")
_NONFINITE_VAL_REFUSED = _NONFINITE_VAL + (" The model's step was not taken: parameters, buffers, optimizer state and "
                                           "counters are as before this call." + SKIP_META_STEPS)


class FastMode:
    """The model's step as the look-ahead: the one-call step and the meta-gradient of a step taken.

    :meth:`meta` reads each loss of the step as a :class:`Piece`.
    """

    def __init__(self) -> None:
        self._fresh_buffers = Scratch()  # forwards at theta start from copies of the saved buffers
        self._theta = FlatCopies()  # the parameters before the step: its look-ahead's base point, and what a refusal puts back

    @staticmethod
    def check(optimizer: torch.optim.Optimizer, lookahead_params: Any, *, backend: str = "jvp",
              distributed: bool = False) -> None:
        """Refuse, at construction, what the mode cannot look ahead with: an optimizer whose step it
        cannot replay in closed form (:func:`~metaweight._backends.optimizer_refusal`), and a look-ahead
        restricted to some parameters."""
        if lookahead_params is not None:  # (first: whatever the optimizer)
            raise ValueError("mode='fast' looks ahead with the model's real step, over every parameter; "
                             "`lookahead_params` applies to mode='exact' only.")
        refusal = optimizer_refusal(optimizer, "fast", backend, distributed=distributed)
        if refusal is not None:
            raise refusal

    def step(self, w: HarmonizedWeighter, train_batch: Any, val_batch: Any) -> MetaStepRecord:
        r""":meth:`HarmonizedWeighter.step`: the model steps with the gamma it has; that step is the
        look-ahead, :math:`\theta' = \theta - U(g)`, scored by :meth:`meta`, which updates gamma for the
        next step.

        With a meta step to run and the optimizer a torch optimizer itself (not a wrapper, whose step has
        effects of its own: Lightning's step count, Accelerate's scaler), the model's step is taken before it
        is decided: its finiteness stays on the device, the meta step runs at the parameters it moved to, and
        one read decides both (the model's step, the validation inputs' finiteness, the meta step's outcome);
        a refused model step is then put back, parameters (from the look-ahead's base point), optimizer state
        (:class:`~metaweight._transaction.OptimizerSnapshot`, or the fused kernels' ``found_inf``), buffers
        and gamma, bit for bit. Otherwise the model's step is decided first (one read) and the meta step
        after it (a second)."""
        try:
            return self._step(w, train_batch, val_batch)
        finally:
            w._transaction.optimizer_state.release()

    def _step(self, w: HarmonizedWeighter, train_batch: Any, val_batch: Any) -> MetaStepRecord:
        x, y = unpack_batch(train_batch, "train_batch")
        xv, yv = unpack_batch(val_batch, "val_batch")
        if w.num_calls % w.meta_every == 0:
            w._check_loop()  # options, hooks and parameters set since the last meta step, before anything changes
            check_gradients_once(w, train_batch, val_batch)  # (once)
        transaction = w._transaction
        saved = transaction.begin(w)  # before the count: anything raised or refused below leaves it as it was
        w.num_calls += 1
        run_meta = (w.num_calls - 1) % w.meta_every == 0
        summarize_step_labels(train_batch, val_batch, w.criterion, w.validation, w._reducer)
        w._pending = w._stepped = None
        named = w._trainable()
        device = next(p.device for _, p in named)
        low = torch.is_autocast_enabled(device.type)  # the difference's base point is then recomputed in float32
        generators = model_generators(w.module)
        transform = flag = theta = None
        snapshot = fused = False  # the optimizer's state saved in this call (a step taken ahead is put back from it)
        if w._watch is not None:
            w._watch.paused = True  # this forward's random numbers are replayed below
        try:
            with replay_randomness(device, generators) as replay:
                start = rng_state(device, generators) if w._compiled and run_meta else None
                outputs = call_model(w.model, x)
                appeared = new_generators(w.module, generators) if run_meta else []
                if appeared:  # before the step: its random numbers could not be drawn again
                    raise ValueError(NEW_GENERATOR.format(names=", ".join(appeared)))
                if start is not None and not same_rng_state(start, rng_state(device, generators)):
                    raise ValueError(COMPILED_RANDOM)
                terms = w._terms(outputs, y)
                if run_meta:
                    _check_val_labels(w, outputs, xv, yv, x, y)  # before the model's step, which a refusal spares
                loss = w._weighted(terms)
                check_differentiable(loss, NO_TRAINING_GRADIENT)
                w._zero_grad()
                loss.backward()
                if run_meta:  # (a criterion's parameter the optimizer steps: refused, the call put back below)
                    w._check_outside_model()
                # a non-finite validation input joins the step's decision (every rank alike)
                bad_input = w._reducer.mean([nonfinite_flag(torch.zeros((), device=device), float_leaves(xv))])[0] \
                    if run_meta else None
                # the model's step taken before its decision: by a torch optimizer itself (a wrapper's step, or a
                # function set as the instance's step, has effects no snapshot puts back), over the model's
                # trainable parameters only (what a refusal puts back)
                ahead = run_meta and w.optimizer is w._inner_optimizer and _own_step(w.optimizer) and \
                    _steps_only(w._inner_optimizer, named)
                if ahead:  # stepped now, decided with the meta step
                    flag = transaction.flag(loss)
                    # a fused optimizer skips a refused step on the device (its state's values need no copy)
                    # (refused with it: non-finite validation inputs under nonfinite="raise")
                    fused = fused_step(w._inner_optimizer)
                    transaction.optimizer_state.save(w._inner_optimizer, values=not fused)
                    snapshot = True
                    transform = clip_in_step(w, named) if w.clip_grad_norm is not None else None
                    theta, jac = before_step(w._inner_optimizer, named, [p.grad for _, p in named], w.gamma,
                                             w._active, copies=self._theta)
                    if fused:
                        refused = (flag + bad_input) if w.nonfinite == "raise" else flag
                        step_unless(w.optimizer, w._inner_optimizer, refused.reshape(()) > 0)
                    else:
                        w.optimizer.step()
                else:  # decided now (one read), so that a refusal comes before the model's step
                    step = transaction.decide(w, loss, terms, [bad_input] if run_meta else [])
                    bad_val = step.finite and run_meta and step.meta[0] != 0.0
                    if bad_val and w.nonfinite == "raise":
                        raise ValueError(_NONFINITE_VAL_REFUSED)
                    if step.finite and w.clip_grad_norm is not None:
                        if run_meta:
                            transform = clip_in_step(w, named)
                        else:
                            w.clip_grad_norm(p for _, p in named)
                    if step.finite and run_meta:
                        theta, jac = before_step(w._inner_optimizer, named, [p.grad for _, p in named], w.gamma,
                                                 w._active)
                    if step.finite:
                        w.optimizer.step()
        except BaseException as exc:
            if snapshot:  # an error of the step taken ahead (or an interruption in it): decided as without it
                step = transaction.decide(w, loss, terms, [bad_input], flag=flag, gamma=saved.state.gamma)
                bad_val = step.finite and step.meta[0] != 0.0
                # put back: a non-fused step (parameters and state copied), and what a fused kernel skipped
                # (found_inf: the entries a first step made); a fused step its kernel took stands, parameters
                # and state alike, as torch left them
                if not fused or not step.finite or (bad_val and w.nonfinite == "raise"):
                    self._put_back(w, named, None if fused else theta)
                if isinstance(exc, Exception) and not step.finite:  # refused, as without the step
                    return self._refuse_step(w, named, None, step, saved)
                if isinstance(exc, Exception) and bad_val and w.nonfinite == "raise":
                    w._zero_grad()
                    transaction.rollback(w, saved)
                    raise ValueError(_NONFINITE_VAL_REFUSED) from exc
            w._zero_grad()  # as the exact mode's step(): the call's gradients are dropped
            transaction.rollback(w, saved)
            if not isinstance(exc, Exception):  # (an interruption: what is refused put back, then on its way)
                raise
            why = explained(exc, named, "mode='fast' replays the optimizer's step on dense gradients only",
                            w._inner_optimizer)
            if why is exc:
                raise
            raise why from exc
        finally:
            if w._watch is not None:
                w._watch.paused = False
        piece = Piece(x, y, terms.detach(), outputs, replay, low)
        if ahead:
            return self._score_and_decide(w, named, theta, jac, piece, xv, yv, transform, loss, terms, flag,
                                          bad_input, saved)
        if not step.finite:
            return _model_step_record(w, step, transaction.refuse(w, step, saved))
        if not run_meta:
            return _model_step_record(w, step)
        if bad_val:  # nonfinite="skip": the model's step stands, the meta step is skipped
            return self._skip_meta(w, step)
        if w._watch is not None:
            w._watch.paused = True  # the meta step's forwards are not the user's (no record, no fingerprint)
        try:
            record = self.meta(w, named, theta, jac, [piece], xv, yv, transaction.buffers.as_dict(), transform,
                               after_step=True, call_hooks=False)
            return _reported(w, dataclasses.replace(record, loss=step.loss, model_step_skipped=False,
                                                    terms=step.terms), saved)
        except BaseException as exc:
            _step_stands(w, saved, exc)
            raise
        finally:
            if w._watch is not None:
                w._watch.paused = False

    def _score_and_decide(self, w: HarmonizedWeighter, named: list[tuple[str, Tensor]], theta: dict[str, Tensor],
                          jac: list[Tensor | float], piece: Piece, xv: Any, yv: Any, transform: Any, loss: Tensor,
                          terms: Tensor, flag: Tensor, bad_input: Tensor, saved: Any) -> MetaStepRecord:
        """:meth:`step` after the model's step taken ahead of its decision: the meta step at the parameters it
        moved to, then one read deciding the model's step, the validation inputs and the meta step."""
        transaction = w._transaction
        before = saved.state.gamma  # the gamma the model's step was taken with, for the record of its refusal
        if w._watch is not None:
            w._watch.paused = True  # the meta step's forwards are not the user's (no record, no fingerprint)
        try:
            pending = w._step_gamma(*self.meta_gradient(w, named, theta, jac, [piece], xv, yv,
                                                        transaction.buffers.as_dict(), transform))
            step = transaction.decide(w, loss, terms, [bad_input, *pending.values], flag=flag, gamma=before)
        except BaseException as exc:
            # an error of the meta step (its validation pass, a forward hook in it): decided as the step would
            # have been before the meta step ran. A model step that was not finite is refused, and one with
            # non-finite validation inputs refused (nonfinite="raise") or its meta step skipped ("skip"), as
            # below; otherwise the model's step stands and the error propagates. An interruption (not an
            # Exception) propagates in every case, after what is refused is put back.
            step = transaction.decide(w, loss, terms, [bad_input], flag=flag, gamma=before)
            bad_val = step.finite and step.meta[0] != 0.0
            if not isinstance(exc, Exception) or (step.finite and not bad_val):
                if not step.finite or (bad_val and w.nonfinite == "raise"):
                    self._undo(w, named, theta, saved)
                else:
                    _step_stands(w, saved, exc)
                raise
            pending = None
            if bad_val and w.nonfinite == "skip":
                w._transaction.keep_model_step(w, saved)
        finally:
            if w._watch is not None:
                w._watch.paused = False
        if not step.finite:
            return self._refuse_step(w, named, theta, step, saved)
        if step.meta[0] != 0.0:  # a non-finite validation input
            if w.nonfinite == "raise":
                self._undo(w, named, theta, saved)
                raise ValueError(_NONFINITE_VAL_REFUSED)
            if pending is not None:  # nonfinite="skip": the model's step stands, the meta step is skipped
                pending.saved.restore(w.gamma)
            return self._skip_meta(w, step)
        try:
            record = w._meta_outcome(pending, step.meta[1:], call_hooks=False, after_step=True)
            return _reported(w, dataclasses.replace(record, loss=step.loss, model_step_skipped=False,
                                                    terms=step.terms), saved)
        except BaseException as exc:  # a meta step hook that raised
            _step_stands(w, saved, exc)
            raise

    @staticmethod
    def _skip_meta(w: HarmonizedWeighter, step: Any) -> MetaStepRecord:
        """``nonfinite="skip"`` with non-finite validation inputs: the model's step stands, the meta step is
        skipped (warned of and counted)."""
        record = w._refuse(_NONFINITE_VAL, math.nan, [], list(step.terms.values()), after_step=True)
        return dataclasses.replace(record, loss=step.loss, model_step_skipped=False, terms=step.terms)

    def _put_back(self, w: HarmonizedWeighter, named: list[tuple[str, Tensor]], theta: dict[str, Tensor] | None
                  ) -> None:
        """Undo the model's step taken ahead of its decision: the parameters from the look-ahead's base point,
        the optimizer's state from its snapshot (the buffers and gamma are the transaction's rollback)."""
        if theta is not None:  # (None: the step failed before the parameters were copied, and before it moved them)
            with torch.no_grad():
                torch._foreach_copy_([p for _, p in named], [theta[n] for n, _ in named])
        w._transaction.optimizer_state.restore()
        torch.clear_autocast_cache()  # half-precision copies an enclosing autocast made of the stepped weights

    def _undo(self, w: HarmonizedWeighter, named: list[tuple[str, Tensor]], theta: dict[str, Tensor],
              saved: Any) -> None:
        """Put back the whole call: the model's step (:meth:`_put_back`), the gradients dropped, and the
        transaction's rollback (buffers, gamma, its optimizer, the validation average, the counters)."""
        self._put_back(w, named, theta)
        w._zero_grad()
        w._transaction.rollback(w, saved)

    def _refuse_step(self, w: HarmonizedWeighter, named: list[tuple[str, Tensor]], theta: dict[str, Tensor] | None,
                     step: Any, saved: Any) -> MetaStepRecord:
        """A model step found non-finite after it was taken: put it back, then refuse it as the transaction
        refuses one never taken (raise, or skip and report)."""
        self._put_back(w, named, theta)
        return _model_step_record(w, step, w._transaction.refuse(w, step, saved))

    def meta(self, w: HarmonizedWeighter, named: list[tuple[str, Tensor]], theta: dict[str, Tensor],
             jac: list[Tensor | float], pieces: list[Any], xv: Any, yv: Any, buffers: dict[str, Tensor],
             transform: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None, *,
             after_step: bool = False, call_hooks: bool = True) -> MetaStepRecord:
        """:meth:`meta_gradient`, then gamma's step from it (one read decides it)."""
        gamma_grad, objective, exit_losses, reported = self.meta_gradient(w, named, theta, jac, pieces, xv, yv,
                                                                          buffers, transform)
        return w._apply(gamma_grad, objective, exit_losses, reported, after_step=after_step, call_hooks=call_hooks,
                        val_inputs=xv)

    def meta_gradient(self, w: HarmonizedWeighter, named: list[tuple[str, Tensor]], theta: dict[str, Tensor],
                      jac: list[Tensor | float], pieces: list[Any], xv: Any, yv: Any, buffers: dict[str, Tensor],
                      transform: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r"""The meta-gradient, the model having stepped from ``theta`` to where it is now:
        :math:`v = \nabla L_{val}` here, :math:`w = J_T^\top (D \odot v)` (``jac`` is D, ``transform``
        :math:`J_T^\top`), and the sum over the step's losses (``pieces``, each with the factor its
        backward used, or that factor over the losses' sum where ``transform`` is taken relative to it: a
        GradScaler's scale in neither, see :meth:`~metaweight._twocall.TwoCall._gradient_transform`) of the
        one-sided difference of the terms at ``theta`` along :math:`w`, from each
        loss's own terms (or, with ``recompute``, from the terms recomputed in float32 under its
        ``replay``, for half-precision or random forwards). Returns gamma's gradient, the validation
        objective, its exit losses and the step's terms, on the device (a host read only for a piece
        with ``check``)."""
        try:
            return self._meta_gradient(w, named, theta, jac, pieces, xv, yv, buffers, transform)
        except ValueError as exc:  # (torch's refusal of a one-sample batch in a BatchNorm: which batch, what to do)
            said = one_sample_batchnorm(exc, {"validation": yv}, unchanged=False)
            if said is exc:
                raise
            raise said from exc

    def _meta_gradient(self, w: HarmonizedWeighter, named: list[tuple[str, Tensor]], theta: dict[str, Tensor],
                       jac: list[Tensor | float], pieces: list[Any], xv: Any, yv: Any, buffers: dict[str, Tensor],
                       transform: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # the terms of the training forwards, whatever the difference recomputes
        reported = pieces[0].terms
        if len(pieces) > 1:  # gradient accumulation: the average over the whole batch
            sizes = [float(_batch_size(p.y)) for p in pieces]
            reported = sum(p.terms.double() * (n / sum(sizes)) for p, n in zip(pieces, sizes)).to(reported.dtype)
        # the model stepped in place: half-precision copies autocast cached of the old weights are stale
        torch.clear_autocast_cache()
        # validation at the parameters the model has now moved to (on copies of its buffers)
        params = dict(walk(w.module).parameters)
        objective, exit_losses, direction = validation_direction(w.module, w._objective, params, xv, yv,
                                                                 named, jac, w._reducer)
        if transform is not None:
            direction = transform(direction)
        h = step_length(theta, direction, w.fd_epsilon, order=1)  # one-sided: 64 sqrt(machine eps) x RMS
        with torch.no_grad():
            device = next(iter(theta.values())).device
            here = dict(walk(w.module).parameters)  # (no_grad)
            names = list(theta)
            moved = dict(zip(names, along([theta[n] for n in names], [direction[n] for n in names], h)))
            differences, unlike = [], []
            for piece in pieces:

                def terms_at(at: dict[str, Tensor], teachers: Any = None, piece: Any = piece) -> tuple[Tensor, Any]:
                    # the forward and the criterion under the training forward's random numbers, in its order
                    # (a criterion may draw too); differences of half-precision forwards drown in rounding:
                    # these run in full precision
                    with piece.replay(), torch.autocast(device.type, enabled=False):
                        outputs = call_with(w.module, {**here, **at}, self._fresh_buffers.copy_of(buffers), piece.x)
                        if teachers is None:
                            teachers = tree_map(lambda o: o.detach() if isinstance(o, Tensor) else o, outputs)
                        # (a criterion without `teacher_outputs` recomputes its targets: where it detaches them
                        # the difference is not autograd's, which the gradient check refuses)
                        fixed = teachers if w._terms.fixed_targets else None
                        return w._terms(outputs, piece.y, teacher_outputs=fixed), teachers

                if piece.recompute:
                    base, teachers = terms_at(theta)
                else:
                    base = piece.terms
                    teachers = tree_map(lambda o: o.detach() if isinstance(o, Tensor) else o, piece.outputs)
                if piece.check:  # the training forward, replayed, must give its own terms again (to rounding)
                    tol = 64 * torch.finfo(piece.terms.dtype).eps
                    unlike.append(~torch.isclose(base.double(), piece.terms.double().to(base.device), rtol=tol,
                                                 atol=tol).all())
                plus, _ = terms_at(moved, teachers)
                change = difference(plus, base, h, 1.0)
                if isinstance(piece.factor, Tensor):  # the factor the loop's backward used (relative: see above)
                    change = change * piece.factor.double()
                differences.append(change)
            if unlike and host_read([torch.stack([u.to(device) for u in unlike]).any()])[0]:
                raise NotReproduced(NOT_REPRODUCED)
            derivative = differences[0] if len(differences) == 1 else torch.stack(differences).sum(0)
            derivative = w._reducer.mean([derivative])[0]
        gamma_grad = (-derivative).to(w.gamma) * w._active
        return gamma_grad, objective, exit_losses, reported.detach()


@dataclasses.dataclass
class Piece:
    """One loss of the model's step, for fast mode's one-sided difference: its inputs and labels, its
    terms and outputs, how to replay its forward's random numbers, whether to recompute its base
    point, and the factor its backward used."""

    x: Any
    y: Any
    terms: Tensor
    outputs: Any
    replay: Callable[[], Any]
    recompute: bool
    factor: Tensor | None = None  # None: 1
    check: bool = False  # the recomputed base point must reproduce ``terms`` (a full-precision forward)



def clip_in_step(w: HarmonizedWeighter, named: list[tuple[str, Tensor]]) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    r""":meth:`step`'s own clipping (``clip_grad_norm``): clip the gradients in place, and return the map
    :math:`w \mapsto J_T^\top w` of that clipping, all on the device."""
    clip = w.clip_grad_norm
    assert clip is not None
    grads = [p.grad for _, p in named]
    norm = clip(p for _, p in named)
    coef = torch.clamp(clip.max_norm / (norm + EPSILON), max=1.0).double()  # as clip_grad_norm_ computes it
    norm = norm.double()
    rho = torch.where(coef < 1, norm / (norm + EPSILON), torch.zeros_like(norm))
    present = [g for g in grads if g is not None]
    copies = iter(torch._foreach_mul(present, 1.0) if present else [])
    seen = [next(copies) if g is not None else None for g in grads]  # clipped: a positive multiple of u
    names = [n for n, _ in named]
    return lambda direction: clip_transpose(direction, names, seen, coef, rho, clip.norm_type)


@torch.no_grad()
def before_step(optimizer: torch.optim.Optimizer, named: list[tuple[str, Tensor]],
                grads: list[Tensor | None], gamma: Tensor, active: Tensor, copies: FlatCopies | None = None
                ) -> tuple[dict[str, Tensor], list[Tensor | float]]:
    """Just before the optimizer's step: the parameters and the step's diagonal Jacobian D (a fused Adam's
    step counts read on the device, not the host), Adam's D 0 where the gradient is exactly 0 unless a term
    the criterion computes (``active``) has weight 0 in ``gamma`` (:func:`~metaweight._optimizers.drop_unreached`:
    the one-sided difference runs along D times the validation gradient). With ``copies`` the parameters are
    copied into its flat storage (valid until its next copy), else cloned."""
    _, jac = lookahead_update(optimizer, [p for _, p in named], grads, jacobian_only=True, device_counts=True,
                              keep_unreached=unweighted_term(gamma, active))
    if copies is not None:
        return dict(zip([n for n, _ in named], copies.copy([p.detach() for _, p in named]))), jac
    return {n: p.detach().clone() for n, p in named}, jac


def _reported(w: HarmonizedWeighter, record: MetaStepRecord, saved: Any) -> MetaStepRecord:
    """The record :meth:`FastMode.step` returns, given to the hooks (and kept as ``last_meta``) where its meta step
    was kept: the hooks get the very record ``step()`` returns, its ``loss`` too, as the exact mode's; a hook that
    raises has the meta step put back, the model's step standing (the weighter's one rule, ``_report``)."""
    if record.ran and not record.skipped:
        w.last_meta = record
        w._report(record, lambda: w._transaction.keep_model_step(w, saved),
                  f"the model's step stands and is counted (num_calls={w.num_calls}); gamma, its optimizer and the "
                  f"validation average are as before the call. Do not call step() again on this batch (the model "
                  f"would step twice): go on with the next batch.")
    return record


def _model_step_record(w: HarmonizedWeighter, step: ModelStep, refusal: str | None = None) -> MetaStepRecord:
    """The record of a call without a meta step: its model step taken, or refused with the message ``refusal`` (not
    counted: it reports the iteration it was made as, which the next call takes again, as the exact mode's does)."""
    return MetaStepRecord(w.num_calls + (refusal is not None), skipped=refusal is not None, meta_step=w.num_meta_steps,
                          gamma=step.gamma, terms=step.terms, loss=step.loss, model_step_skipped=refusal is not None,
                          message=refusal)


def _own_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` is its class's own, or torch's LR-scheduler wrapper of it (which notes the call
    in ``_opt_called``, put back with the state): a function set on the instance (an EMA update after each step)
    has effects no snapshot puts back."""
    step = optimizer.__dict__.get("step")
    return step is None or (getattr(step, "_wrapped_by_lr_sched", False) and
                            getattr(step, "__wrapped__", None) is getattr(type(optimizer), "step", None))


def _steps_only(optimizer: torch.optim.Optimizer, named: list[tuple[str, Tensor]]) -> bool:
    """Whether ``optimizer`` steps only parameters of ``named``: every other parameter it holds has no gradient
    (a frozen one), where a group added since construction may hold a criterion's parameter, which a refused
    step taken ahead would not put back."""
    ours = {id(p) for _, p in named}
    return all(p.grad is None or id(p) in ours for g in optimizer.param_groups for p in g["params"])


def _step_stands(w: HarmonizedWeighter, saved: Any, exc: BaseException) -> None:
    """An error after the model's step, found finite: :meth:`StepTransaction.keep_model_step`, and the error says
    so (a hook's error has been, where it left the hook: :func:`_reported`)."""
    if getattr(exc, HOOK_RAISED, False):
        return
    calls = w._transaction.keep_model_step(w, saved)
    if hasattr(exc, "add_note"):  # (Python 3.11+: the error keeps its type; an interrupt is told too)
        exc.add_note(
            f"metaweight: this error came after the model's step, which mode='fast' takes before scoring "
            f"it: the step stands and is counted (num_calls={calls}); gamma, its optimizer and the "
            f"validation average are as before. Do not call step() again on this batch (the model would "
            f"step twice): fix the validation batch or objective and go on with the next batch.")


def _batch_size(y: Any) -> int:
    leaves = [t for t in tree_leaves(y) if isinstance(t, Tensor) and t.dim() > 0]
    return int(leaves[0].shape[0]) if leaves else 1


def _labels_expected(x: Any, y: Any, xv: Tensor) -> set[int] | range | None:
    """The numbers of validation labels that fit inputs ``xv`` as the training batch's labels ``y`` fit its inputs
    ``x``: its labels are one per entry of some run of ``x``'s dimensions (one per input, (B,) for (B, ...);
    one per token, (B*T,) for (B, T, ...); one per input of a sequence-first batch, (B,) for (T, B, ...)), and
    the validation batch's the same run of its own (each batch padded to its own length). Where several runs
    fit the training batch (B == T), any of them: what the validation forward gives is not known before the
    model's step. ``None`` where no run fits (nothing to judge); without a training batch to compare (inputs
    that are no tensor, of another number of dimensions), a whole multiple of ``xv``'s first dimension."""
    if not (isinstance(x, Tensor) and isinstance(y, Tensor) and x.dim() == xv.dim() and y.dim() > 0):
        n = int(xv.shape[0])
        return range(n, 2 ** 62, n) if n > 0 else {0}
    runs = [(i, j) for i in range(x.dim()) for j in range(i + 1, x.dim() + 1)
            if math.prod(int(d) for d in x.shape[i:j]) == int(y.shape[0])]
    return {math.prod(int(d) for d in xv.shape[i:j]) for i, j in runs} or None


def _check_val_labels(w: HarmonizedWeighter, outputs: Any, xv: Any, yv: Any, x: Any = None, y: Any = None) -> None:
    """The fast step scores its validation batch after the model's step: refuse before it what can be
    judged now. For class labels scored by the library's own objective (``BalancedValidation``):
    integer labels, as the training batch has them (when the inputs are one tensor: one per input, or one
    per token for labels flattened over tokens, ``(B*T,)`` for inputs ``(B, T, ...)``, whose T may be another
    than the training batch's: each batch padded to its own longest; see :func:`_labels_expected`), in
    the classes the training outputs have (the labels' summary is already read: no host read)."""
    from metaweight._on_outputs import OnOutputs
    from metaweight._validation import BalancedValidation

    validation = w.validation
    while isinstance(validation, OnOutputs):  # (the part of the outputs it scores)
        outputs, validation = validation._selected(outputs), validation.loss
    if not isinstance(validation, BalancedValidation) or not isinstance(outputs, (list, tuple)) or not outputs \
            or not isinstance(outputs[0], Tensor) or outputs[0].dim() not in (2, 3):
        return
    if isinstance(xv, Tensor) and isinstance(yv, Tensor) and xv.dim() > 0 and yv.dim() > 0:
        expected = _labels_expected(x, y, xv)
        if expected is not None and int(yv.shape[0]) not in expected:
            fit = f"a whole multiple of {expected.step}" if isinstance(expected, range) else " or ".join(
                str(n) for n in sorted(expected))
            raise ValueError(
                f"The validation batch has inputs of shape {tuple(xv.shape)} but {yv.shape[0]} labels, where "
                f"{fit} would be labelled as the training batch is ("
                + ("a whole number per input" if isinstance(expected, range)
                   else f"{y.shape[0]} labels for inputs of shape {tuple(x.shape)}")
                + "): pass one label per input, or one per token for labels flattened over tokens ((B*T,) for "
                  "inputs (B, T, ...), T the validation batch's own). Nothing was changed (mode='fast' checks this "
                  "before the model's step).")
    tokens = outputs[0].shape[1] if outputs[0].dim() == 3 else None
    size = yv.shape[0] if isinstance(yv, Tensor) and yv.dim() > 0 else 0
    if isinstance(yv, Tensor) and yv.numel() == 0:
        raise ValueError(f"The validation batch is empty (labels of shape {tuple(yv.shape)}): the validation "
                         f"objective is a mean over its samples and needs one. Nothing was changed (mode='fast' "
                         f"checks this before the model's step).")
    _, (_, _, scored) = checked_target(
        yv, size, outputs[0].shape[-1], "validation target",
        tokens=yv.shape[1] if tokens is not None and isinstance(yv, Tensor) and yv.dim() == 2 else tokens,
        ignore_index=w.validation.ignore_index)
    if scored == 0:
        raise ValueError(all_padding_message("validation batch", w.validation.ignore_index) +
                         " Nothing was changed (mode='fast' checks this before the model's step).")
