"""``mode="fast"``, two-call form: the meta step after the user's own step, from what the capture read.

The loop is ``loss = w.loss(model(x), y)``, its own backward, clipping, accumulation and
``optimizer.step()``, then ``w.meta_step((x, y), val_batch)``. :mod:`metaweight._capture` reads the
loop as it runs (the losses' factors, the gradients, the step, the training forwards),
:mod:`metaweight._moves` whether anything but the step moved the parameters; :class:`TwoCall`
checks that record against the batch ``meta_step`` gets, refuses what cannot be scored before
anything changes, and hands the step to :meth:`metaweight._fast.FastMode.meta`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from metaweight._capture import (LET_GO, TOLERANCE, GradSnapshot, Micro, Pending, module_modes, requires_grad_message,
                                tensor_leaves, value_print, values_print, version_of)
from metaweight._checks import unpack_batch as _unpack
from metaweight._clipping import EPSILON, clip_transpose, total_norm
from metaweight._fast import COMPILED_RANDOM as _COMPILED_RANDOM
from metaweight._fast import NotReproduced, Piece
from metaweight._gradcheck import check_gradients_once
from metaweight._optimizers import FAST_OUTSIDE_MODEL
from metaweight._moves import MOVED_AFTER_STEP, MOVED_BEFORE_STEP, fingerprint, moved, moved_each, shapes_of
from metaweight._protocols import ModelCall, model_arguments
from metaweight._randomness import (NEW_GENERATOR, model_generators, replay_randomness, rewound_to, rng_state,
                                   set_rng_state)
from metaweight._record import MetaStepRecord
from metaweight._transaction import (gradients_moved, host_equal, host_read, not_stepped_message,
                                     resumed_mid_step_message)
from metaweight._warn import SKIP_META_STEPS, warn_user
from metaweight._weighting import HOOK_RAISED
from metaweight._walk import current_walk

if TYPE_CHECKING:  # (the weighter imports this module)
    from metaweight._weighter import Batch, HarmonizedWeighter

    # the map w -> J_T^T w of what happened to the gradients between backward and step, and what the losses'
    # factors are divided by for it (TwoCall._gradient_transform); (None, None): nothing happened to them
    _Transform = tuple[Callable[[dict[str, Tensor]], dict[str, Tensor]] | None, Tensor | None]


# said at the meta_step after an optimizer step that took gradients whose meta_step had come before it
BEFORE_THE_STEP = ("mode='fast': the optimizer's last step took the gradients of weighter.loss calls whose meta_step "
                   "had already run before it, and was skipped with no step to score (warned then): the loop calls "
                   "weighter.meta_step before optimizer.step(), or after every micro-batch of an accumulated step, "
                   "so every meta step is skipped and gamma never learns. The fast mode scores the step taken: call "
                   "meta_step once per optimizer step, after it, with the step's whole batch (the micro-batches' "
                   "inputs and labels concatenated in order): loss = weighter.loss(model(x), y); loss.backward(); "
                   "optimizer.step(); weighter.meta_step((x, y), val_batch). gamma is unchanged.")


class TwoCall:
    """:meth:`HarmonizedWeighter.meta_step` with ``mode="fast"``: the meta-gradient of the step the
    loop took since :meth:`HarmonizedWeighter.loss`, or a ``ValueError`` before anything changes."""

    def meta_step(self, w: HarmonizedWeighter, train_batch: Batch, val_batch: Batch) -> MetaStepRecord:
        """``mode="fast"``, two-call form: the meta step after the user's own step (see :meth:`meta_step`).
        Everything it can refuse is checked before anything changes."""
        x, y = _unpack(train_batch, "train_batch")
        xv, yv = _unpack(val_batch, "val_batch")
        if w._stepped_let_go:
            w._stepped_let_go = False  # (said once per such step)
            raise ValueError(BEFORE_THE_STEP)
        if w._watch is not None:
            w._watch.forget()  # the iteration's forwards: a later loss() is the next iteration's
        run_meta = w.num_calls % w.meta_every == 0
        pending, stepped_before = w._pending, w._stepped
        if w._stepped is not None and (pending is None or (pending.theta is None and not pending.stepped())):
            # what came after the step (a loss() to log) was not stepped on. A later loss() a backward went
            # through is the next iteration's (its step skipped by a GradScaler, or not taken yet): the earlier
            # step, whose meta_step raised or was not called, is not this call's to score
            pending = w._stepped
        if run_meta and w._nothing_to_score():
            # no loss() call and no optimizer step since the last meta step (or since built or loaded): a batch the
            # loop skipped before its loss() call (Lightning's manual optimization), or a second call
            w.num_calls += 1
            return MetaStepRecord(w.num_calls, skipped=True, meta_step=w.num_meta_steps, gamma=w.gamma_dict(),
                                  message="No optimizer step came since the last weighter.meta_step, nor a "
                                          "weighter.loss call: there is no step to score; gamma is unchanged.")
        if run_meta and pending is None:
            raise ValueError("mode='fast': meta_step comes after the model's step, and needs the training loss from "
                             "weighter.loss(outputs, y) of this iteration: loss = weighter.loss(model(x), y); "
                             "loss.backward(); optimizer.step(); weighter.meta_step((x, y), val_batch). "
                             "(Or call weighter.step(train_batch, val_batch), which does all of it.)"
                             + w._lost_calls)
        if run_meta:
            w._check_loop()  # options, hooks, other optimizers' steps: before anything changes
            # (after the loop's backward: a criterion's parameter it reached, now or at the step)
            w._check_outside_model(read=True, stepped=pending.stepped_outside)
        plan = self._plan(w, pending, x, y) if run_meta else None
        if isinstance(plan, _NonFinite) and w.nonfinite == "raise":
            raise ValueError(plan.message + SKIP_META_STEPS)
        if plan is not None and not isinstance(plan, _NonFinite):
            check_gradients_once(w, train_batch, val_batch)  # (once; after the plan's own refusals, which say more)
        pending_now, w._pending, w._stepped = w._pending, None, None
        w._resumed, w._load_note = None, ""
        w.num_calls += 1
        if isinstance(plan, _NonFinite):  # nonfinite="skip": counted and reported, nothing else changes
            return w._refuse(plan.message, math.nan, [], plan.terms)
        if not run_meta:
            return MetaStepRecord(w.num_calls, meta_step=w.num_meta_steps, gamma=w.gamma_dict())
        if plan is None and pending is not None and not pending.stepped():  # (no backward went through it yet)
            message = ("No backward has gone through this iteration's weighter.loss: the loop skipped this batch (a "
                       "non-finite loss), or weighter.meta_step came before loss.backward() and optimizer.step(). "
                       "There is no step to score; gamma is unchanged. Call it after the step: loss = "
                       "weighter.loss(model(x), y); loss.backward(); optimizer.step(); weighter.meta_step((x, y), "
                       "val_batch).")
            terms = torch.cat([micro.terms.float().reshape(-1) for micro in pending.micro])
            if not w._said_skipped and all(math.isfinite(v) for v in host_read([terms])):
                w._said_skipped = True  # (a finite loss: said once; a non-finite one is a batch skipped on purpose)
                warn_user(message + " (Said once.)")
            return MetaStepRecord(w.num_calls, skipped=True, meta_step=w.num_meta_steps,
                                  gamma=w.gamma_dict(), message=message)
        if plan is None:
            grads = [p.grad for _, p in w._trainable()]
            moved = gradients_moved(grads)
            if moved:  # a backward to come onto these gradients accumulates the losses let go here: refused
                w._let_go = GradSnapshot.refs_of(grads, True)
            message = not_stepped_message("weighter", "there is no look-ahead to score, gamma is unchanged", moved)
            return MetaStepRecord(w.num_calls, skipped=True, meta_step=w.num_meta_steps,
                                  gamma=w.gamma_dict(), message=message)
        assert pending is not None and pending.theta is not None and pending.jac is not None
        stepped, inputs, (transform, unit) = plan

        def per_loss(micro: Micro) -> Tensor | None:
            """The factor of a loss's difference: its backward's own, or, where ``transform`` rescales relative
            to the losses' own scale, that factor over their sum (``unit``)."""
            return micro.factor if unit is None or micro.factor is None else micro.factor.double() / unit.to(
                micro.factor.device)

        named = w._trainable()
        device = next(p.device for _, p in named)
        # (a hook that raises puts the meta step back, the random numbers its forwards drew too: made again, it
        # draws what it drew; kept only where there are hooks, and put back only for a hook's error, so that a
        # hook that raises nothing changes no random stream)
        start = rng_state(device, model_generators(w.module)) if w._hooks else None
        if w._watch is not None:
            w._watch.paused = True  # the look-ahead's forwards are not the user's
        try:
            with replay_randomness(device, model_generators(w.module)) as replay:
                pieces = []
                for micro, (xi, yi) in zip(stepped, inputs):
                    record = micro.forward
                    if record is not None:  # replay the training forward's own random numbers
                        again = functools.partial(rewound_to, record.start, device)
                        # the base point recomputed here, with the model and criterion as they are now, must give
                        # the terms loss() got (to rounding): anything else that changed since (a temperature, a
                        # buffer, frozen weights, a counter, the criterion's own random numbers, other arguments)
                        # would make the difference quotient, divided by h ~ 1e-8, meaningless
                        pieces.append(Piece(xi, yi, micro.terms, micro.outputs, again, True, per_loss(micro),
                                            check=not micro.low))
                    else:  # a forward the hooks did not see: a consistent difference from our own numbers
                        pieces.append(Piece(xi, yi, micro.terms, micro.outputs, replay, True, per_loss(micro)))
                return w._fast.meta(w, named, pending.theta, pending.jac, pieces, xv, yv,
                                       dict(current_walk(w.module).buffers), transform)  # (copied per forward)
        except BaseException as exc:  # (a hook's interrupt too: the call counts for nothing)
            w._pending, w._stepped, w.num_calls = pending_now, stepped_before, w.num_calls - 1
            if start is not None and getattr(exc, HOOK_RAISED, False):
                set_rng_state(start, device)
            if isinstance(exc, NotReproduced):
                _refuse_outside_moved(pending)
            raise
        finally:
            if w._watch is not None:
                w._watch.paused = False

    def _plan(self, w: HarmonizedWeighter, pending: Pending, x: Any, y: Any
                   ) -> tuple[list[Micro], list[tuple[Any, Any]], _Transform] | _NonFinite | None:
        """Check what the two-call form's loop did and say how to score its step: the losses the step
        used, their inputs, and the map :math:`w \\mapsto J_T^\\top w` of what happened to the gradients
        between backward and step with the unit of the losses' factors (:meth:`_gradient_transform`;
        ``(None, None)`` for none). ``None`` when the optimizer did not step; a
        :class:`_NonFinite` when the losses it stepped on or their gradients were not finite (decided
        before the checks of what moved and rescaled, which non-finite values would fail).
        Raises a ``ValueError`` for what cannot be scored, before anything changes."""
        if pending.error is LET_GO and not pending.stepped_on:  # a later micro-batch, not stepped on yet: skipped
            return None  # as the first (let go again), refused at the step, whatever the number of micro-batches
        if pending.error is not None:
            raise ValueError(pending.error + " gamma is unchanged.")
        stepped = pending.stepped()
        if pending.theta is None:
            if len(stepped) == 1 and (stepped[0].target_changed() or not _same_target(stepped[0].target, y)):
                raise ValueError(_OTHER_BATCH + w._load_note)
            # no backward yet: any loss() of the iteration may be the one to come (the last may be for logging)
            if not stepped and not any(not m.target_changed() and _same_target(m.target, y)
                                       for m in reversed(pending.micro)):
                raise ValueError(_OTHER_BATCH + w._load_note)
            return None
        if not stepped:
            raise ValueError("The optimizer stepped, but no backward went through the loss weighter.loss returned "
                             "(backpropagate that loss, or a multiple of it, before optimizer.step()). gamma is "
                             "unchanged.")
        resumed = w._resumed
        if resumed is not None and any(m is resumed[0] for m in stepped):  # (refused, as LET_GO: see Weighting)
            raise ValueError(resumed_mid_step_message(type(w).__name__, resumed[1], "gamma is unchanged."))
        names = [n for n, _ in w._trainable()]
        if pending.names is not None and names != pending.names:
            raise ValueError(requires_grad_message(pending.names, names, "optimizer.step() and meta_step") +
                             " gamma is unchanged.")
        inputs = _micro_inputs(w, stepped, x, y)
        unseen = next((m for m in stepped if m.forward is None), None)
        if unseen is not None:
            raise ValueError(unseen.unseen or _UNSEEN_FORWARD)
        stateful = [m for m in stepped if m.forward.stateful]
        if stateful:
            raise ValueError(_STATEFUL.format(names=stateful[0].forward.stateful))
        appeared = [name for m in stepped for name in m.forward.appeared]
        if appeared:
            raise ValueError(NEW_GENERATOR.format(names=", ".join(appeared)))
        differ = self._check_inputs(w, stepped, inputs)
        modes = module_modes(w.module)
        if any(m.forward is not None and m.forward.modes != modes for m in stepped):
            raise ValueError("Some modules changed between train and eval mode since the training forward: the "
                             "look-ahead must run them as the step did. Call meta_step before switching modes "
                             "(e.g. before model.eval()). gamma is unchanged.")
        if w._compiled and any(m.forward is not None and m.forward.drew for m in stepped):
            raise ValueError(_COMPILED_RANDOM)
        now = fingerprint([p for _, p in w._trainable()])
        device = now.device if now is not None else w.gamma.device
        no = torch.zeros((), dtype=torch.bool, device=device)
        before = pending.moved_before if pending.moved_before is not None else no
        after = moved(pending.end_print, now) if now is not None else no
        moves = torch.stack([before.to(device), after.to(device), (differ if differ is not None else no).to(device)])
        try:
            return stepped, inputs, self._gradient_transform(w, pending, stepped, moves)
        except _NonFinite as exc:
            return exc

    def _check_inputs(self, w: HarmonizedWeighter, stepped: list[Micro], inputs: list[tuple[Any, Any]]
                      ) -> Tensor | None:
        """Refuses inputs other than those the training forward got, and labels other than those
        ``loss()`` got: what Python can judge here; the values on the device, returned as one flag
        (read with the step's one read): the same tensors must hold the values they held then (a
        loader may refill its buffer without a version change), other tensors equal ones."""
        flags = []
        for micro, (xi, yi) in zip(stepped, inputs):
            assert micro.forward is not None
            args, kwargs = model_arguments(w.model, xi)
            now, then = tensor_leaves((args, kwargs)), micro.forward.inputs
            if len(now) != len(then):
                raise ValueError(_OTHER_INPUTS.format(why=f"{len(now)} input tensors, where the model got {len(then)}"))
            for t, (seen, version, print_) in zip(now, then):
                if t is seen:
                    if version_of(t) != version:
                        raise ValueError(_OTHER_INPUTS.format(why="inputs changed in place since the forward"))
                    if print_ is not None:
                        flags.append(moved(print_, value_print(t)))  # (NaN inputs equal to themselves)
                elif t.shape != seen.shape or t.dtype != seen.dtype:
                    raise ValueError(_OTHER_INPUTS.format(
                        why=f"inputs of shape {tuple(t.shape)} ({t.dtype}) where the model got {tuple(seen.shape)} "
                            f"({seen.dtype})"))
                else:
                    flags.append(moved(seen, t))  # (values that differ; NaN equal to NaN)
            if len(stepped) > 1:  # a cut of the whole batch's labels: equal to those the micro-batch's loss() got
                flags += [moved(seen, t) for t, seen in zip(tensor_leaves(yi), tensor_leaves(micro.target))
                          if t is not seen]
            if micro.target_print is not None:
                now_print = values_print(yi)
                flags.append(torch.ones((), dtype=torch.bool) if now_print is None or now_print.shape !=
                             micro.target_print.shape else moved(micro.target_print, now_print))
        if not flags:
            return None
        device = flags[0].device
        return torch.stack([f.to(device) for f in flags]).any()

    def _gradient_transform(self, w: HarmonizedWeighter, pending: Pending, stepped: list[Micro], moves: Tensor | None = None
                            ) -> _Transform:
        """How the gradients the optimizer stepped on came from those backward left (see
        :mod:`metaweight._capture`), as the map applied to the direction, and the unit of the losses' factors
        it is relative to; one host read, which also decides whether anything but the step moved the
        parameters (``moves``: [before the step, after it], :mod:`metaweight._moves`). A declared clipping is
        checked against what the optimizer got (:mod:`metaweight._clipping`).

        A rescale :math:`s` of the gradients comes with losses backpropagated with factors :math:`m_i` summing
        to :math:`m` (a ``GradScaler``'s scale, up to ``2**127``; 1/n for n micro-batches): the map scales by
        :math:`r = s\\,m` (about 1 for unscaling, the clipping's factor for clipping) and each loss's difference
        by :math:`m_i / m` (the unit, :math:`m`, on the device), the same product :math:`s\\,m_i` with neither
        factor near the scale or its inverse: ``s * direction`` would be ``1/scale`` times the validation
        gradient, whose float32 squares underflow at large scales (a step length of 0, a meta-gradient of 0)."""
        clip = w.clip_grad_norm
        device = w.gamma.device
        moves = moves.to(device).double() if moves is not None else torch.zeros(3, dtype=torch.float64, device=device)
        # the losses the step used and the gradients it got, finite: [every term finite, |T(g)|^2 finite]
        terms = torch.stack([m.terms.detach().to(device, torch.float64) for m in stepped])
        finite = torch.stack([terms.isfinite().all().double(),
                              pending.rescale[2].to(device).isfinite().double() if pending.rescale is not None
                              else torch.ones((), dtype=torch.float64, device=device)])
        if pending.rescale is None and pending.inv_scale is None and pending.cleared is None:
            values = host_read([finite, terms.reshape(-1), moves])
            _check_finite(w, values[:2], values[2:2 + terms.numel()], len(stepped))
            _check_moves(values[2 + terms.numel():])
            return None, None
        rescale = pending.rescale if pending.rescale is not None else torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
        inv = pending.inv_scale if pending.inv_scale is not None else torch.ones((), dtype=torch.float64)
        total = sum((m.factor.double().to(device) for m in stepped if m.factor is not None),
                    torch.zeros((), dtype=torch.float64, device=device))
        unit = torch.where(total != 0, total, torch.ones_like(total))  # (what the factors are relative to)
        cleared = pending.cleared if pending.cleared is not None else torch.tensor(True)
        seen = pending.seen
        # the norm of the gradients backward left, in the declared norm (float64: they are scaled by the losses'
        # factors, a GradScaler's scale up to 2**127, whose float32 squares overflow)
        seen_norm = total_norm(seen, clip.norm_type).to(device) \
            if clip is not None and seen is not None else torch.zeros((), dtype=torch.float64, device=device)
        # and with the gradients of trainable parameters no optimizer holds (a clip_grad_norm_ over
        # model.parameters() takes them in its norm; one over the optimizer's parameters does not)
        every = [a if a is not None else b for a, b in zip(seen, pending.outside)] \
            if clip is not None and seen is not None and pending.outside is not None else None
        every_norm = total_norm(every, clip.norm_type).to(device) if every is not None else seen_norm
        # and the norm clip_grad_norm_ saw: the losses' own gradient, before any clipping
        unclipped = seen_norm / torch.where(total > 0, total, torch.ones_like(total))
        unclipped_every = every_norm / torch.where(total > 0, total, torch.ones_like(total))
        common, s_t, s, r, ok, clipped_norm, unclipped, relative, clipped_every, unclipped_every, *rest = host_read([
            torch.stack([rescale[0].to(device), rescale[1].to(device), (rescale[1].to(device) * inv.to(device)),
                         rescale[1].to(device) * inv.to(device) * total, cleared.to(device).double(),
                         seen_norm * rescale[1].to(device), unclipped, rescale[1].to(device) * inv.to(device) * unit,
                         every_norm * rescale[1].to(device), unclipped_every]),
            finite, terms.reshape(-1), moves])
        _check_finite(w, rest[:2], rest[2:2 + terms.numel()], len(stepped))
        _check_moves(rest[2 + terms.numel():])
        if not ok:
            raise ValueError("The gradients changed between two backwards of one optimizer step by something other "
                             "than zero_grad (e.g. clipping each micro-batch, or a backward of another loss between "
                             "them): the step's meta-gradient is not known. Transform the gradients once, after the "
                             "last backward; backpropagate another loss with a micro-batch's weighted loss, "
                             "(loss + other).backward(). gamma is unchanged.")
        if pending.presence:
            raise ValueError(f"The gradients the optimizer stepped on are not what backward left: the parameters "
                             f"{pending.presence[:8]}{' ...' if len(pending.presence) > 8 else ''} had no gradient "
                             f"when the backward through weighter.loss ended and one at optimizer.step(), or the "
                             f"reverse (e.g. gradients from torch.autograd.grad assigned to p.grad). mode='fast' "
                             f"scores the gradients loss.backward() accumulates: call loss.backward(), or use "
                             f"mode='exact'. gamma is unchanged.")
        if not common:
            raise ValueError("Between loss.backward() and optimizer.step() the gradients changed by something other "
                             "than one common rescale of all of them: a backward of another loss after the one "
                             "weighter.loss returned (backpropagate their sum, (loss + other).backward(), or the "
                             "other loss first), clip_grad_value_, clip_grad_norm_ over only some parameters, or "
                             "gradients assigned to p.grad that are not what backward left. mode='fast' cannot "
                             "differentiate through that step; for clipping, use clip_grad_norm_ over all parameters "
                             "(declared with clip_grad_norm=), or mode='exact'. gamma is unchanged.")
        plain = abs(s - 1) <= TOLERANCE or abs(r - 1) <= 10 * TOLERANCE  # unchanged, or unscaled (a GradScaler)
        if clip is not None:
            dtype = next((g.dtype for g in seen or [] if g is not None), torch.float32)
            slack = clip.max_norm * max(10 * TOLERANCE, 16 * torch.finfo(dtype).eps)  # the norms' rounding
            # whether clip_grad_norm_ clipped is decided by the norm it saw, as torch decides it: a factor
            # within rounding of 1 may still be a clipping (a norm just above max_norm), with its Jacobian
            coef = min(1.0, clip.max_norm / (unclipped + EPSILON))
            coef_every = min(1.0, clip.max_norm / (unclipped_every + EPSILON))
            if every is not None and abs(r - coef_every) < abs(r - coef):  # clipped over model.parameters()
                seen, coef, unclipped, clipped_norm = every, coef_every, unclipped_every, clipped_every
            clipped = coef < 1 and abs(r - coef) <= abs(r - 1)
            if coef < 1 and not clipped and unclipped > clip.max_norm + slack:
                raise ValueError(f"The weighter was told the loop clips by {clip.describe()}, but the gradients the "
                                 f"optimizer got were not clipped (their norm: {clipped_norm:.6g}). "
                                 f"{w._clipping_hints.not_clipped} gamma is unchanged.")
            if clipped or not plain:  # a clipped step: its norm is max_norm * rho, within 1e-6 of max_norm
                if not clipped or abs(clipped_norm - clip.max_norm) > EPSILON + slack:
                    raise ValueError(
                        f"The gradients the optimizer got were rescaled by {r:.6g} (relative to the losses' own "
                        f"scale) to a norm of {clipped_norm:.6g} (norm_type={clip.norm_type:g}), which "
                        f"{clip.describe()}, as the weighter was told, does not give (its clipped gradients have "
                        f"norm max_norm). {w._clipping_hints.other} gamma is unchanged.")
                assert seen is not None
                names = [n for n, _ in w._trainable()]
                rho = unclipped / (unclipped + EPSILON)
                return (lambda direction: clip_transpose(direction, names, seen, relative, rho, clip.norm_type)), unit
        if abs(s - 1) <= TOLERANCE:
            return None, None
        if abs(r - 1) <= 10 * TOLERANCE:  # unscaling (a GradScaler): the step used the losses' own gradient
            return (lambda direction: {n: w * relative for n, w in direction.items()}), unit
        if r > 1:
            raise ValueError(f"The optimizer got gradients {r:.4g} times those of the losses weighter.loss returned "
                             f"(with the factors their backwards used): a rescale that is neither unscaling nor "
                             f"declared clipping (e.g. several undivided micro-batch losses under a GradScaler). "
                             f"Divide each accumulated loss by their number. gamma is unchanged.")
        raise ValueError(f"Between loss.backward() and optimizer.step() every gradient was multiplied by {r:.6g} "
                         f"(relative to the losses' own scale), and the weighter was told of no clipping: from one "
                         f"step that factor fits clip_grad_norm_ of any norm_type and a plain p.grad.mul_ alike, each "
                         f"with another meta-gradient. {w._clipping_hints.undeclared} gamma is unchanged.")


