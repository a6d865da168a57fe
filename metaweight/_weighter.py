"""Harmonized loss weights learned by a one-step look-ahead (HDKD Eq. 6-8, Alg. 1).

:class:`HarmonizedWeighter` is the orchestration: it checks its arguments, holds gamma and the
weighter's own state, weights the loss, steps gamma from a meta-gradient and decides on it, and
hands each call to its mode: :mod:`metaweight._exact` (the paper's order, a meta step by a
backend of :mod:`metaweight._backends`) or :mod:`metaweight._fast` (the model's step as the
look-ahead); ``step()`` runs inside the transaction of :mod:`metaweight._transaction`. The fast
mode's two-call form (``loss``, the user's own step, ``meta_step``) is read by
:mod:`metaweight._capture` and scored by :mod:`metaweight._twocall`. gamma's initial weights and
optimizer are :mod:`metaweight._gamma`'s, the checks of a checkpoint :mod:`metaweight._weighter_state`'s,
the criterion and validation objective as a pair :mod:`metaweight._protocols`'s, the order of the exact
mode's two calls :mod:`metaweight._order`'s, and the gradient check :mod:`metaweight._gradcheck`'s.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.hooks import RemovableHandle

from metaweight._backends import BACKENDS, Backend, BackendName, make_backend
from metaweight._capture import (ForwardWatch, GradSnapshot, Micro, Pending, StepCapture, StepEnd, drop_inert_hooks,
                                sparse_trained, watch_backward)
from metaweight._checks import (STATE_IN_INFERENCE_MODE, check_callbacks, check_flag, check_initialized,
                               check_not_inference_mode, float_leaves, forget_labels, half_precision_eps_hint,
                               integer_value, masked_label_hint, real_option, real_scalar, summarize_step_labels)
from metaweight._clipping import ClipGradNorm, ClippingHints, check_max_norm
from metaweight._exact import ExactMode
from metaweight._order import count_first_loss, grad_marks, warn_if_after_step, warn_if_met_since
from metaweight._gamma import (GAMMA_OPTIMIZER, GammaInit, build_gamma_optimizer, check_gamma_optimizer_choice,
                               initial_gamma, own_implementation)
from metaweight._fast import FastMode, before_step
from metaweight._hypergradient import Reducer
from metaweight._protocols import terms_and_objective
from metaweight._record import MetaStepRecord
from metaweight._twocall import TwoCall
from metaweight._weighter_state import checked_state
from metaweight._capturable import CapturableFast, DeviceRecord, check as check_capturable
from metaweight._transaction import (COPIED_SINCE, LOADED_DURING, LOADED_SINCE, PendingMeta, StateSnapshot,
                                     StepTransaction, gradients_moved, host_read, nonfinite_flag)
from metaweight._walk import ModelWalk, check_single_roles, walk, walked_call
from metaweight._warn import SKIP_META_STEPS, warn_user, warns_after_construction
from metaweight._weighting import (NamedWeights, check_step_holds_trainable, optimizer_steps, restored_at,
                                   unwrap_model)
from metaweight._hooks import check_hooks, check_optimizer_hooks
from metaweight._moves import (FOREIGN_STEP, FROZEN_WITH_GRAD, ForeignSteps, fingerprint, frozen_with_grad,
                               outside_model, shapes_of)
from metaweight._optimizers import (FAST_OUTSIDE_MODEL, check_optimizer_covers_model, check_option_values,
                                    check_optimizer_options, check_optimizer_state, stepped_optimizer)

Batch = Sequence[Any]
CONSTRAINTS = ("clamp", "normalize")
NONFINITE = ("raise", "skip")


class HarmonizedWeighter(NamedWeights):
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

    :math:`\gamma` is a float32 tensor ``[num_terms]`` whatever the model's dtype (as are its
    gradient in :class:`MetaStepRecord` and the validation average): a float64 model's
    meta-gradient comes back rounded to float32 (at most 6e-8 relative); a finite-difference
    check of it should perturb a float64 copy of :math:`\gamma`.

    Args:
        model: the multi-exit network; ``model(x)`` returns ``K`` logits tensors.
        optimizer: the optimizer of ``model`` (SGD, Adam, AdamW, RMSprop; with ``mode="exact"`` also
            Adadelta, Adagrad, Adamax and ASGD, which `higher` replays), exactly of torch's class: a
            subclass may step otherwise. It may be wrapped by a wrapper whose step is the inner optimizer's
            (Accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``, Fabric's
            ``_FabricOptimizer``); any other wrapper holding a torch optimizer as ``.optimizer`` is refused
            (a ``TypeError``): the look-ahead replays the inner step, and the wrapper's own may do more
            (Lookahead, master weights). Pass the torch optimizer itself, or use a loss weighting
            (:class:`UW`, :class:`DWA`, ...), which replays no step. An optimizer class these settings
            cannot replay is refused with an error that is both a ``TypeError`` and a ``ValueError``
            (:class:`~metaweight._backends.OptimizerRefused`), in every mode and backend alike.
        criterion: the loss terms :math:`L_k`: a :class:`DenseDistillLoss`, or any callable
            ``criterion(outputs, target) -> Tensor[n]`` with ``term_names`` (see
            :mod:`metaweight._protocols`: optional ``active`` mask and ``teacher_outputs``
            keyword). ``outputs`` is whatever the model returns.
        validation: the validation objective: :class:`BalancedValidation` (the default, built
            from ``criterion.num_exits`` and ``criterion.ignore_index``), or any callable ``validation(outputs, target) ->
            scalar`` to lower.
        term_names: the names of the criterion's terms, where it has no ``term_names``.
        gamma_lr: :math:`\epsilon`, the learning rate the named ``gamma_optimizer`` is built with
            (:attr:`gamma_lr` keeps it; the rate gamma steps at is
            ``gamma_optimizer.param_groups[0]["lr"]``, which a scheduler changes and
            :meth:`load_state_dict` restores from the checkpoint, as torch's optimizers do).
        gamma_optimizer: ``"adam"`` (the default: steps of about :math:`\epsilon` per meta
            step whatever the scale of the meta-gradient), ``"sgd"`` (the paper's
            :math:`\gamma \leftarrow \gamma - \epsilon \nabla_\gamma`; the meta-gradient is
            proportional to the model's learning rate, so these steps shrink 100-fold as a step
            schedule decays it), or a callable that takes ``[gamma]`` and returns a
            ``torch.optim.Optimizer`` for it (then ``gamma_lr`` is not used). The default was
            chosen on held-out data; docs/results.md gives the evidence. ``"adam"`` is torch's
            ``Adam(fused=True)`` where gamma's device has the fused kernel (CPU, CUDA, MPS, XPU):
            one kernel per step, the step count on the device; its steps equal the unfused
            Adam's up to rounding (its second moment differs by about an ulp after some ten
            steps, so a run resumed across the two implementations is not bitwise the same).
        init: ``"uniform"`` (every active term 1: DS-like), ``"last"`` (the CE terms
            and the last exit's KD terms 1, other KD terms 0: DBT-like), ``"random"``
            (uniform in [0, 1) on active terms), ``num_terms`` weights (a tensor, a list, a
            dict's ``.values()``) or a dict from term name to weight (``gamma_dict()``).
        learn: ``False`` keeps :math:`\gamma` fixed (the non-harmonized baselines);
            :meth:`meta_step` then does nothing.
        constraint: ``"clamp"`` projects :math:`\gamma` onto :math:`\gamma \ge 0`;
            ``"normalize"`` also rescales it to keep the sum it started with.
        nonfinite: what to do when the validation objective or the meta-gradient is
            not finite: ``"raise"`` a ``ValueError`` or ``"skip"`` the meta step; either
            way :math:`\gamma` and the validation average are left unchanged. With
            ``mode="fast"``, :meth:`step` takes the model's step before the meta step (and decides
            both in one read, putting back a model step found non-finite): a non-finite validation
            *input* refuses the whole call (``"raise"``: the model's step is put back, nothing is
            changed) or the meta step (``"skip"``: the model steps, the meta step is skipped), but a
            validation objective or
            meta-gradient found non-finite after it is always skipped (a ``RuntimeWarning``,
            :attr:`num_skipped` counts it, gamma unchanged): the model's step, finite and taken
            with the gamma it had, stands, and a raise must leave everything as it was. The
            validation labels (one per input, integer, in the outputs' classes) are checked before
            the model's step too (a ``ValueError``, nothing changed); an error found only after it
            (or a hook that raises) propagates with the model's step taken and counted in
            :attr:`num_calls`, gamma, its optimizer and the validation average as before.
        generator: the random generator for ``init="random"``.
        backend: how the meta-gradient is computed: ``"jvp"`` (exact: one forward-mode
            pass, the default), ``"finite_difference"`` (two forwards, approximate) or
            ``"higher"`` (exact: differentiates through the inner step; the reference).
            ``jvp``/``finite_difference`` know SGD, Adam, AdamW and RMSprop; the others ``higher``
            replays (Adadelta, Adagrad, Adamax, ASGD) fall back to ``higher`` with a warning, except
            under DistributedDataParallel or with ``lookahead_params``, where they are refused.
        meta_every: run the look-ahead on every N-th call only (gamma stays fixed between). Every call of
            ``step``/``meta_step`` counts (``num_calls``), a skipped one too (a batch the loop skipped, a
            non-finite step): a skip on a look-ahead's call moves the next look-ahead to N calls later.
        lookahead_params: a callable ``name -> bool`` restricting the look-ahead to some
            parameters (e.g. the exit heads and the last stage); the others are held at
            :math:`\theta`. Cheaper; approximates the full look-ahead.
        reuse_forward: let :meth:`step` reuse the meta step's training forward (faster,
            more memory; the same run bit for bit, dropout masks and random-number generators
            included; see :meth:`step`). It changes nothing with ``backend="higher"`` (whose
            look-ahead runs on a patched copy) or ``mode="fast"`` (whose step runs one training
            forward already).
        mode: ``"exact"`` (the paper's order: gamma is updated first, then the model steps
            with it) or ``"fast"`` (the model steps with the gamma it has, and that step is the
            look-ahead: about 2.5x a plain iteration instead of 4x on the CIFAR MSDNet; the
            one-call :meth:`step`, or :meth:`meta_step` after your own step; see the cost guide).
        clip_grad_norm: the clipping of the model's step by the total norm of its gradients, a
            :class:`ClipGradNorm` (or a number: its ``max_norm``, with ``norm_type=2``), with
            ``mode="fast"`` (or ``learn=False``): :meth:`step` clips so before the model's step, and
            the two-call form's :meth:`meta_step` checks that your loop's ``clip_grad_norm_`` did;
            the meta-gradient goes through the clipping. In the two-call form any rescale of the
            gradients between backward and step other than unscaling is refused unless declared here.
        fd_epsilon: length in parameter space of the differences' step (``finite_difference``'s
            central one, ``mode="fast"``'s one-sided one); default :math:`\sqrt[3]{\text{machine eps}}`
            (central; 4 x for bfloat16 and float16 parameters) or 64 :math:`\sqrt{\text{machine eps}}`
            (one-sided; 4 x for 16-bit parameters) times the moved parameters' RMS (at least 1e-3): in
            float32 about 5e-3 x RMS central, 2e-2 x RMS one-sided (chosen on
            ``benchmarks/step_length.py``; see the cost guide, also for where it fails).
        callbacks: hooks called after every successful meta step with its
            :class:`MetaStepRecord` (``iteration``, ``meta_step``, ``gamma`` and ``terms`` by
            term name, ``val_objective``, ``val_exit_losses``, ...), as if registered with
            :meth:`register_meta_step_hook`. See :class:`CSVLogger` and :class:`TensorBoardLogger`.
        check_gradients: at the first meta step, before anything changes, check on float64 copies
            (the model untouched; about one forward and backward of each batch and a dozen forwards,
            once) that autograd's gradients are the derivatives of the values where the meta-gradient
            relies on it (:mod:`metaweight._gradcheck`): a stop-gradient or custom backward inside the
            model (detached heads, ``.data``, ``.item()`` rescales, a straight-through estimator) is
            refused with a ``ValueError``, nothing changed. A model that cannot run on float64 copies,
            or rounds below float64 inside, is not checked (a warning says so). ``False`` skips it.
        capturable: with ``mode="fast"``, make :meth:`device_step` (and :meth:`step`, which reads its
            record) safe to capture in a CUDA graph (PyTorch's term, as ``torch.optim.Adam(capturable=True)``):
            no host read and the same operations whatever the data, the decisions applied on the device
            (:mod:`metaweight._capturable`). Needs ``nonfinite="skip"``, ``meta_every=1``, a model optimizer
            ``torch.optim.SGD``, ``Adam`` or ``AdamW`` with ``fused=True`` (on CUDA, Adam and AdamW also
            ``capturable=True`` for a capture, as torch asks) and the model's training forward drawing no
            random numbers; gamma's Adam is built fused. See the cost guide's section "CUDA graphs:
            capturable=True".

    Example:
        >>> import torch, metaweight as mw
        >>> model = mw.MultiExit([torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)],
        ...                      [torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)])
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> weighter = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(2), gamma_lr=0.01)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))     # a training batch
        >>> xv, yv = torch.randn(8, 4), torch.randint(0, 3, (8,))   # a held-out validation batch
        >>> metrics = weighter.step((x, y), (xv, yv))
        >>> sorted(weighter.gamma_dict())
        ['ce[1]', 'ce[2]', 'kd[2->1]']
    """

    # (defaults of state that a weighter pickled by an earlier metaweight lacks; see __init__)
    _loss_calls: int = 0
    _met_at: tuple[int, int] | None = None
    _met_grads: list[tuple[Any, int]] | None = None  # (mode="exact": grad_marks at the last two-call meta step)
    # mode="fast": the optimizer's step count at the last two-call meta step that returned, or when built, loaded or
    # copied (a meta_step with no loss() call and no step since is skipped: a batch skipped before its loss() call)
    _fast_met_at: int | None = None
    _warned_same_batch: bool = False
    # mode="fast": an optimizer step took the gradients of loss() calls whose meta_step came before it (refused at
    # the next meta_step: the loop's order would skip every meta step)
    _stepped_let_go: bool = False
    _resumed_calls: int = 0
    _resumed: tuple[Micro, int] | None = None
    _load_note = ""

    @warns_after_construction
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
        clip_grad_norm: ClipGradNorm | float | None = None,
        fd_epsilon: float | None = None,
        callbacks: Sequence[Callable[[MetaStepRecord], None]] = (),
        check_gradients: bool = True,
        capturable: bool = False,
    ) -> None:
        check_not_inference_mode("HarmonizedWeighter()", STATE_IN_INFERENCE_MODE)
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` should be a torch.nn.Module. Found `{type(model).__name__}`.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` should be a torch.optim.Optimizer. Found `{type(optimizer).__name__}`.")
        learn = check_flag(learn, "learn")  # learn="no" would be truthy: flags are bools
        reuse_forward = check_flag(reuse_forward, "reuse_forward")
        check_gradients = check_flag(check_gradients, "check_gradients")
        capturable = check_flag(capturable, "capturable")
        callbacks = check_callbacks(callbacks)
        terms, validation, objective = terms_and_objective(criterion, validation, term_names)
        gamma_lr = real_option(gamma_lr, "gamma_lr", "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
        check_gamma_optimizer_choice(gamma_optimizer)
        if constraint not in CONSTRAINTS:
            raise ValueError(f"Invalid constraint: {constraint!r}. Expected one of {CONSTRAINTS}.")
        if nonfinite not in NONFINITE:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r}. Expected one of {NONFINITE}.")
        inner = stepped_optimizer(optimizer)  # (a wrapper whose step may do more is refused here)
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}. Expected one of {BACKENDS}.")
        if integer_value(meta_every) is None or integer_value(meta_every) < 1:  # type: ignore[operator]
            raise ValueError(f"Invalid meta_every: {meta_every!r}. Expected an int >= 1.")
        meta_every = int(integer_value(meta_every))  # type: ignore[arg-type]
        if fd_epsilon is not None:
            fd_epsilon = real_option(fd_epsilon, "fd_epsilon", "a finite number > 0, or None",
                                     lambda v: math.isfinite(v) and v > 0)
        check_optimizer_covers_model(inner, model)
        ddp, module = unwrap_model(model)
        if mode == "fast" and learn:
            _refuse_outside_model(outside_model(inner, module.parameters()))
        check_initialized(module)
        distributed = ddp is not None
        if isinstance(module, nn.DataParallel) or isinstance(model, nn.DataParallel):
            raise TypeError("nn.DataParallel is not supported; use DistributedDataParallel (one process per GPU).")
        if mode not in ("exact", "fast"):
            raise ValueError(f"Invalid mode: {mode!r}. Expected 'exact' (the paper's order) or 'fast'.")
        if mode == "fast" and learn:
            FastMode.check(inner, lookahead_params, backend=backend, distributed=distributed)
        if clip_grad_norm is not None and not isinstance(clip_grad_norm, ClipGradNorm):
            if real_scalar(clip_grad_norm) is None:
                raise TypeError(f"`clip_grad_norm` should be a metaweight.ClipGradNorm(max_norm, norm_type) or a "
                                f"number (max_norm). Found `{type(clip_grad_norm).__name__}`.")
            clip_grad_norm = ClipGradNorm(check_max_norm(clip_grad_norm, "clip_grad_norm"))  # named as passed
        if clip_grad_norm is not None and mode == "exact" and learn:
            raise ValueError("clip_grad_norm is for mode='fast', whose look-ahead is the model's real (clipped) step; "
                             "mode='exact' looks ahead, before the model's step, with the optimizer's own unclipped "
                             "step. Use mode='fast', or clip in your own loop with mode='exact' (meta_step, then "
                             "backward, clip_grad_norm_ and optimizer.step()).")
        if distributed and learn and reuse_forward:
            raise ValueError("reuse_forward=True bypasses DistributedDataParallel's forward; leave it False.")
        lookahead_names: set[str] | None = None
        if lookahead_params is not None:
            if not callable(lookahead_params):
                raise TypeError("`lookahead_params` should be a callable taking a parameter name and returning a bool.")
            lookahead_names = {n for n, p in module.named_parameters() if p.requires_grad and lookahead_params(n)}
            if not lookahead_names:
                raise ValueError("`lookahead_params` selects none of the model's trainable parameters.")
        chosen: Backend | None = None
        first_walk = ModelWalk(module)  # (kept for the first call: see _check_parameters_held)
        drop_inert_hooks(model, inner)  # (a dropped fast weighter's: called at every forward otherwise)
        if learn:
            check_optimizer_options(inner)
            chosen = make_backend(backend, inner, distributed=distributed, restricted=lookahead_names is not None,
                                  terms=terms, fd_epsilon=fd_epsilon, mode=mode)
            backend = chosen.name
            _check_sparse(sparse_trained(first_walk.embeddings), mode, backend, inner)
            check_hooks(module, mode, backend)
            if mode == "fast" or backend != "higher":  # (higher's patched copy holds the tensor in both roles)
                check_single_roles(first_walk)

        self.model = model
        self.module = module  # the look-ahead runs on the module itself, never through DDP's hooks
        self._kept_walk = first_walk  # (the last call's walk: walked_call keeps it, the next call compares with it)
        self._compiled = _is_compiled(model)
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
        self.clip_grad_norm: ClipGradNorm | None = clip_grad_norm
        self._clipping_hints = ClippingHints()  # (what a refusal of the loop's clipping says to change)
        self.fd_epsilon = fd_epsilon
        self.num_calls = 0
        self.check_gradients = check_gradients
        self._built_to_learn = bool(learn)
        self._gradients_checked = not (check_gradients and learn)  # once, at the first meta step
        self._gradcheck_failed: tuple[int, str] | None = None  # (meta steps then, the error) of a check that raised
        self._transaction = StepTransaction(module, self._reducer)  # step()'s snapshot, decision and rollback
        self._exact = ExactMode(chosen, lookahead_names)  # what meta_step and step do with mode="exact"
        self._fast = FastMode()  # ... with mode="fast"
        self._two_call = TwoCall()  # ... and its two-call form
        self._hooks: OrderedDict[int, Callable[[MetaStepRecord], None]] = OrderedDict()

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._active = terms.active.to(device)
        self.gamma: Tensor = initial_gamma(init, generator, terms.term_names, terms.active, criterion).to(device)  # a plain tensor; its optimizer reads .grad
        self._gamma_sum = float(self.gamma.detach().sum())
        if self.learn and constraint == "normalize" and self._gamma_sum == 0:
            raise ValueError("constraint='normalize' keeps the sum of gamma, but `init` gives every term weight 0: "
                             "gamma could never move. Start from a non-zero init (e.g. 'uniform').")
        self.num_skipped = 0  # meta steps and model steps refused as non-finite
        self.gamma_optimizer = build_gamma_optimizer(gamma_optimizer, self.gamma, self.gamma_lr, capturable)
        self.num_meta_steps = 0
        self._capturable: CapturableFast | None = None
        if capturable:
            check_capturable(self)  # before the hooks below: a refusal leaves the model and optimizer as they were
            self._capturable = CapturableFast()
        self.last_terms: Tensor | None = None
        self.last_meta: MetaStepRecord = MetaStepRecord(0)
        self._follows = 0
        self._pending: Pending | None = None  # mode="fast", two-call form: from loss() to meta_step()
        self._stepped: Pending | None = None  # the last step's, while a loss() after it (logging) collects anew
        # mode="exact", before the first meta step: the labels of the loss() calls since the optimizer's last step, the
        # step count then, and how many step counts those calls spanned (see metaweight._order)
        self._first_loss: tuple[list[Tensor | None], int, int] | None = None
        # the gradients (objects, versions) a two-call meta_step let go after a backward no step followed
        self._let_go: GradSnapshot | None = None
        self._loss_calls = 0  # loss() calls so far
        self._warned_same_batch = False  # whether a validation batch that is the training batch was warned of
        # mode="exact": the optimizer's step count and the loss() calls at the last two-call meta step that ran
        self._met_at: tuple[int, int] | None = None
        self._fast_met_at = optimizer_steps(self._inner_optimizer)
        self._step_hooks: tuple[RemovableHandle, ...] = ()
        self._foreign_step: str | None = None  # another optimizer stepped the model (metaweight._moves)
        self._frozen_step: list[str] | None = None  # the exact mode's optimizer stepped frozen parameters
        if self.learn:
            ForeignSteps.watch(self)
        # why the loss() calls of the iteration under way are gone (LOADED_SINCE, COPIED_SINCE): said where meta_step
        # misses them; "" after a loss() call
        self._lost_calls = ""
        # mode="fast", two-call form, after a load of a checkpoint saved in the middle of an accumulated step: its
        # loss() calls made (until the first backward through a training loss() since, which looks at the
        # gradients), then that loss's record where the gradients held values then (the step to come carries the
        # earlier calls'), with that count
        self._resumed_calls = 0
        self._resumed: tuple[Micro, int] | None = None
        self._load_note = ""  # LOADED_DURING after a load, until the next meta step: said where the batch is refused
        self._watch: ForwardWatch | None = None
        self._forward_hooks: tuple[RemovableHandle, ...] = ()
        self._callbacks_given = callbacks  # (registered once the whole constructor has returned: _built)

    def _built(self) -> None:
        """What is given to this weighter once its whole constructor (a subclass's too) has returned, when nothing
        can refuse it: a refused weighter moved no criterion, took no logger (a library logger logs the weighter
        given it last: it was taken from the run that held it) and left no hook on the model or its optimizer.
        The ``callbacks`` come first, before hooks a subclass registered itself."""
        if "_callbacks_given" not in self.__dict__:  # (a subclass that never called HarmonizedWeighter.__init__)
            return
        device = self._active.device
        for part in (self.criterion, self.validation):
            if isinstance(part, nn.Module):
                part.to(device)
        self._register_given()
        if self.mode == "fast" and self.learn and self._capturable is None:  # (the two-call form's)
            self._hook_two_calls(device)

    def _drop_build(self, kept: dict[str, Any]) -> None:
        """The last build's fast-mode hooks on the model and optimizer removed, once ``__init__`` ran again and
        returned (the new build hooks them anew: they doubled, both run at every forward and step). Only this
        weighter's: a shallow copy shares the original's, which stay."""
        watch = kept.get("_watch")
        if watch is not None and watch._ref() is self:
            for handle in (*kept.get("_step_hooks", ()), *kept.get("_forward_hooks", ())):
                handle.remove()

    def _hook_two_calls(self, device: torch.device) -> None:
        """``mode="fast"``'s hooks for its two-call form: on the optimizer's step (what the step did) and on the
        model's forward (the training forward's random numbers and modes, for the difference)."""
        inner, model = self._inner_optimizer, self.model
        drop_inert_hooks(model, inner)  # (a dropped weighter's, a copy's: called at every forward otherwise)
        capture = StepCapture(self, before_step)
        self._step_hooks = (inner.register_step_pre_hook(capture),
                            inner.register_step_post_hook(StepEnd(self)))
        self._watch = ForwardWatch(self, device)
        # (first of the pre-hooks: the inputs as the loop passed them, which meta_step gets; a pre-hook of the
        # user's that changes them runs again in every replayed forward)
        self._forward_hooks = (model.register_forward_pre_hook(self._watch.before, with_kwargs=True, prepend=True),
                               model.register_forward_hook(self._watch.after, with_kwargs=True))

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (and copied) without the iteration's pending ``loss()`` of ``mode="fast"``, whose records of
        the forward hold weak references (pickle refused them: TypeError 'cannot pickle weakref.ReferenceType'
        between ``loss()`` and ``meta_step``): a copy starts a new iteration, and its ``meta_step`` says so where
        it finds no ``loss()``."""
        state = dict(self.__dict__)
        state.pop("_kept_walk", None)  # (the last step's walk of the model: a copy walks its own)
        state.pop("_met_grads", None)  # (weak references to this model's gradients)
        if state.get("_pending") is not None or state.get("_stepped") is not None:
            state.update(_pending=None, _stepped=None, _lost_calls=COPIED_SINCE)
        state["_resumed"] = None  # (a record of this weighter's loss() calls)
        return self._copy_state(state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (``copy.deepcopy``) or an unpickled weighter watches its own model and optimizer, which the
        copy holds: their copies carry this weighter's hooks inert (:class:`~metaweight._capture.ForwardWatch`
        and the step's hooks are copied empty, tied to no weighter), so those are removed and hooked anew, and
        the copy is watched for other optimizers' steps as this weighter is. As a loss weighting's copy does, it
        starts a new iteration: the calls of the one under way stay with this weighter."""
        super().__setstate__(state)
        self._lost_calls = state.get("_lost_calls", "")  # (a pickle of an older metaweight has none)
        self._clipping_hints = state.get("_clipping_hints", ClippingHints())  # (nor these)
        if self._built_to_learn:
            ForeignSteps.watch(self)
        self._fast_met_at = optimizer_steps(self._inner_optimizer)  # (the copy's optimizer: counted from now)
        if self._watch is not None and self._watch._ref() is None:  # (a shallow copy shares this weighter's live ones)
            for handle in (*self._step_hooks, *self._forward_hooks):
                handle.remove()
            self._pending = self._stepped = None  # (already None in a state from __getstate__)
            self._hook_two_calls(self._active.device)

    # ----------------------------------------------------------------------------- the two calls
    def loss(self, outputs: Sequence[Tensor], target: Tensor) -> Tensor:
        r"""The weighted training loss :math:`\sum_k \gamma_k L_k` for the user's own backward.

        :math:`\gamma` enters as a constant, as it is at this call (a copy: a :meth:`meta_step` between
        this call and its backward changes the next call's weights, not this loss's; with ``mode="exact"``
        the meta step comes first): the backward reaches the model only.

        With ``mode="fast"`` this is the first of the two calls of an iteration: the terms,
        the outputs (as fixed teachers) and, when the optimizer steps, its update's Jacobian
        and the parameters before the step are kept for :meth:`meta_step`, which follows
        the step.
        """
        terms = self._terms(outputs, target)
        weighted = self._weighted(terms, copy=True)
        self._lost_calls = ""
        self._loss_calls += 1
        if self.mode == "fast" and self.learn and weighted.requires_grad:
            self._keep_for_meta_step(outputs, terms, target, weighted)
            if self._resumed_calls and self._pending is not None:  # (after a load of a mid-step checkpoint)
                micro = self._pending.micro[-1]

                def carried(grad: Tensor) -> None:
                    """At the first backward through a training loss() since the load (after any zero_grad of the
                    loop, in either order): gradients holding values are the checkpoint's calls' (one host read)."""
                    if self._resumed_calls:
                        if gradients_moved([p.grad for _, p in self._trainable()]):
                            self._resumed = (micro, self._resumed_calls)
                        self._resumed_calls = 0

                weighted.register_hook(carried)
        elif self.learn and self.num_calls == 0 and weighted.requires_grad:  # (see warn_if_after_step)
            count_first_loss(self, weighted, target)
        return weighted

    def _keep_for_meta_step(self, outputs: Any, terms: Tensor, target: Any, weighted: Tensor) -> None:
        """``mode="fast"``, two-call form: keep this loss for the meta step after the optimizer's step. A
        loss after another one the optimizer has not stepped on yet is a micro-batch of the same step
        (gradient accumulation); the hook on ``weighted`` tells which losses the step really used."""
        if self.num_calls % self.meta_every:
            self._pending = None
            return
        low = torch.is_autocast_enabled(terms.device.type) or any(
            isinstance(o, Tensor) and o.dtype in (torch.float16, torch.bfloat16) for o in tree_leaves(outputs))
        record = self._watch.take(outputs) if self._watch is not None else None
        micro = Micro(tree_map(lambda o: o.detach() if isinstance(o, Tensor) else o, outputs), terms.detach(), target,
                      low, record, params_print=fingerprint([p for _, p in self._trainable()]))
        if record is None and self._watch is not None:
            micro.unseen = self._watch.unseen(outputs)
        if self._pending is None or self._pending.theta is not None or self._pending.error is not None:
            if self._pending is not None:  # a loss after the step (logging it): meta_step still scores the step
                self._stepped = self._pending
            # the parameters the gradients are taken at: the step must start from them (see _moves)
            self._pending = Pending([micro])
        else:
            self._pending.micro.append(micro)
        watch_backward(self, self._pending, micro, weighted)

    def _trainable(self) -> list[tuple[str, Tensor]]:
        return [(n, p) for n, p in walk(self.module).parameters if p.requires_grad]

    def _zero_grad(self) -> None:
        """:meth:`step`'s ``zero_grad``: the optimizer's (to ``None``), and the gradients of the trainable
        parameters it does not hold (held fixed), which would carry over from call to call into the norm of
        ``clip_grad_norm`` and the step's finiteness check, and of those it holds whatever its ``zero_grad``
        does (one that keeps zeros would leave a frozen parameter's, which its step moves; Python objects only)."""
        self.optimizer.zero_grad(set_to_none=True)
        held = (p for group in self._inner_optimizer.param_groups for p in group["params"])
        for p in itertools.chain((p for _, p in self._trainable()), held):
            if p.grad is not None:
                p.grad = None

    def _weighted(self, terms: Tensor, copy: bool = False) -> Tensor:
        """Remember the terms for :meth:`terms_dict` and weight them by gamma, as a constant (``copy``: a copy of
        it, which autograd saves for the backward in place of gamma, which a meta step may update before it)."""
        self.last_terms = terms.detach()
        gamma = self.gamma.detach()
        return ((gamma.clone() if copy else gamma).to(terms) * terms).sum()

    @walked_call
    def meta_step(self, train_batch: Batch, val_batch: Batch | None = None) -> MetaStepRecord:
        r"""Update :math:`\gamma` by one look-ahead step; leaves the model and optimizer unchanged.

        With ``meta_every=N`` only every N-th call does the look-ahead (the first call does).

        With ``mode="fast"`` the call comes *after* the model's step instead, and the step it
        took is the look-ahead (see :meth:`step`)::

            loss = weighter.loss(model(x), y)        # gamma as it is
            loss.backward()                          # or scaler.scale(loss).backward(); clipping, ...
            optimizer.step()                         # or scaler.step(optimizer)
            weighter.meta_step((x, y), val_batch)    # gamma for the next iteration

        The meta-gradient is that of the step the loop really took: the weighter reads the loop
        through a hook on the returned loss (the factor its backward used), the gradients at the
        end of each backward, an optimizer step pre-hook (the gradients as the optimizer gets
        them, its state) and forward hooks on the model (the random numbers and modes of the
        training forward); see :mod:`metaweight._capture`. ``clip_grad_norm_`` over all
        parameters, declared with ``clip_grad_norm`` and checked, and a ``GradScaler``'s unscaling
        are differentiated through (an undeclared rescale of the gradients is refused); several
        ``loss()`` calls and backwards before one step (gradient accumulation) are one step,
        scored on the whole batch, the micro-batches concatenated in order; any other change of
        the gradients between backward and step is refused with a ``ValueError``, as is a batch
        or a module mode other than the step's, before anything changes. A step the optimizer
        did not take (a ``GradScaler`` that found inf/NaN) gives a skipped record and leaves
        gamma alone; where the gradients are finite (no scaler skipped it: ``meta_step`` came
        before ``optimizer.step()``) it also warns (``RuntimeWarning``). The record of the training forward is that of the forward the outputs given
        to ``loss()`` came from (outputs from no forward the hooks saw, ``model.forward(x)``, are
        refused), and ``meta_step`` must get the inputs that forward got; a ``loss()`` after the
        step (logging) leaves the step's record. A training forward that drew random numbers
        (dropout, stochastic depth, whatever the module is called, from torch's global generators,
        NumPy's or Python's, or a ``torch.Generator`` a module holds) or ran under autocast costs
        one forward more: the
        difference then recomputes its base point in float32 with that forward's random numbers.

        Args:
            train_batch: ``(x, y)``: the training inputs and labels of this iteration.
            val_batch: ``(x_val, y_val)``: a held-out validation batch (none with ``learn=False``: nothing
                is learned from it).

        Returns:
            A :class:`MetaStepRecord`: ``ran``, ``skipped``, ``val_objective``
            (:math:`L_{val}(\theta')`), ``val_exit_losses``, ``gamma_grad``, ``gamma``, ...
            (``ran`` is ``False`` with ``learn=False`` or on a call that ``meta_every`` skips).
        """
        self._check_learn()
        if self.learn:
            check_not_inference_mode("HarmonizedWeighter.meta_step")
        self._check_val_batch(val_batch, "meta_step", train_batch)
        self._check_parameters_held("meta_step")
        if self._capturable is not None:
            raise ValueError("This weighter was built with capturable=True, whose step is the one-call device_step() "
                             "(or step()); the two-call form's meta_step is not capturable. Call step() or "
                             "device_step(), or build the weighter with capturable=False. Nothing was changed.")
        # the batches' labels summarised once (under DDP, with the ranks': one rank's refusal is every rank's)
        summarize_step_labels(train_batch, val_batch, self.criterion, self.validation, self._reducer)
        try:
            with torch.enable_grad():  # (called under torch.no_grad(), the meta-gradient still needs autograd)
                if self.mode == "fast" and self.learn:
                    record = self._two_call.meta_step(self, train_batch, val_batch)
                    self._fast_met_at = optimizer_steps(self._inner_optimizer)  # (a call that returned counts)
                    return record
                warn_if_after_step(self, train_batch)
                warn_if_met_since(self, "meta_step")
                record = self._exact.meta_step(self, train_batch, val_batch)
                if record.ran and self.learn:
                    self._met_at = (optimizer_steps(self._inner_optimizer), self._loss_calls)
                    # (the gradients as this meta step found them, weakly held: a backward writing them since, with
                    # no step, is what a meta step per micro-batch of an accumulated step leaves; Python objects only)
                    self._met_grads = grad_marks([p.grad for _, p in self._trainable()])
                return record
        finally:
            forget_labels()  # labels are remembered for one call only

    def _nothing_to_score(self) -> bool:
        """``mode="fast"``: no :meth:`loss` call and no optimizer step since the last two-call meta step (or since
        built, loaded or copied), so a meta step has no step to score: a batch skipped before its ``loss()`` call,
        or a second call (Python objects only)."""
        return self._pending is None and self._stepped is None and not self._lost_calls and \
            self._fast_met_at == optimizer_steps(self._inner_optimizer)

    def _check_loop(self, own_backward: bool = False) -> None:
        """Before every meta step, what may have changed since the weighter was built and the look-ahead
        cannot replay: the optimizer's options, the model's hooks and another optimizer's step of the model
        (:mod:`metaweight._moves`; Python objects only); raises a ``ValueError`` naming what it found,
        before anything changes. ``own_backward``: the call (``step()``) drops every ``.grad`` before a backward
        of its own, so a frozen parameter's old one moves nothing."""
        check_optimizer_options(self._inner_optimizer)
        check_option_values(type(self.gamma_optimizer), self.gamma_optimizer.param_groups, GAMMA_OPTIMIZER)
        check_hooks(self.module, self.mode, self.backend, {h.id for h in self._forward_hooks})
        check_optimizer_hooks(self._inner_optimizer, {h.id for h in self._step_hooks})
        _check_sparse(sparse_trained(walk(self.module).embeddings), self.mode, self.backend, self._inner_optimizer)
        if self.mode == "exact" and self.backend == "higher" and self.learn:
            own = {id(p) for _, p in walk(self.module).parameters}
            foreign = [p for group in self._inner_optimizer.param_groups for p in group["params"] if id(p) not in own]
            if foreign:  # (higher's differentiable optimizer looks each one up among the model's, and fails)
                raise ValueError(f"The optimizer holds {len(foreign)} tensor(s) that are no parameters of the model "
                                 f"(shapes {shapes_of(foreign)}): a module replaced in the model but left in the optimizer, or a "
                                 f"criterion's parameter. backend='higher' builds its differentiable optimizer over "
                                 f"the model's parameters alone and cannot take them. Drop them from the optimizer "
                                 f"(a replaced module's), or use backend='jvp', whose look-ahead holds them as they "
                                 f"are. gamma and everything else are unchanged.")
        if self._foreign_step is not None:
            name, self._foreign_step = self._foreign_step, None  # (refused once: the next meta step sees anew)
            raise ValueError(FOREIGN_STEP.format(name=name))
        if self._frozen_step is not None and own_backward:
            self._frozen_step = None
        if self._frozen_step is not None:
            # refused where they still hold a .grad, which the coming step moves them on too (the look-ahead does
            # not); a .grad the loop has let go of since (zero_grad(set_to_none=True)) ended it with the last step
            # (kept while they do: a retry is refused alike; gone with the .grad, or the freeze)
            names = [n for n in frozen_with_grad(self._inner_optimizer, self.module) if n in self._frozen_step]
            self._frozen_step = names or None
            if names:
                raise ValueError(FROZEN_WITH_GRAD.format(names=names[:8]) + " (Seen at the last optimizer step, and "
                                 "their .grad is still there.) gamma and everything else are unchanged.")

    def _check_outside_model(self, read: bool = False, stepped: tuple[list[Tensor], Tensor] | None = None) -> None:
        """``mode="fast"``: refuse an optimizer that steps trainable tensors outside the model, those of them a
        backward reached (a gradient: a criterion's parameter; an old tensor left beside its successor after a
        replaced head has none) (:data:`~metaweight._optimizers.FAST_OUTSIDE_MODEL`). Python objects only,
        but with ``read`` (the two-call form, after the loop's own ``zero_grad``): where such tensors hold a
        gradient, one host read of whether it is all zeros, as ``zero_grad(set_to_none=False)`` leaves the
        gradient of a replaced head's old tensor that no backward reaches (not refused). ``stepped``: those
        the optimizer's step found with a gradient, and on the device whether each was nonzero then
        (:attr:`~metaweight._capture.Pending.stepped_outside`; a ``zero_grad`` between the step and
        ``meta_step`` has cleared them since), judged in the same read."""
        own = (p for _, p in walk(self.module).parameters)  # (the step's walk: no second walk of the tree)
        outside = [p for p in outside_model(self._inner_optimizer, own) if p.grad is not None]
        if (outside or stepped is not None) and read:
            device = self.gamma.device
            known = {id(p) for p in stepped[0]} if stepped is not None else set()
            now = [p for p in outside if id(p) not in known]
            flags = ([stepped[1].to(device)] if stepped is not None else []) + \
                ([torch.stack([p.grad.ne(0).any().to(device, torch.float32) for p in now])] if now else [])
            tensors = (stepped[0] if stepped is not None else []) + now
            reached = host_read([torch.cat(flags)])
            outside = [p for p, r in zip(tensors, reached) if r != 0.0]
        _refuse_outside_model(outside)

    def _check_val_batch(self, val_batch: Batch | None, call: str, train_batch: Batch | None = None) -> None:
        """A validation batch is what gamma is learned from: needed with ``learn=True``, optional without; warned
        of (once) where its inputs are the training batch's very tensor (Python objects only)."""
        if val_batch is None and self.learn:
            raise ValueError(f"HarmonizedWeighter.{call} learns gamma on a validation batch: pass it, "
                             f"weighter.{call}((x, y), (x_val, y_val)). Only a weighter with learn=False (gamma "
                             f"fixed) needs none. Nothing was changed.")
        if not self.learn or self._warned_same_batch or val_batch is None or train_batch is None:
            return
        same = val_batch is train_batch or (
            isinstance(val_batch, (tuple, list)) and isinstance(train_batch, (tuple, list)) and
            len(val_batch) > 0 and len(train_batch) > 0 and isinstance(val_batch[0], Tensor) and
            val_batch[0] is train_batch[0])
        if same:
            self._warned_same_batch = True
            warn_user(f"HarmonizedWeighter.{call} got the training batch's inputs as its validation batch: gamma then "
                      f"learns to fit the data the model steps on, where the look-ahead is to be scored on held-out "
                      f"data (HDKD holds out a split of the training set). Pass a batch of a held-out split, not "
                      f"augmented: weighter.{call}((x, y), (x_val, y_val)). (Warned once.)")

    def _check_learn(self) -> None:
        """``learn`` may be switched off and on again, not on for a weighter built without it."""
        if self.learn and not self._built_to_learn:
            raise ValueError("This weighter was built with learn=False, so it has no meta-gradient backend (nor, with "
                             "mode='fast', the hooks that read the loop): setting weighter.learn = True cannot start "
                             "learning. Build it with learn=True and set weighter.learn = False to pause learning. "
                             "Nothing was changed.")

    # ------------------------------------------------------------- gamma's step, for both modes
    def _apply(self, gamma_grad: Tensor, objective: Tensor, exit_losses: Tensor, terms: Tensor, *,
               after_step: bool = False, call_hooks: bool = True, val_inputs: Any = None) -> MetaStepRecord:
        """A whole meta step from its meta-gradient: :meth:`_step_gamma`, one read, :meth:`_meta_outcome`
        (``after_step``, ``call_hooks``, ``val_inputs``: see there)."""
        pending = self._step_gamma(gamma_grad, objective, exit_losses, terms, val_inputs)
        return self._meta_outcome(pending, host_read(pending.values), call_hooks, after_step=after_step)

    def _step_gamma(self, gamma_grad: Tensor, objective: Tensor, exit_losses: Tensor, terms: Tensor,
                    val_inputs: Any = None) -> PendingMeta:
        """Step gamma and project it, all on the device: gamma keeps its old value where the meta-gradient
        or the new gamma is not finite (the decision is read later, with whatever else the step reads).
        ``val_inputs``: the validation batch's inputs, read only where the step is refused (to name them)."""
        saved = StateSnapshot(self.gamma, self.gamma_optimizer, None)
        try:
            finite, stepped = self._gamma_step(gamma_grad, objective, exit_losses)
        except BaseException:  # (a user's gamma optimizer that raised mid-step: its state is put back)
            saved.restore(self.gamma)
            raise
        proposed = self.gamma.detach().clone()
        with torch.no_grad():
            self.gamma.copy_(torch.where(finite & stepped, self.gamma, saved.gamma))
        values = [finite, stepped, objective, exit_losses, gamma_grad, proposed, terms]
        return PendingMeta(saved, values, gamma_grad.detach(), exit_losses.detach(), val_inputs)

    def _gamma_step(self, gamma_grad: Tensor, objective: Tensor, exit_losses: Tensor) -> tuple[Tensor, Tensor]:
        """gamma's optimizer step on ``gamma_grad`` and its projection, in place on the device, and the two
        conditions for keeping it (``[]`` bool tensors, no host read): the objective, its exit losses and
        the meta-gradient finite; gamma finite (and, with ``constraint="normalize"``, not all zero) after it."""
        finite = torch.isfinite(objective).all() & torch.isfinite(gamma_grad).all() & torch.isfinite(exit_losses).all()
        self.gamma_optimizer.zero_grad(set_to_none=True)
        self.gamma.grad = gamma_grad.to(self.gamma)
        try:
            self.gamma_optimizer.step()
        finally:
            self.gamma.grad = None
        total = self._project()
        stepped = torch.isfinite(total) & (total != 0) if self.constraint == "normalize" else torch.isfinite(total)
        return finite, stepped

    def _meta_outcome(self, pending: PendingMeta, values: list[float], call_hooks: bool = True, *,
                      after_step: bool = False) -> MetaStepRecord:
        """The host side of a meta step, from the values of ``pending`` read back: refuse it (gamma's optimizer
        put back, then raise or skip) or update the validation average, count it and call the hooks. With
        ``after_step`` (the fast mode's one-call ``step()``, whose model step was taken and stands) a refused
        meta step is skipped, never raised."""
        n_e, n_g = pending.exit_losses.numel(), self.gamma.numel()
        ok, ok_step, value = values[0] == 1.0, values[1] == 1.0, values[2]
        losses = values[3:3 + n_e]
        grad = values[3 + n_e:3 + n_e + n_g]
        gamma = values[3 + n_e + n_g:3 + n_e + 2 * n_g]
        term_values = values[3 + n_e + 2 * n_g:3 + n_e + 2 * n_g + n_g]
        if not (ok and ok_step):
            pending.saved.restore(self.gamma)
            if not ok and _holds_nonfinite(pending.val_inputs, self.gamma.device):  # (read only here: a refusal's message)
                message = (f"Non-finite meta step: the validation batch's inputs hold inf or NaN, so the step "
                           f"cannot be scored (validation objective {value}). gamma and the validation average "
                           f"were left unchanged. Check the validation data.")
            elif not ok:
                bad_terms = [n for n, t in zip(self.term_names, term_values) if not math.isfinite(t)]
                bad_grad = [n for n, g in zip(self.term_names, grad) if not math.isfinite(g)]
                values_finite = math.isfinite(value) and all(math.isfinite(e) for e in losses) and not bad_terms
                advice = (
                    " The losses are finite but their derivative through the look-ahead step is not: the step's "
                    "derivative overflowed (with Adam or RMSprop, lr / eps where a weight has no gradient yet: raise "
                    "the optimizer's eps or lower its lr; with backend='finite_difference', set fd_epsilon), or a term "
                    "has an infinite slope at these weights (a sqrt or log at 0: add a small constant inside it)."
                    if values_finite and bad_grad else
                    " Check the data (inputs, labels) and the learning rates: a look-ahead step that is too large "
                    "makes the validation loss overflow.")
                message = (
                    f"Non-finite meta step: validation objective {value}, validation exit losses "
                    f"{losses}, non-finite training terms {bad_terms or 'none'}, non-finite meta-gradient "
                    f"(d L_val / d gamma) for the terms {bad_grad or 'none'}. gamma and the validation average "
                    f"were left unchanged.{advice}"
                ) + masked_label_hint(losses + [t for n, t in zip(self.term_names, term_values) if n.startswith("ce[")]) \
                    + half_precision_eps_hint(self._inner_optimizer)
            else:
                kind = "non-finite" if not all(math.isfinite(g) for g in gamma) else "all-zero"
                message = (f"gamma's own optimizer step gave {kind} weights (meta-gradient {grad}); gamma, its "
                           f"optimizer and the validation average were left unchanged. Lower gamma_lr or check "
                           f"the gamma optimizer.")
            return self._refuse(message, value, losses, term_values, after_step=after_step)
        # (the validation average as it was, for a hook that raises: copied only where there are hooks)
        average = [b.detach().clone() for b in self.validation.buffers()] \
            if call_hooks and self._hooks and isinstance(self.validation, nn.Module) else []
        self._objective.update(pending.exit_losses)
        self.num_meta_steps += 1
        record = MetaStepRecord(self.num_calls, ran=True, meta_step=self.num_meta_steps,
                                val_objective=value, val_exit_losses=losses if self._objective.per_exit else None,
                                gamma_grad=pending.gamma_grad, gamma=dict(zip(self.term_names, gamma)),
                                terms=dict(zip(self.term_names, term_values)))
        previous, self.last_meta = self.last_meta, record
        if call_hooks:  # (the two-call meta_step's; step() reports its record once its model step stands)

            @torch.no_grad()
            def put_back() -> None:
                pending.saved.restore(self.gamma)
                for buffer, kept in zip(self.validation.buffers() if average else (), average):
                    buffer.copy_(kept)
                self.num_meta_steps -= 1
                self.last_meta = previous

            self._report(record, put_back, "this meta step is not kept: gamma, its optimizer and the validation "
                         "average are as before the call.")
        return record

    def _refuse(self, message: str, objective: float, exit_losses: list[float], terms: list[float], *,
                after_step: bool = False) -> MetaStepRecord:
        """A meta step that changed nothing: raise, or count it, warn and report it skipped (always skipped
        ``after_step``: a raise must leave everything as it was, and the model's step stands)."""
        if after_step:
            message += (" The model's step (finite, taken with the gamma it had) stands: mode='fast' steps the model "
                        "before the meta step, so this meta step was skipped, not raised.")
        elif self.nonfinite == "raise":
            raise ValueError(message + SKIP_META_STEPS)
        self.num_skipped += 1
        warn_user(f"Skipped a meta step ({self.num_skipped} so far): {message}")
        return MetaStepRecord(self.num_calls, ran=True, skipped=True, meta_step=self.num_meta_steps,
                              val_objective=objective,
                              val_exit_losses=exit_losses if self._objective.per_exit else None,
                              gamma=self.gamma_dict(), terms=dict(zip(self.term_names, terms)),
                              message=message)

    @torch.no_grad()
    def _project(self) -> Tensor:
        """Keep gamma >= 0 on the active terms (and its sum, with ``constraint="normalize"``), on the
        device; returns the sum of the projected gamma."""
        gamma = self.gamma
        gamma.clamp_(min=0.0)
        gamma.mul_(self._active)
        if self.constraint == "normalize":
            total = gamma.sum().double()
            gamma.mul_(torch.where(total > 0, self._gamma_sum / total, torch.ones_like(total)))
        return gamma.sum()

    # ----------------------------------------------------------------------------- the one call
    @walked_call
    def step(self, train_batch: Batch, val_batch: Batch | None = None) -> MetaStepRecord:
        """One full HDKD iteration: :meth:`meta_step`, then the model's step on :meth:`loss`.

        With the ``jvp``/``finite_difference`` backends and ``reuse_forward=True`` the model's
        step backpropagates the new weights through the meta step's own training forward
        (same batch, same parameters, same dropout masks, BatchNorm statistics updated once, the
        random-number generators left where that forward left them), so the iteration runs one
        forward fewer; the price is holding that forward's graph
        during the validation pass (on the CIFAR MSDNet: about 8% less time, but 1.67x instead
        of 1.15x the peak memory of a plain iteration). If anything fails, the model's buffers
        are restored.

        A step whose weighted loss or gradient is not finite, or whose forward made a buffer
        non-finite (BatchNorm statistics; a buffer non-finite by design, such as a mask of
        ``-inf``, is left alone, and one the forward registers or grows counts only where it is
        NaN: the loop guide's rule), on any rank, is never taken:
        the model's parameters, buffers and optimizer state, gamma and the validation
        average are left as they were before the call; with ``nonfinite="raise"`` a
        ``ValueError`` says so, with ``"skip"`` a ``RuntimeWarning`` does and
        :attr:`num_skipped` counts it.

        ``step()`` steps the model with the optimizer, so one that does not hold every trainable parameter of
        the model (built before ``attach_exits`` added the exits, or over a part by mistake) is refused with a
        ``ValueError`` naming them: freeze a part on purpose with ``requires_grad_(False)``, or step it in the two
        calls, where parameters the optimizer does not hold are held fixed.

        Whatever ``step()`` refuses or raises leaves the model's parameters, buffers and optimizer
        state, gamma, its optimizer, the validation average and the counters as they were. What it
        refuses before its backward (options or hooks the look-ahead cannot replay, sparse
        gradients) leaves the gradients too; once its backward has run, a refused or failed step
        leaves every ``p.grad`` ``None`` (the gradients before the call are gone: ``step()``
        computes its own, and keeping the old ones would hold one more copy of them), in either
        mode. With ``mode="fast"`` the model steps before the meta step: see ``nonfinite``. A meta step
        hook (``callbacks``) that raises comes after the model's step, which stands and is counted; the
        meta step is put back and the error says so (see :meth:`register_meta_step_hook`).

        Returns the meta step's :class:`MetaStepRecord` with ``loss``, the weighted training
        loss, ``terms`` and ``model_step_skipped`` filled in. ``val_batch`` may be left out with
        ``learn=False`` (gamma fixed: no validation batch is read).
        """
        check_not_inference_mode("HarmonizedWeighter.step")
        self._check_learn()
        self._check_val_batch(val_batch, "step", train_batch)
        self._check_parameters_held("step")
        self._check_holds_trainable("step()")
        # a model converted after the optimizer's first step, where no meta step checks the whole state first
        # (learn=False, meta_every): torch's Adam counts a step, and steps the parameters it reaches first, before
        # refusing the mix
        check_optimizer_state(self._inner_optimizer, first_only=True)
        if self._capturable is not None:  # the device's step, read back (once) and reported to the hooks
            record, (self.num_calls, self.num_meta_steps, self.num_skipped) = \
                self.device_step(train_batch, val_batch).read_with_counts()
            if self._capturable.eager:  # (the eager step, a warm-up or a first momentum step, reports itself)
                return record
            if record.message is not None:  # a step refused on the device: warned of, as the eager step warns
                kind = "model step ({} skipped so far)" if record.model_step_skipped else "meta step ({} so far)"
                warn_user(f"Skipped a {kind.format(self.num_skipped)}: {record.message}")
            elif record.ran:  # (the hooks get the very record step() returns, its loss too)
                previous, self.last_meta = self.last_meta, record
                capturable = self._capturable

                def put_back() -> None:  # as the eager step: the model's step stands, its meta step is put back
                    capturable.undo_meta_step(self)
                    self.last_meta = previous

                self._report(record, put_back, "the model's step stands and is counted, gamma, its optimizer and "
                             "the validation average are as before the call.")
            return record
        try:
            with torch.enable_grad():  # (called under torch.no_grad(), the step still needs its gradients)
                if self.mode == "fast" and self.learn:
                    return self._fast.step(self, train_batch, val_batch)
                warn_if_met_since(self, "step()")
                return self._exact.step(self, train_batch, val_batch)
        finally:
            forget_labels()  # labels are remembered for one step only

    @walked_call
    def device_step(self, train_batch: Batch, val_batch: Batch) -> DeviceRecord:
        """:meth:`step` with ``capturable=True``, safe to capture in a CUDA graph: no read back to the host and
        the same operations whatever the data. A non-finite model step is skipped on the device (parameters,
        buffers and optimizer state as before it; the gradients are left as computed), a non-finite meta step
        too (gamma, its optimizer and the validation average as before it), as ``nonfinite="skip"`` does, without
        a warning: the returned :class:`DeviceRecord` holds the step's numbers, whether each step was taken and
        the counts, as tensors on the device; ``record.read()`` gives the :class:`MetaStepRecord` (one read).

        The calls until a step was taken and the gradient check done (normally the first), and a call in which a
        parameter group of a fused SGD with momentum gets its first gradients (its momentum buffers are made then),
        run the eager step,
        which checks the labels (in range, no padding), the model's gradients (``check_gradients``) and, once,
        that the training forward draws no random numbers, and reads the host: run them before capturing. After
        that the labels are not checked (out of range: torch's own error, on a GPU a device-side assert; padding
        would be scored) and a forward that starts drawing random numbers is not noticed. ``num_calls``,
        ``num_meta_steps`` and ``num_skipped`` are counted on the device: :meth:`sync_counts` (or
        :meth:`state_dict`) brings them to the host. No hook is called and ``last_meta`` is not set (nothing
        is read): :meth:`step` does both. The learning rates are read as Python numbers: a captured graph
        keeps those of its capture (capture again after a scheduler changes them; a tensor ``lr`` would be
        read back). Raises a ``ValueError``, changing nothing, for a forward that draws random numbers (first
        call) or registers, replaces or resizes a buffer, for batches off the model's device, for an optimizer
        holding a parameter replaced since the last call, and for an optimizer option or hook the step cannot
        replay (as :meth:`step`).

        A whole iteration under a CUDA graph (shapes static, as ``torch.cuda.graphs`` asks)::

            weighter.device_step(train, val)                 # warm-up: eager, its checks read the host
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                record = weighter.device_step(static_train, static_val)
            for (x, y), (xv, yv) in batches:
                static_train[0].copy_(x); static_train[1].copy_(y)
                static_val[0].copy_(xv); static_val[1].copy_(yv)
                graph.replay()                               # record's tensors now hold this iteration's
        """
        check_not_inference_mode("HarmonizedWeighter.device_step")
        if self._capturable is None:
            raise ValueError("device_step() is the step of a weighter built with capturable=True (mode='fast'); "
                             "this one was not: call step(), or build it with capturable=True.")
        self._check_learn()
        self._check_parameters_held("device_step")  # (Python objects only: nothing read from the device)
        self._check_holds_trainable("device_step()")
        with torch.enable_grad():
            return self._capturable.step(self, train_batch, val_batch)

    def _check_holds_trainable(self, call: str) -> None:
        """:func:`~metaweight._weighting.check_step_holds_trainable` for ``step()``/``device_step()``, which step the
        model with the optimizer (Python objects only)."""
        two_calls = ("loss = weighter.loss(model(x), y); loss.backward(); optimizer.step(); weighter.meta_step((x, y), "
                     "val_batch)" if self.mode == "fast" else "weighter.meta_step((x, y), val_batch); loss = "
                     "weighter.loss(model(x), y); loss.backward(); optimizer.step()")
        check_step_holds_trainable(self._inner_optimizer, self._trainable(), f"HarmonizedWeighter.{call}", two_calls)

    def sync_counts(self) -> None:
        """With ``capturable=True``: bring ``num_calls``, ``num_meta_steps`` and ``num_skipped``, which
        :meth:`device_step` counts on the device, to the host (one read; not while capturing). Otherwise nothing."""
        if self._capturable is not None:
            self._capturable.sync(self)

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The weighter's own state: gamma, its optimizer and the validation average, and ``learn``: whether
        it was built to learn gamma (``learn=True``, paused or not) or keeps it fixed (``learn=False``); and where
        in an iteration it was saved: ``pending_calls``, the ``loss()`` calls of an accumulated step under way, and
        ``meta_step_due``, whether an optimizer step was taken whose meta step has not come (``mode="fast"``; a
        checkpoint holds no ``loss()`` call, so a ``meta_step`` resumed from it refuses, saying so, where it is
        due, and skips a batch the loop skipped where it is not)."""
        self.sync_counts()
        return {
            "term_names": list(self.term_names),
            "teachers": getattr(self.criterion, "teachers", None),
            "learn": self._built_to_learn,
            "gamma": self.gamma.detach().cpu().clone(),
            "gamma_optimizer": copy.deepcopy(self.gamma_optimizer.state_dict()),
            "gamma_optimizer_type": type(self.gamma_optimizer).__name__,
            "validation": self._objective.state_dict(),
            "num_meta_steps": self.num_meta_steps,
            "num_calls": self.num_calls,
            "num_skipped": self.num_skipped,
            "gamma_sum": self._gamma_sum,
            "constraint": self.constraint,
            "pending_calls": self._pending_calls(),
            "meta_step_due": self._meta_step_due(),
        }

    def _meta_step_due(self) -> bool:
        """``mode="fast"``: whether an optimizer step was taken on :meth:`loss` calls whose meta step has not come
        (a checkpoint saved between the step and ``meta_step`` does not hold those calls; Python objects only)."""
        return (self._pending is not None and self._pending.theta is not None) or self._stepped is not None

    def _pending_calls(self) -> int:
        """``mode="fast"``, two-call form: the training :meth:`loss` calls a backward went through that wait for
        the optimizer's step (the checkpoint of an accumulated step under way), counting those before a load this
        step carries. Python objects only."""
        pending = self._pending
        if pending is None or pending.theta is not None or pending.error is not None:
            return self._resumed_calls  # (loaded from such a checkpoint, and saved again before a training call)
        stepped = pending.stepped()
        resumed = self._resumed
        carried = resumed[1] if resumed is not None and any(m is resumed[0] for m in stepped) else 0
        return len(stepped) + carried

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. The whole checkpoint is checked first; a checkpoint saved for
        other terms, with another gamma optimizer, with a key missing or with non-finite or negative
        values is refused with a ``ValueError`` (a ``TypeError`` for a non-dict), changing nothing.
        So is one of the other kind: a learned gamma (saved by a weighter built with ``learn=True``)
        for a weighter built with ``learn=False`` (fixed weights, e.g. ``preset("naive_dkd")``), which
        would train on it from then on, or fixed weights for a weighter that learns. A checkpoint
        saved before ``learn`` was recorded loads as before.

        Raises:
            TypeError: ``state_dict`` is not a dict.
            ValueError: the checkpoint does not fit this weighter (see above); nothing is changed.
        """
        check_not_inference_mode("HarmonizedWeighter.load_state_dict", STATE_IN_INFERENCE_MODE)
        loaded = checked_state(self, state_dict)  # the whole checkpoint, before anything changes
        # everything checked: now apply
        self.gamma_optimizer.load_state_dict(own_implementation(self.gamma_optimizer, state_dict["gamma_optimizer"]))
        with torch.no_grad():
            self.gamma.copy_(loaded.gamma)
        self._objective.load_state_dict(state_dict["validation"])
        self.num_meta_steps = loaded.num_meta_steps
        self.num_calls = loaded.num_calls
        self.num_skipped = loaded.num_skipped
        self._gamma_sum = loaded.gamma_sum
        if self._pending is None and loaded.meta_step_due is not False:  # (no loss() call of the iteration under
            # way is in a checkpoint: said where meta_step finds none, unless it was saved at an iteration's end,
            # where a meta_step with no loss() call since is a batch the loop skipped)
            self._lost_calls = LOADED_SINCE
        self._met_at = None
        self._fast_met_at = optimizer_steps(self._inner_optimizer)
        self._resumed_calls, self._resumed = loaded.pending_calls or 0, None
        self._load_note = LOADED_DURING if loaded.pending_calls != 0 else ""  # (an older checkpoint's: not known)
        self._follows, self._restored = self.num_calls, restored_at(self.num_calls)  # (the log's rows after it: undone)
        if self._capturable is not None and self._capturable.counts is not None:
            self._capturable.reset(self)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(terms={self.term_names}, criterion={type(self.criterion).__name__}, "
            f"learn={self.learn}, backend={self.backend!r}, meta_every={self.meta_every}, "
            f"gamma_lr={self.gamma_lr}, constraint={self.constraint!r}, mode={self.mode!r}, "
            f"clip_grad_norm={self.clip_grad_norm!r}, optimizer={type(self.optimizer).__name__}, "
            f"gamma_optimizer={type(self.gamma_optimizer).__name__}, "
            f"validation={self.validation!r})"
        )


