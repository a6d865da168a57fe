"""PyTorch Lightning integration: a callback that runs the meta step before every training batch
(after it, with ``mode="fast"``).

Imported on its own (``from metaweight.lightning import HarmonizedCallback``) so that the core
package never needs Lightning; install it with ``pip install 'metaweight[lightning]'``. Your
LightningModule's ``forward`` returns the list of exit logits, and its ``training_step`` returns
``self.weighter.loss(self(x), y)``; Lightning does the backward and the optimizer step (automatic
optimization, AMP and schedulers as usual).

Example::

    class Net(lightning.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.weighter.loss(self(x), y)

    callback = HarmonizedCallback(mw.preset("hdkd", 3).criterion, val_loader, gamma_lr=0.01)
    lightning.Trainer(callbacks=[callback]).fit(Net(), train_loader)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

try:
    import lightning
except ModuleNotFoundError as exc:  # (the package `lightning`, 2.x: `pytorch_lightning` alone is another import)
    raise ModuleNotFoundError(
        "metaweight.lightning needs the package `lightning` (Lightning 2): pip install 'metaweight[lightning]' "
        "(or pip install lightning). A project on the older `pytorch_lightning` package alone: install `lightning` "
        "beside it and use lightning.Trainer.", name=exc.name) from exc
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from metaweight._anytime import to_device
from metaweight._checks import real_scalar
from metaweight._clipping import ClipGradNorm, ClippingHints
from metaweight._losses import DenseDistillLoss
from metaweight._validation import BalancedValidation
from metaweight._weighter import HarmonizedWeighter
from metaweight._warn import warn_user
from metaweight._weighting import Weighting

__all__ = ["HarmonizedCallback", "WeightingCallback"]

_TAKEN = "val_batches_taken"  # the callback's own entry beside the weighter's state in its checkpoint


def _accumulates(trainer: lightning.Trainer) -> bool:
    """Whether the optimizer does not step after the current batch (``accumulate_grad_batches``): Lightning's own
    decision (its training loop's ``_should_accumulate``, valid from ``on_train_batch_start`` to
    ``on_train_batch_end``)."""
    if trainer.accumulate_grad_batches == 1:
        return False
    should = getattr(trainer.fit_loop.epoch_loop, "_should_accumulate", None)
    if should is None:
        raise ValueError("With accumulate_grad_batches > 1 the callback needs Lightning's decision of which batches "
                         "end an optimizer step (the training loop's _should_accumulate), which this Lightning "
                         "version lacks. Use accumulate_grad_batches=1, or the weighter's two calls in your own loop.")
    return bool(should())


def _whole(parts: list[Any]) -> Any:
    """The batches of one optimizer step as one: their tensors concatenated along the first dimension."""
    if len(parts) == 1:
        return parts[0]
    leaves = [tree_flatten(part) for part in parts]
    spec = leaves[0][1]
    if any(other != spec for _, other in leaves[1:]):
        raise ValueError("The batches of one optimizer step (accumulate_grad_batches) differ in structure: they "
                         "cannot be concatenated into the step's whole batch.")
    joined = [torch.cat(column) if isinstance(column[0], torch.Tensor) and column[0].dim() > 0 else column[0]
              for column in zip(*(flat for flat, _ in leaves))]
    return tree_unflatten(joined, spec)


# a batch of the optimizer step under way whose training_step returned None: Lightning skipped its backward (and
# stepped on no gradient from it), so the meta step leaves it out, and makes none where the step's every batch was
_SKIPPED = object()


def _skipped(module: lightning.LightningModule, outputs: Any) -> bool:
    """Whether ``training_step`` skipped its batch: returned ``None`` (or a mapping without ``"loss"``), which
    Lightning's automatic optimization passes on as ``{}`` and steps on no gradient from; a manual optimization's
    outputs say nothing of its steps."""
    if not module.automatic_optimization:
        return False
    return outputs is None or (isinstance(outputs, Mapping) and outputs.get("loss") is None)


def _taken(parts: list[Any]) -> list[Any]:
    """The batches of an optimizer step that ``training_step`` did not skip (:data:`_SKIPPED`)."""
    return [part for part in parts if part is not _SKIPPED]


class _HeldOut:
    """Batches of a loader without end, iterating it anew each pass (reshuffled, nothing cached), counting the
    batches taken in the current pass: the position a checkpoint keeps. ``skip`` batches of the first pass are
    read and dropped (a resumed run goes on where the saved one stopped)."""

    def __init__(self, loader: Iterable[Any], skip: int = 0) -> None:
        self.loader = loader
        self.taken = 0  # batches handed out in the current pass
        self._skip = skip
        self._batches: Iterator[Any] | None = None

    def __iter__(self) -> _HeldOut:
        return self

    def __next__(self) -> Any:
        if self._batches is None:  # lazily, as a pass starts at the meta step that needs its first batch
            self._batches = self._advanced(self._skip)
        try:
            batch = next(self._batches)
        except StopIteration:
            if self.taken == 0:
                raise ValueError("The validation dataloader yielded no batch.") from None
            self._batches, self.taken = iter(self.loader), 0
            try:
                batch = next(self._batches)
            except StopIteration:
                raise ValueError("The validation dataloader yielded no batch.") from None
        self.taken += 1
        return batch

    @property
    def position(self) -> int:
        """The batches taken in the current pass, as a checkpoint keeps them (before the first batch of a
        resumed run, the saved position it will skip to)."""
        return self.taken if self._batches is not None else self._skip

    def _advanced(self, skip: int) -> Iterator[Any]:
        batches = iter(self.loader)
        for done in range(skip):
            try:
                next(batches)
            except StopIteration:
                if done:  # (an empty loader is refused by __next__)
                    warn_user(f"The checkpoint's position in the validation dataloader ({skip} batches taken in "
                              f"the current pass) is past its end ({done} batches): the held-out batches start "
                              f"again at the first. Resume with the held-out loader the run was saved with to "
                              f"go on where it stopped.", UserWarning)
                self.taken = 0
                return iter(self.loader)
            self.taken += 1
        return batches


def _declared_clipping(declared: Any) -> ClipGradNorm | None:
    """The callback's ``clip_grad_norm`` option as a :class:`ClipGradNorm`; ``None`` where it is absent or no valid
    clipping (the weighter's own check refuses that, saying what it takes)."""
    if isinstance(declared, ClipGradNorm):
        return declared
    number = None if declared is None else real_scalar(declared)
    return ClipGradNorm(number) if number is not None and math.isfinite(number) and number > 0 else None


def _with_trainer_clipping(trainer: lightning.Trainer, options: dict[str, Any],
                           module: lightning.LightningModule | None = None) -> dict[str, Any]:
    """``options`` with the Trainer's gradient clipping declared where the weighter's look-ahead is the clipped step
    (``mode="fast"``): ``gradient_clip_val=c`` by norm (Lightning's default algorithm) is ``ClipGradNorm(c)``, the
    2-norm over all parameters as Lightning clips. Refused before the fit starts, naming the fix: clipping by value,
    which the fast mode's look-ahead cannot take as the step's (it is no rescale of the gradient), and a
    ``clip_grad_norm`` option that says another clipping than the Trainer's, or one that nothing in the fit takes
    (no ``gradient_clip_val``, and ``module``'s class keeps Lightning's ``configure_gradient_clipping``, which then
    clips nothing). With ``mode="exact"`` the look-ahead is the optimizer's own unclipped step, as in a loop of
    one's own that clips (see the loop guide)."""
    value = trainer.gradient_clip_val
    if options.get("mode", "exact") != "fast":
        return options
    declared = options.get("clip_grad_norm")
    given = _declared_clipping(declared)
    if not value:
        if given is not None and module is not None and \
                type(module).configure_gradient_clipping is lightning.LightningModule.configure_gradient_clipping:
            raise ValueError(f"HarmonizedCallback was given clip_grad_norm={declared!r}, but nothing in this fit clips: "
                             f"the Trainer has no gradient_clip_val, and {type(module).__name__} keeps Lightning's "
                             f"configure_gradient_clipping, which then clips nothing. The weighter would score a "
                             f"clipped step Lightning never takes. Pass Trainer(gradient_clip_val=max_norm) (the "
                             f"callback declares it: leave clip_grad_norm out), clip in your module's "
                             f"configure_gradient_clipping with torch.nn.utils.clip_grad_norm_, or leave "
                             f"clip_grad_norm out. Nothing was changed.")
        return options
    algorithm = str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm")
    if algorithm != "norm":
        raise ValueError(f"Trainer(gradient_clip_val={value}, gradient_clip_algorithm={algorithm!r}) clips each "
                         f"gradient by value, which HarmonizedCallback(mode='fast') cannot score as the step taken (its "
                         f"look-ahead is the clipped step, and only clipping by the total norm is replayed). Use "
                         f"gradient_clip_algorithm='norm', or mode='exact' (whose look-ahead is the unclipped step).")
    clip = ClipGradNorm(float(value))
    if declared is not None:
        if given is None:
            return options  # (no clipping: the weighter's own check refuses it, saying what it takes)
        # (a float32 number, np.float32(0.05) or torch.tensor(0.05), is the Trainer's float to its rounding)
        if given.norm_type != clip.norm_type or not math.isclose(given.max_norm, clip.max_norm, rel_tol=1e-6):
            raise ValueError(f"HarmonizedCallback was given clip_grad_norm={declared!r}, but the Trainer clips with "
                             f"gradient_clip_val={value} (by the 2-norm): the weighter would score another step than "
                             f"the one Lightning takes. Leave clip_grad_norm out (the Trainer's clipping is declared "
                             f"to the weighter) or make the two agree.")
    return {**options, "clip_grad_norm": clip}


def _clipping_hints(trainer: lightning.Trainer, declared: Any) -> ClippingHints:
    """What a refusal of the step's clipping (``mode="fast"``) says to change in a Lightning fit: the Trainer's
    ``gradient_clip_val``, the LightningModule's ``configure_gradient_clipping`` and the callback's
    ``clip_grad_norm``, where a loop of one's own is told to build the weighter otherwise."""
    if declared is None:
        return ClippingHints(undeclared=(
            "If it is clipping by norm, declare it: Trainer(gradient_clip_val=max_norm) for the 2-norm over all "
            "parameters, which HarmonizedCallback declares to the weighter, or HarmonizedCallback(..., "
            "clip_grad_norm=mw.ClipGradNorm(max_norm, norm_type)) for a clip_grad_norm_ of your own over all "
            "parameters in configure_gradient_clipping; for a rescale of your own, scale the loss instead."))
    source = (f"the Trainer's gradient_clip_val={trainer.gradient_clip_val}" if trainer.gradient_clip_val
              else f"HarmonizedCallback(clip_grad_norm={declared!r})")
    fix = (f"The clipping was declared to the weighter by HarmonizedCallback, from {source}: make what your "
           f"LightningModule does the clipping declared (Lightning's own configure_gradient_clipping clips by the "
           f"Trainer's gradient_clip_val; one of your own that clips otherwise, or not at all, is not that step): "
           f"Trainer(gradient_clip_val=max_norm) for the 2-norm over all parameters, or "
           f"HarmonizedCallback(clip_grad_norm=mw.ClipGradNorm(max_norm, norm_type)) for a clip_grad_norm_ of your "
           f"own over all parameters.")
    return ClippingHints(not_clipped=fix, other=fix + " With accumulate_grad_batches, Lightning divides each "
                         "batch's loss by their number.")


class HarmonizedCallback(lightning.Callback):
    """Builds a :class:`HarmonizedWeighter` at fit start and runs its meta step before each batch.

    Args:
        criterion: the :class:`DenseDistillLoss` (e.g. ``mw.preset(name, K).criterion``).
        val_dataloader: held-out ``(x, y)`` batches for the meta step, cycled.
        validation: the validation objective (default ``BalancedValidation(K)``).
        attribute: the name under which the weighter is set on the LightningModule.
        **weighter_options: further :class:`HarmonizedWeighter` arguments (``gamma_lr``,
            ``learn``, ``init``, ``backend``, ``meta_every``, ...).

    The weighter's state is saved in Lightning checkpoints with the callback's state. With
    ``mode="fast"`` the meta step runs after each batch's optimizer step instead (the step it
    took is the look-ahead); ``training_step`` returns ``self.weighter.loss(...)`` either way.
    With ``accumulate_grad_batches=N`` there is one meta step per optimizer step: before the
    first batch of the N (``mode="exact"``: its look-ahead on that batch), or after the step on
    the N batches concatenated (``mode="fast"``: the step's whole batch).
    With ``mode="exact"`` the look-ahead is on that first batch alone, where a loop of one's own passes the
    whole batch (the callback has the others only later): to score the whole accumulated step, use
    ``mode="fast"``. With ``mode="fast"`` the Trainer's clipping by norm (``gradient_clip_val=c``) is declared
    to the weighter as ``clip_grad_norm=mw.ClipGradNorm(c)``, so the look-ahead is the clipped step; clipping
    by value is refused when the fit starts, and so is the callback's ``clip_grad_norm`` where nothing clips (no
    ``gradient_clip_val``, and the module keeps Lightning's ``configure_gradient_clipping``). With ``nonfinite="skip"`` a non-finite step's meta step is
    skipped, but Lightning itself steps the model on whatever gradient the backward left (as it does without
    the callback): skip such steps in Lightning too, or keep ``nonfinite="raise"``. A batch skipped that way,
    ``training_step`` returning ``None`` (Lightning then takes no backward and steps on no gradient from it), is
    left out of the fast mode's meta step, which is not made for an optimizer step whose every batch was
    skipped. The exact mode's meta step comes before the batch, and stands.

    The checkpoint also keeps the position in the held-out loader (the batches taken in the pass
    under way): a resumed fit reads and drops as many batches of a fresh pass, so with an
    unshuffled loader its meta steps take the held-out batches an uninterrupted run would. A
    shuffled loader's order comes from its sampler's generator (torch's global RNG unless the
    loader has ``generator=``), which the checkpoint does not keep: the resumed pass takes as many
    batches as were left in it, drawn from another permutation.

    A later ``fit`` with the same callback (a second stage, or more epochs) builds the weighter
    anew over the optimizer ``configure_optimizers`` returns then, and goes on from the last
    fit's state (gamma, its optimizer's state, the validation average, the counts) and held-out
    position, as the model goes on from its parameters; a ``ckpt_path`` given to that ``fit``
    restores the checkpoint's instead. For a fresh start, pass a new callback.
    """

    def __init__(self, criterion: DenseDistillLoss, val_dataloader: Iterable[Any],
                 validation: BalancedValidation | None = None, *, attribute: str = "weighter",
                 **weighter_options: Any) -> None:
        super().__init__()
        self.criterion = criterion
        self.validation = validation
        self.val_dataloader = val_dataloader
        self.attribute = attribute
        self.options = weighter_options
        self.weighter: HarmonizedWeighter | None = None
        self._val: _HeldOut | None = None
        self._resume_at: int | None = None  # held-out batches taken in the pass under way, from a checkpoint
        self._pending_state: dict[str, Any] | None = None
        self._parts: list[Any] = []  # the batches of the optimizer step under way (accumulate_grad_batches)

    def on_fit_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"HarmonizedCallback needs exactly one optimizer; found {len(trainer.optimizers)}.")
        wrapped = trainer.strategy.model
        model = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else pl_module
        previous = self.weighter
        options = _with_trainer_clipping(trainer, self.options, pl_module)
        weighter = HarmonizedWeighter(model, trainer.optimizers[0], self.criterion, self.validation, **options)
        weighter._clipping_hints = _clipping_hints(trainer, weighter.clip_grad_norm)
        if self._pending_state is not None:
            weighter.load_state_dict(self._pending_state)
            self._pending_state = None
        elif previous is not None:  # a later fit with this callback: gamma and its state go on (see the class)
            weighter.load_state_dict(previous.state_dict())
        self.weighter = weighter
        setattr(pl_module, self.attribute, self.weighter)
        if self._val is None or self._resume_at is not None:  # (a later fit goes on in the held-out pass under way)
            self._val = _HeldOut(self.val_dataloader, skip=self._resume_at or 0)
        self._resume_at = None
        self._parts = []

    def on_train_batch_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        assert self.weighter is not None and self._val is not None
        if self.weighter.mode != "fast" and not self._parts:  # (the first batch of an optimizer step)
            self.weighter.meta_step(batch, to_device(next(self._val), pl_module.device))

    def on_train_batch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.weighter is not None and self._val is not None
        skipped = _skipped(pl_module, outputs) or (self.weighter.mode == "fast" and self.weighter._nothing_to_score())
        self._parts.append(_SKIPPED if skipped else batch if self.weighter.mode == "fast" else None)
        if _accumulates(trainer):
            return
        parts, self._parts = _taken(self._parts), []
        if self.weighter.mode == "fast" and parts:  # (every batch of the step skipped: no step to look at)
            self.weighter.meta_step(_whole(parts), to_device(next(self._val), pl_module.device))

    def state_dict(self) -> dict[str, Any]:
        if self.weighter is None:
            return {}
        taken = self._val.position if isinstance(self._val, _HeldOut) else 0
        return {**self.weighter.state_dict(), _TAKEN: taken}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        state_dict = dict(state_dict)
        taken = state_dict.pop(_TAKEN, None)
        if taken is not None and (isinstance(taken, bool) or not isinstance(taken, int) or taken < 0):
            raise ValueError(f"The checkpoint's '{_TAKEN}' should be an int >= 0 (the held-out batches taken in the "
                             f"pass under way). Found {taken!r}. Nothing was changed.")
        if self.weighter is None:
            self._pending_state = state_dict
        else:
            self.weighter.load_state_dict(state_dict)
        if taken is None:
            warn_user(f"This HarmonizedCallback checkpoint has no position in the validation dataloader (no "
                      f"'{_TAKEN}': saved by an older metaweight), so the held-out batches start again at the "
                      f"first one and the resumed run may take other batches than an uninterrupted run would.",
                      UserWarning)
            taken = 0
        self._resume_at = taken  # (read where the next held-out batch is taken: at fit start)
        if self.weighter is not None:  # (fit has started: the next held-out batch comes from the saved position)
            self._val, self._resume_at = _HeldOut(self.val_dataloader, skip=taken), None