class _NonFinite(Exception):
    """A step whose losses or gradients were not finite: refused (``nonfinite="raise"``) or skipped."""

    def __init__(self, message: str, terms: list[float]) -> None:
        super().__init__(message)
        self.message, self.terms = message, terms


def _check_finite(w: HarmonizedWeighter, flags: list[float], terms: list[float], losses: int) -> None:
    """Raise :class:`_NonFinite` when the losses the step used (``terms``: each loss's terms, in order)
    or the gradients the optimizer got (``flags``: [terms finite, gradients finite]) were not finite."""
    if flags[0] == 1.0 and flags[1] == 1.0:
        return
    n = len(w.term_names)
    bad = sorted({name for i in range(losses) for name, t in zip(w.term_names, terms[i * n:(i + 1) * n])
                  if not math.isfinite(t)}, key=w.term_names.index)
    mean = [sum(terms[i * n + j] for i in range(losses)) / losses for j in range(n)]
    raise _NonFinite(
        f"The training losses weighter.loss returned (non-finite terms: {bad or 'none'}) or the gradients the "
        f"optimizer stepped on were not finite: the step taken has no meta-gradient, and the model's parameters may "
        f"now be non-finite too (weighter.step() refuses such a step before taking it). Check the data, the "
        f"learning rate and the parameters. gamma and the validation average are unchanged.", mean)