def _holds_nonfinite(inputs: Any, device: torch.device) -> bool:
    """Whether the floating-point tensors among ``inputs`` (any nesting) hold inf or NaN: one host read of the
    flag the fast step decides its validation inputs by."""
    return host_read([nonfinite_flag(torch.zeros((), device=device), float_leaves(inputs))])[0] != 0.0


def _refuse_outside_model(outside: list[Tensor]) -> None:
    """``mode="fast"``: the refusal of an optimizer stepping the trainable tensors ``outside`` the model."""
    if outside:
        raise ValueError(FAST_OUTSIDE_MODEL.format(count=len(outside), shapes=shapes_of(outside)))


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``torch.compile`` wraps the model (under DistributedDataParallel or not)."""
    for _ in range(4):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif callable(getattr(model, "_orig_mod", None)) and isinstance(model._orig_mod, nn.Module):
            return True
        else:
            break
    return False


def _check_sparse(sparse: list[str], mode: str, backend: str, optimizer: torch.optim.Optimizer) -> None:
    """Refuse sparse gradients where the look-ahead cannot replay them (at construction, and before every meta
    step, as an embedding may be unfrozen in between): ``sparse`` names the embeddings with ``sparse=True``
    whose weight is trained (:func:`~metaweight._capture.sparse_trained`). The fast mode's closed-form
    step and the ``jvp`` backend's forward-mode pass need dense gradients, and of the torch optimizers that
    step sparse gradients (SGD, Adagrad, SparseAdam) ``higher`` replays SGD's only (its
    ``DifferentiableAdagrad`` raises on them; SparseAdam it does not replay at all)."""
    if sparse and (mode == "fast" or backend == "jvp"):
        where = "mode='fast'" if mode == "fast" else "backend='jvp'"
        raise ValueError(
            f"The modules {sparse} have sparse=True (sparse gradients), which {where} cannot replay. Build them with "
            f"sparse=False, freeze them (requires_grad_(False)), or pass mode='exact' with backend='higher' or "
            f"backend='finite_difference', an SGD optimizer (the one optimizer of sparse gradients the look-ahead "
            f"replays) and call meta_step in your own loop (step() refuses sparse gradients too). Nothing was "
            f"changed.")
    if sparse and backend == "higher" and isinstance(optimizer, torch.optim.Adagrad):
        raise ValueError(
            f"The modules {sparse} have sparse=True (sparse gradients), and the look-ahead replays Adagrad through "
            f"higher's DifferentiableAdagrad, which has no support for sparse gradients (its meta_step would raise "
            f"NotImplementedError). Use torch.optim.SGD, whose sparse step higher replays, build the modules "
            f"with sparse=False, or freeze them (requires_grad_(False)). Nothing was changed.")