class WeightingCallback(lightning.Callback):
    """Builds a loss weighting (:class:`~metaweight.UW`, :class:`~metaweight.FAMO`, ...) at fit start
    and calls its :meth:`~metaweight.Weighting.meta_step` after each optimizer step (with
    ``accumulate_grad_batches=N``, after every N batches, on the N concatenated).

    As with :class:`HarmonizedCallback`, ``training_step`` returns ``self.weighter.loss(self(x), y)``
    and Lightning does the backward and the optimizer's step (a batch for which it returns ``None``, skipped,
    is left out of the meta step, which is not made where the optimizer step's every batch was skipped); the
    weighting's state is saved in Lightning checkpoints with the callback's, and a later ``fit`` with the same
    callback goes on from the last fit's state (a ``ckpt_path`` given to it restores the checkpoint's instead).

    Args:
        weighting: a callable ``(model, optimizer) -> Weighting``, e.g.
            ``lambda model, optimizer: mw.FAMO(model, optimizer, criterion)``; ``model`` is the
            LightningModule (or its ``DistributedDataParallel`` wrapper).
        attribute: the name under which the weighting is set on the LightningModule.

    Example::

        callback = WeightingCallback(lambda model, opt: mw.DWA(model, opt, criterion, window=len(loader)))
        lightning.Trainer(callbacks=[callback]).fit(Net(), loader)
    """

    def __init__(self, weighting: Callable[[torch.nn.Module, torch.optim.Optimizer], Weighting], *,
                 attribute: str = "weighter") -> None:
        super().__init__()
        if not callable(weighting):
            raise TypeError(f"`weighting` should be a callable (model, optimizer) -> Weighting. "
                            f"Found `{type(weighting).__name__}`.")
        self.factory = weighting
        self.attribute = attribute
        self.weighting: Weighting | None = None
        self._pending_state: dict[str, Any] | None = None
        self._parts: list[Any] = []  # the batches of the optimizer step under way (accumulate_grad_batches)

    def on_fit_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"WeightingCallback needs exactly one optimizer; found {len(trainer.optimizers)}.")
        wrapped = trainer.strategy.model
        model = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else pl_module
        weighting = self.factory(model, trainer.optimizers[0])
        if not isinstance(weighting, Weighting):
            raise TypeError(f"`weighting` should return a metaweight Weighting. It returned "
                            f"`{type(weighting).__name__}`.")
        if self._pending_state is not None:
            weighting.load_state_dict(self._pending_state)
            self._pending_state = None
        elif self.weighting is not None:  # a later fit with this callback: the weights and state go on
            weighting.load_state_dict(self.weighting.state_dict())
        self.weighting = weighting
        setattr(pl_module, self.attribute, self.weighting)
        self._parts = []

    def on_train_batch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.weighting is not None
        reads = type(self.weighting).reads_train_batch  # (FAMO scores the step's whole batch again; the others
        self._parts.append(_SKIPPED if _skipped(pl_module, outputs) else batch if reads else None)  # read no batch)
        if _accumulates(trainer):
            return
        parts, self._parts = _taken(self._parts), []
        if parts:  # (every batch of the step skipped: Lightning stepped on no gradient, nothing to learn from)
            self.weighting.meta_step(_whole(parts) if reads else None)

    def state_dict(self) -> dict[str, Any]:
        return self.weighting.state_dict() if self.weighting is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.weighting is None:
            self._pending_state = state_dict
        else:
            self.weighting.load_state_dict(state_dict)