def _check_moves(flags: list[float]) -> None:
    """Refuse a step whose inputs or labels are not those of its training forward and ``loss()`` (``flags[2]``),
    or whose parameters moved by something other than the optimizer's step (``flags[0:2]``)."""
    if flags[2]:
        raise ValueError(_OTHER_INPUTS.format(why="inputs or labels whose values differ from those the model and "
                                                  "weighter.loss got: another batch, a buffer the loader refilled "
                                                  "in place (e.g. through torch.from_numpy or .data), or, with "
                                                  "gradient accumulation, a tensor each micro-batch got at the whole "
                                                  "batch's shape (taken as one each got whole) whose values are not "
                                                  "those each got, e.g. one micro-batch's labels passed for all"))
    if flags[0]:
        raise ValueError(MOVED_BEFORE_STEP)
    if flags[1]:
        raise ValueError(MOVED_AFTER_STEP)


_OTHER_BATCH = ("meta_step got another training batch than the weighter.loss call before it: pass the batch (x, y) "
                "whose loss the optimizer just stepped on.")
_CHANGED_LABELS = ("The labels given to weighter.loss were changed in place since (e.g. y.copy_(...)): the step was "
                   "taken on the labels they held then, which are gone. Change labels before weighter.loss, or on a "
                   "copy. gamma is unchanged.")
_OTHER_INPUTS = ("meta_step got other training inputs than the model's training forward ({why}), e.g. a batch "
                 "augmented before model(x): pass meta_step the inputs the model was called with, "
                 "meta_step((x_augmented, y), val_batch). gamma is unchanged.")
_STATEFUL = ("The training forward changed buffers it also reads ({names}; e.g. spectral_norm's power-iteration "
             "vectors): the look-ahead's forwards would start from the buffers as that forward left them, not as it "
             "found them, and the step's meta-gradient would be another (their values barely change the loss, but "
             "its gradient). mode='fast' refuses such forwards; use mode='exact'. gamma is unchanged.")
_UNSEEN_FORWARD = ("The outputs given to weighter.loss came from no forward of the model the weighter watched (with "
                   "gradients enabled): mode='fast' reads the training forward's random numbers, modes and inputs "
                   "through the model's forward hooks, and recomputes that forward's outputs. Call model(x), not "
                   "model.forward(x), and pass weighter.loss its outputs as they are, in the model's order: outputs "
                   "transformed first (a temperature, a prior added, exits reordered or repeated) or detached "
                   "(.detach() on an exit, or on part of one: a stop-gradient) have another meta-gradient; put such "
                   "a change in the model's forward (or use mode='exact'). A forward hook "
                   "on the model that replaces its outputs and was registered after the weighter runs after the "
                   "weighter's own hook: register it before building the weighter. gamma is unchanged.")


def _micro_inputs(w: HarmonizedWeighter, stepped: list[Micro], x: Any, y: Any) -> list[tuple[Any, Any]]:
    """The inputs and labels of each loss the step used: the batch itself for one loss; for several
    (gradient accumulation) the batch must be the micro-batches concatenated in order, and is cut into
    them by what each got: every tensor of the inputs (as the model is called with them: a tuple, a dict
    of keyword arguments, any nesting) by the shape its micro-batch's forward got it at, every tensor of
    the labels by the shape its ``loss()`` got it at, each on its own (labels flattened over tokens,
    ``(B*T,)``, a tuple of a task's labels and another's targets). A tensor each micro-batch got at the
    whole's shape (the same tensor for all: a mask, a weight; one built afresh for each; a 0-dim one) is
    passed whole. The values are compared on the device by :meth:`TwoCall._check_inputs`: each micro-batch's
    cut must hold what it got (a refusal where they differ, e.g. one micro-batch's labels passed for all)."""
    if any(m.target_changed() for m in stepped):
        raise ValueError(_CHANGED_LABELS)
    if len(stepped) == 1:
        if not _same_target(stepped[0].target, y):
            raise ValueError(_OTHER_BATCH + w._load_note)
        return [(x, y)]
    unseen = next((m for m in stepped if m.forward is None), None)
    if unseen is not None:  # (the inputs each forward got are not known)
        raise ValueError(unseen.unseen or _UNSEEN_FORWARD)
    sizes = [_rows([t for t, _, _ in m.forward.inputs]) for m in stepped]  # (for the message)
    args, kwargs = model_arguments(w.model, x)
    x_leaves, x_spec = tree_flatten((args, kwargs))
    xs = _cut(x_leaves, [[t for t, _, _ in m.forward.inputs] for m in stepped], "input", sizes)
    y_leaves, y_spec = tree_flatten(y)
    ys = _cut(y_leaves, [tree_leaves(m.target) for m in stepped], "label", sizes)
    out = []
    for xi, yi in zip(xs, ys):
        a, k = tree_unflatten(xi, x_spec)
        out.append((ModelCall(tuple(a), dict(k)), tree_unflatten(yi, y_spec)))
    return out


def _rows(tensors: list[Tensor]) -> int:
    """A micro-batch's samples, for messages: the first dimension of the first input with one."""
    return next((int(t.shape[0]) for t in tensors if t.dim() > 0), 1)


def _cut(whole: list[Any], parts: list[list[Any]], what: str, sizes: list[int]) -> list[list[Any]]:
    """``whole``'s leaves cut into those of each micro-batch (``parts[i]``: the leaves it got): a tensor by the
    dimension along which the micro-batches' tensors, concatenated, make it, or whole where each got a tensor of
    its shape (the values are checked later); anything else must be what each got. A ``ValueError`` where it is
    neither."""
    tensors = [t for t in whole if isinstance(t, Tensor)]

    def refuse(detail: str) -> ValueError:
        return ValueError(
            f"This optimizer step accumulated the gradients of {len(parts)} weighter.loss calls (micro-batches of "
            f"{sizes} samples): pass meta_step the whole batch, the micro-batches' inputs and labels concatenated in "
            f"order (e.g. (torch.cat(xs), torch.cat(ys)), each tensor of a tuple or dict on its own). It got "
            f"{detail}. gamma is unchanged.")

    for i, part in enumerate(parts):
        got = [t for t in part if isinstance(t, Tensor)]
        if len(got) != len(tensors):
            raise refuse(f"{len(tensors)} {what} tensors, where micro-batch {i} had {len(got)}")
    others = [[t for t in part if not isinstance(t, Tensor)] for part in parts]
    mine = [t for t in whole if not isinstance(t, Tensor)]
    if what == "label" and any(not _equal_leaves(o, mine) for o in others):
        raise refuse(f"labels whose non-tensor entries {mine!r} differ from the micro-batches' {others!r}")
    cuts: list[list[Any]] = []
    for j, t in enumerate(tensors):
        got = [[t2 for t2 in part if isinstance(t2, Tensor)][j] for part in parts]
        shapes = [u.shape for u in got]
        # whole where each got a tensor of the whole's shape: the same one (a mask, a weight), one built afresh
        # for each forward (torch.full(...) in the loop), or a 0-dim one. Which it is, and whether they are one
        # micro-batch's passed for all (each got other values), only the values say: TwoCall._check_inputs
        # compares each micro-batch's with the whole on the device (a whole of n parts' shape each is no
        # concatenation of them, but along a dimension of size 0, where both are the same empty tensor)
        dim = _cut_dim(t.shape, shapes)
        if dim is False:
            raise refuse(f"{what} {j} of shape {tuple(t.shape)}, where the micro-batches got "
                         f"{', '.join(str(tuple(s)) for s in shapes)}: not their concatenation, nor a tensor of the "
                         f"whole's shape each got whole")
        if dim is None:
            cuts.append([t] * len(parts))
        else:
            cuts.append(list(t.split([int(s[dim]) for s in shapes], dim=dim)))
    if what == "input" and len(parts) > 1 and any(t.dim() for t in tensors) and \
            all(c[0] is t for c, t in zip(cuts, tensors)):  # (nothing to cut: one micro-batch's inputs, passed)
        raise refuse(f"inputs of the shapes each micro-batch got ({', '.join(str(tuple(t.shape)) for t in tensors)}): "
                     f"one micro-batch's, not the whole batch")
    out = []
    for i in range(len(parts)):
        pieces = iter(c[i] for c in cuts)
        out.append([next(pieces) if isinstance(leaf, Tensor) else leaf for leaf in whole])
    return out


def _cut_dim(whole: torch.Size, parts: list[torch.Size]) -> int | None | bool:
    """The dimension along which tensors of shapes ``parts``, concatenated, have shape ``whole``; ``None`` where
    each has shape ``whole`` (got it whole); ``False`` for neither. At most one dimension fits: each part must
    have the whole's size in every other dimension, so two (of nonzero sizes: T == B of a sequence-first batch
    too) would need each part to be whole in both, and then two or more add up to it only along a dimension of size 0. Where a part is
    whole in every dimension (n >= 2 parts of the whole's shape) only a dimension of size 0 adds up, and the
    cut and the whole are the same empty tensor: whole. The values decide the rest (TwoCall._check_inputs)."""
    if all(p == whole for p in parts):
        return None
    for d in range(len(whole)):
        if all(len(p) == len(whole) and p[:d] == whole[:d] and p[d + 1:] == whole[d + 1:] for p in parts) \
                and sum(int(p[d]) for p in parts) == int(whole[d]):
            return d
    return False


def _equal_leaves(a: list[Any], b: list[Any]) -> bool:
    try:
        return len(a) == len(b) and all(u is v or bool(u == v) for u, v in zip(a, b))
    except Exception:  # noqa: BLE001 - (something without a truth value for ==)
        return False


def _same_target(a: Any, b: Any) -> bool:
    """Whether two label batches (tensors, or nestings of them) are the same, cheaply."""
    if a is b:
        return True
    if isinstance(a, Tensor) != isinstance(b, Tensor):
        return False
    if isinstance(a, Tensor):
        return a.shape == b.shape and (a.data_ptr() == b.data_ptr() or host_equal(a, b.to(a.device)))
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(_same_target(u, v) if isinstance(u, Tensor) else u == v for u, v in zip(la, lb))


def _refuse_outside_moved(pending: Pending) -> None:
    """Where the step was not reproduced: refuse it as the optimizer's step of tensors outside the model, naming them,
    where it moved some the loop had zeroed the gradient of before the step (weight decay and momentum move them
    all the same), which :meth:`HarmonizedWeighter._check_outside_model` judges by their gradient alone. One read,
    on this error path only."""
    if pending.stepped_outside is None or pending.outside_print is None:
        return
    tensors = pending.stepped_outside[0]
    now = fingerprint(tensors)
    assert now is not None
    flags = host_read([moved_each(pending.outside_print, now)])
    stepped = [p for p, f in zip(tensors, flags) if f]
    if stepped:
        said = FAST_OUTSIDE_MODEL.format(count=len(stepped), shapes=shapes_of(stepped))
        raise ValueError(said.replace(" Nothing was changed.", " They held a zero gradient at the step (a zero_grad or "
                                      "grad.zero_() before it), and weight decay or momentum moved them all the same. "
                                      "Nothing was changed."))
