"""Input checks shared by the losses, the validation objective and the weighter.

Every check raises a ``ValueError`` that names what was expected, what came,
and how to fix it, before any state is touched.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence, ValuesView
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from metaweight._transaction import host_read


NO_TRAINING_GRADIENT = ("The weighted training loss has no gradient: the criterion's terms were computed outside "
                        "autograd's graph (a .detach(), .item(), argmax or numpy inside the criterion or the model's "
                        "forward, or torch.no_grad()), or no parameter of the model requires grad. Give a criterion "
                        "whose terms are differentiable in the model's outputs.")
NO_VALIDATION_GRADIENT = ("The validation objective has no gradient in the model's parameters (an error rate from "
                          "argmax, a value read with .item() or numpy, a .detach() or torch.no_grad() inside it): the "
                          "meta step descends its gradient. Use a differentiable objective (cross-entropy, "
                          "mw.BalancedValidation), and compute an error rate beside it for logging.")


def check_differentiable(value: Tensor, message: str) -> None:
    """Refuse with ``message`` (a ``ValueError``) a loss that autograd cannot differentiate (``requires_grad``
    false), where a backward or ``torch.autograd.grad`` would raise torch's bare "element 0 of tensors does not
    require grad". Python only."""
    if not value.requires_grad:
        raise ValueError(message)


STATE_IN_INFERENCE_MODE = ("the tensors it would make there (gamma and the state that steps it) would be inference "
                           "tensors, which no later step outside it may update or differentiate")


def check_not_inference_mode(call: str, why: str | None = None) -> None:
    """Refuse ``call`` under ``torch.inference_mode()``, before it changes anything: a method that needs autograd
    (a backward, a meta-gradient), which records nothing there, and which ``torch.enable_grad()`` cannot turn back
    on (as it does under ``torch.no_grad()``); or one that makes a weighter's state (``why``: a constructor, a
    ``load_state_dict``), whose tensors made there would be inference tensors, which no later call outside may
    write (the weighter would fail at every later step). Python only."""
    if torch.is_inference_mode_enabled():
        why = why or ("autograd records nothing there and torch.enable_grad() cannot turn it back on (as it does "
                      "under torch.no_grad()), and it needs the gradients of the loss")
        raise RuntimeError(f"{call} was called under torch.inference_mode(): {why}. Make this call outside the "
                           f"`with torch.inference_mode():` block (tensors made inside it cannot be saved for "
                           f"backward either: make the batches outside it too). Nothing was changed.")


def check_num_exits(num_exits: int) -> int:
    value = integer_value(num_exits)
    if value is None or value < 1:
        raise ValueError(f"Invalid num_exits: {num_exits!r}. Expected a positive int.")
    return value


def _key_of_list(outputs: object) -> str:
    """How to select the exits' logits from ``outputs``, for a message: a dict's key holding a list, else a word."""
    keys = [k for k, v in outputs.items() if isinstance(v, (list, tuple))] if isinstance(outputs, Mapping) else []
    return f"{keys[0]!r}" if len(keys) == 1 else "select (the key or index of the list, or a callable picking it)"


def check_exit_outputs(outputs: object, num_exits: int | None, where: str = "model output",
                       fix: str = "Build the loss and the validation objective with num_exits={n}",
                       expected: str = "num_exits={k}") -> list[Tensor]:
    """Check that ``outputs`` is a list/tuple of ``num_exits`` logits tensors of one shape ``[B, C]``
    (``None``: any number but 0, where the caller knows none yet); ``fix`` (with ``{n}``, the exits
    found) says what to change when their number differs, and ``expected`` (with ``{k}``) where
    ``num_exits`` came from."""
    count = "K logits tensors" if num_exits is None else \
        f"{num_exits} logits tensor{'s' if num_exits != 1 else ''}"
    if isinstance(outputs, Tensor) or not isinstance(outputs, Sequence):
        raise ValueError(
            f"The {where} should be a list or tuple of {count}, "
            f"one per exit (shallow to deep). Found `{type(outputs).__name__}`"
            f"{' (a generator: make it a list)' if inspect.isgenerator(outputs) else ''}"
            f"{f' with keys {list(outputs)[:6]}' if isinstance(outputs, Mapping) else ''}. Make the model's forward "
            f"return `[logits_1, ..., logits_K]`, or wrap it with `metaweight.MultiExit`"
            + f", or, where it returns them beside other outputs, score them with metaweight.OnOutputs(loss, "
              f"{_key_of_list(outputs)})."
        )
    if len(outputs) and isinstance(outputs[0], (list, tuple)) and all(isinstance(t, Tensor) for t in outputs[0]):
        raise ValueError(
            f"The {where} is a {type(outputs).__name__} whose first element is a list of {len(outputs[0])} tensors: it "
            f"looks like `(exit_logits, extras)`. Give metaweight the list of exit logits alone, e.g. make the "
            f"forward return only the logits, or wrap the model: `forward(x) = model(x)[0]`."
        )
    if num_exits is None and not outputs:
        raise ValueError(f"The {where} is an empty {type(outputs).__name__}: a multi-exit model returns one logits "
                         f"tensor per exit, `[logits_1, ..., logits_K]`; check the model's forward.")
    if num_exits is not None and len(outputs) != num_exits:
        raise ValueError(
            f"The {where} has {len(outputs)} exits, but {expected.format(k=num_exits)}. "
            f"{fix.format(n=len(outputs))}, or "
            f"check the model's forward."
        )
    shape = None
    for k, logits in enumerate(outputs):
        if not isinstance(logits, Tensor):
            raise ValueError(f"Exit {k + 1} of the {where} is `{type(logits).__name__}`, expected a Tensor.")
        if logits.dim() not in (2, 3):
            raise ValueError(
                f"Exit {k + 1} of the {where} should be a tensor of logits [batch, classes] (or [batch, tokens, "
                f"classes] for token-level exits). Found shape {tuple(logits.shape)}."
            )
        if not logits.is_floating_point():
            raise ValueError(f"Exit {k + 1} of the {where} should hold floating-point logits. Found {logits.dtype}.")
        if shape is None:
            shape = logits.shape
        elif logits.shape != shape:
            raise ValueError(
                f"All exits must give logits of one shape. Exit 1 gives {tuple(shape)}, exit {k + 1} "
                f"gives {tuple(logits.shape)}."
            )
    return list(outputs)


def softmax_undefined(logits: Tensor) -> Tensor:
    """Where a row of logits ``[..., C]`` has no softmax, ``[...]`` bool: its largest logit is ``-inf``
    (every class masked: 0/0) or ``+inf`` (inf/inf). A row holding NaN is not flagged (the exit
    rules' convention: a NaN score never leaves)."""
    return torch.isinf(logits.detach().amax(-1))


UNDEFINED_SOFTMAX_FIX = ("A sample needs at least one class with a finite logit: masking classes with -inf is "
                         "fine as long as one class stays. Drop such samples, or fix the mask (or the overflow).")


def check_softmax_rows(logits: Tensor, name: str = "logits", reached: Tensor | None = None) -> None:
    """Refuse logits ``[K, N, C]`` with a row that has no softmax (see :func:`softmax_undefined`),
    naming the first one; one read back to the host. With ``reached`` (``[K, N]`` bool: the exits
    each sample reaches under early exit), only those rows count: a sample that left earlier is
    never judged on a later exit's logits, as :class:`EarlyExit` never computes them."""
    undefined = softmax_undefined(logits)
    if reached is not None:
        undefined = undefined & reached.to(undefined.device)
    if bool(undefined.any()):
        where = [int(i) for i in undefined.nonzero()[0]]
        top = float(logits[tuple(where)].amax())
        what = "are all -inf (every class masked)" if top < 0 else "hold +inf"
        if reached is not None:
            what += ", at an exit that sample reaches"
        position = f"exit {where[0] + 1}, sample {where[1]}" if len(where) == 2 else f"index {where}"
        raise ValueError(f"`{name}`{where} ({position}) {what}: that row has no softmax, so it has no confidence "
                         f"and no prediction ({int(undefined.sum())} such rows in all). {UNDEFINED_SOFTMAX_FIX}")


MASK_GAP = 1e3
MASK_RATIO = 10.0
MASKED = "masked (-inf, or 1e3 or more below the row's largest logit, as finfo.min, -1e9 or -1e4 masks are)"


def masked_classes(logits: Tensor) -> Tensor:
    """Where a class is masked out in logits ``[..., C]``, bool of the same shape: its logit is
    ``-inf``, or it lies below a gap in its row's sorted logits that is at least :data:`MASK_GAP`
    below the row's largest logit and at least :data:`MASK_RATIO` times as wide as the spread of
    the logits on either side of it. Code in the Hugging Face style masks with
    ``torch.finfo(dtype).min``, ``-1e9`` or ``-1e4`` (a constant, or added to the logits) rather
    than ``-inf``: such classes sit in a cluster far below the others. An over-confident exit's
    logits are spread over all classes instead: ``logits * 400`` puts wrong labels 1e3 or more
    below the top, but nowhere near a gap ten times the row's spread, so they are not taken for
    masks (the gap alone, the rule before, refused exactly the logits calibration is for).
    With two classes no spread tells a mask from a large margin: a class 1e3 or more below the
    other counts as masked. The absolute floor of 1e3 keeps a genuine prediction from ever
    counting (its probability ``exp(-1e3)`` is 0 in every dtype); it is 1e3, not 1e4, so that a
    ``-1e4`` mask counts in a row whose largest logit is negative. A row whose largest logit is
    ``+inf`` or NaN-only is judged by ``-inf`` alone (it has no softmax; :func:`check_softmax_rows`
    names it); NaN logits are left out of the sort."""
    z = logits.detach()
    wide = z if z.dtype == torch.float64 else z.float()
    finite = torch.isfinite(wide)
    v = wide.masked_fill(~finite, float("-inf")).sort(-1, descending=True).values  # finite first
    count = finite.sum(-1, keepdim=True)  # [..., 1]
    masked = torch.isneginf(z)
    if z.shape[-1] < 2:
        return masked
    top = v[..., :1]
    position = torch.arange(z.shape[-1] - 1, device=z.device)
    valid = position + 1 < count  # a gap between two finite logits: v[i] above, v[i + 1] below
    lowest = v.gather(-1, (count - 1).clamp(min=0))
    upper, lower = v[..., :-1], v[..., 1:]
    gap = torch.where(valid, upper - lower, torch.zeros_like(upper))  # (-inf - -inf = NaN left out)
    spread = torch.maximum(top - upper, torch.where(valid, lower - lowest, torch.zeros_like(lower)))
    split = valid & (top - lower >= MASK_GAP) & (gap >= MASK_RATIO * spread)
    # the highest such gap: every finite logit at or below the value under it is masked
    below = torch.where(split, lower, torch.full_like(lower, float("-inf"))).amax(-1, keepdim=True)
    row_ok = torch.isfinite(top) & torch.isfinite(below)
    return masked | (row_ok & finite & (wide <= below))


MASKED_LABEL_FIX = ("Drop those samples from the held-out data, or do not mask the true class: mask only "
                    "classes a sample cannot have.")


def check_labels_unmasked(logits: Tensor, labels: Tensor, name: str, labels_name: str, what: str) -> None:
    """Refuse labels ``[N]`` that sit on a class masked (:func:`masked_classes`) in logits ``[K, N, C]``, at any exit,
    where ``what`` scores a log-likelihood: ``-log softmax(z)_y`` is ``+inf`` (or a mask's huge
    finite value) there at every temperature, so a fit has no minimiser (the search runs to its bound) and a reported NLL is
    ``inf``. Names how many labels at which exits, and the first one. Accuracies are not refused
    (such a label is a wrong prediction, a finite value). One read back to the host."""
    on_masked = masked_classes(logits).gather(
        -1, labels.to(logits.device).view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1)  # [K, N]
    counts = on_masked.sum(1).tolist()
    if any(counts):
        samples = on_masked.any(0)
        first = int(samples.nonzero()[0])
        per_exit = "; ".join(f"exit {k + 1}: {n}" for k, n in enumerate(counts) if n)
        count = int(samples.sum())
        raise ValueError(
            f"{count} of the {labels.shape[0]} labels in `{labels_name}` {'sits' if count == 1 else 'sit'} on a "
            f"class {MASKED} in `{name}` ({per_exit}; the first: sample {first}, class {int(labels[first])}). "
            f"(A finite logit counts as masked in a cluster that far below the row's other classes, at least "
            f"{MASK_RATIO:g} times as far as their spread; an over-confident exit's wrong labels do not.) The negative "
            f"log-likelihood of such a label is infinite (or as large as the mask) at every temperature, so {what} "
            f"would fit or report inf "
            f"(nothing was changed). {MASKED_LABEL_FIX}")


def float_leaves(x: Any) -> list[Tensor]:
    """The floating-point tensors in ``x``, at any nesting of pytree containers (tuples, lists, dicts) and of
    any other ``Mapping`` (a Hugging Face ``BatchFeature``, a ``UserDict``), which pytree takes for one leaf
    though a batch passes it to the model as keyword arguments. Python objects only."""
    found: list[Tensor] = []
    for leaf in tree_leaves(dict(x) if isinstance(x, Mapping) and not isinstance(x, dict) else x):
        if isinstance(leaf, Tensor):
            if leaf.is_floating_point():
                found.append(leaf)
        elif isinstance(leaf, Mapping):
            found.extend(float_leaves(leaf))
    return found


def half_precision_eps_hint(optimizer: Any) -> str:
    """The cause of a refused step to name where the optimizer's ``eps`` is 0 in float16, the dtype of
    parameters it steps (below 2**-24, float16's smallest value: Adam's, RMSprop's and Adagrad's
    defaults): their step divides by sqrt(v) + eps, 0/0 where a gradient is 0; ``""`` otherwise.
    Python objects only."""
    for group in getattr(optimizer, "param_groups", []):
        eps = group.get("eps")
        if isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 <= eps < 2.0 ** -24 and any(
                isinstance(p, Tensor) and p.dtype == torch.float16 for p in group.get("params", [])):
            return (f" The optimizer's eps ({eps:g}) is 0 in float16, the dtype of parameters it steps: its step "
                    f"divides by sqrt(v) + eps, 0/0 where a gradient is 0. Pass eps=1e-4 (or more) for float16 "
                    f"parameters, or keep them in float32 and run the forward under torch.autocast.")
    return ""


def masked_label_hint(cross_entropies: Mapping[str, float] | Sequence[float]) -> str:
    """The cause of a refused step to name when one of its cross-entropies (a sequence, or terms by
    name, of which the ``ce[k]`` ones count) is ``+inf``, not NaN: a label on a class masked
    (``-inf``) at that exit, which :func:`check_labels_unmasked` refuses where held-out labels are
    fitted on; ``""`` otherwise. Read from values the step reads anyway: no extra host read."""
    values = [v for n, v in cross_entropies.items() if str(n).startswith("ce[")] \
        if isinstance(cross_entropies, Mapping) else list(cross_entropies)
    if not any(v == math.inf for v in values):
        return ""
    return (" An infinite (not NaN) cross-entropy means a label sits on a class whose logit is -inf at that exit "
            "(a masked class): drop those samples from the batch, or do not mask the true class (mask only "
            "classes a sample cannot have).")


def holds_meta(value: Any) -> bool:
    """Whether a tensor, or any tensor inside nested lists, tuples and dicts, is on the meta device."""
    if isinstance(value, Tensor):
        return value.is_meta
    if isinstance(value, Mapping):
        return any(holds_meta(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_meta(v) for v in value)
    return False


MATERIALIZE_FIX = ("Pass real tensors: materialize the model first (e.g. model.to_empty(device='cpu'), then "
                   "load_state_dict with its weights) and compute them again.")


def check_has_values(value: Any, name: str, what: str) -> None:
    """Refuse ``value`` (a tensor, or tensors nested in lists, tuples and dicts) on the meta device,
    naming the argument (``name``, as it is to be shown: "`logits`", "The target"): ``what`` (e.g. ``"calibrate"``) reads values, which meta tensors do not
    have; torch would fail later with ``Tensor.item() cannot be called on meta tensors``."""
    if holds_meta(value):
        raise ValueError(f"{name} is on the meta device: it has shapes but no values, and {what} reads values. "
                         f"{MATERIALIZE_FIX}")


NAN_FIX = ("Find where the model's outputs turn NaN (a lower learning rate, float32 instead of half precision), "
           "or leave those samples out.")


def check_nan_logits(logits: Tensor, name: str, what: str, scored: Tensor | None = None) -> None:
    """Refuse logits ``[K, N, C]`` holding NaN where ``what`` turns them into a prediction or an
    accuracy, counted per exit: a NaN row has no prediction (its argmax is the first NaN: class 0
    for an all-NaN row), so the value would be silently wrong. With ``scored`` (``[K, N]`` bool:
    the rows a prediction is taken from, e.g. the exit each sample leaves at under early exit),
    only those rows count: a NaN score never passes a threshold, so a NaN row at an exit a
    sample goes on from decides nothing. One read back to the host when all is well. The one
    NaN check of every function that predicts or scores from logits."""
    nan = torch.isnan(logits.detach())
    rows = nan.any(-1)
    if scored is not None:
        scored = scored.to(rows.device)
        rows = rows & scored
        nan = nan & scored[..., None]
    counts = torch.stack([nan.flatten(1).sum(1), rows.flatten(1).sum(1)], 1).tolist()
    refuse_nan_logits(name, what, {k: c for k, c in enumerate(counts) if c[0]}, scored is not None)


def refuse_nan_logits(name: str, what: str, counts: Mapping[int, Sequence[int]], predicted: bool, *,
                      quoted: bool = True) -> None:
    """The ValueError of :func:`check_nan_logits` (and of :class:`EarlyExit`, which counts on the device
    with its own host read): ``counts`` maps a 0-based exit to (NaN values, samples); nothing when
    it is empty. ``quoted``: ``name`` is an argument's name, shown in backquotes."""
    where = " predicted there" if predicted else ""
    bad = [f"exit {k + 1}: {n} NaN values, in {r} sample(s){where}" for k, (n, r) in counts.items() if n]
    if bad:
        raise ValueError(f"{f'`{name}`' if quoted else name} hold NaN logits ({'; '.join(bad)}), and {what} would "
                         f"give a silently wrong value from them (the argmax of a NaN row is not a prediction: class "
                         f"0 for an all-NaN row). {NAN_FIX} (-inf for a masked class is fine.)")


def check_fit_logits(logits: Tensor, name: str, what: str) -> None:
    """Refuse logits ``[K, N, C]`` that ``what`` (a fit: temperatures, thresholds; or a score of
    every exit) cannot use: on the meta device, holding NaN (:func:`check_nan_logits`, counted per
    exit), or a row with no softmax (``+inf``, or every class ``-inf``: :func:`check_softmax_rows`).
    ``-inf`` masking some classes is fine. One read back to the host when all is well."""
    check_has_values(logits, f"`{name}`", what)
    check_nan_logits(logits, name, what)
    check_softmax_rows(logits, name)


def check_device_available(device: torch.device, name: str = "device") -> None:
    """Refuse a device that parses but that this machine cannot hold tensors on: ``cpu:1`` (the CPU
    is one device), an accelerator this torch build or machine lacks, or an index past the last
    one. torch would fail later, from inside the library (``don't know how to restore data
    location ... cpu:1``, ``Torch not compiled with CUDA enabled``)."""
    kind, index = device.type, device.index
    if kind == "meta":
        return
    if kind == "cpu":
        if index not in (None, 0):
            raise ValueError(f"Invalid {name}: '{device}'. The CPU is one device: use 'cpu' (or 'cpu:0').")
        return
    module = getattr(torch, kind, None)
    available = getattr(module, "is_available", None)
    if not callable(available):
        return  # a backend torch does not describe: left to it
    if not available():
        raise ValueError(f"Invalid {name}: '{device}'. No {kind} device is available here (torch.{kind}."
                         f"is_available() is False). Use 'cpu', or a device this machine has.")
    count = getattr(module, "device_count", None)
    if index is not None and callable(count) and index >= count():
        raise ValueError(f"Invalid {name}: '{device}'. This machine has {count()} {kind} device(s), numbered from "
                         f"0: use '{kind}:0' to '{kind}:{count() - 1}'.")


IGNORE_INDEX = -100  # as torch.nn.functional.cross_entropy: labels equal to it are not scored


def check_initialized(module: torch.nn.Module) -> None:
    """Refuse a model holding lazy (uninitialized) parameters or buffers (``nn.LazyLinear``,
    ``nn.LazyBatchNorm1d``): their shapes come with the first forward, after the optimizer was built."""
    from torch.nn.parameter import is_lazy

    lazy = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if is_lazy(t)]
    if lazy:
        raise ValueError(f"The model holds uninitialized (lazy) parameters or buffers: {lazy[:5]}"
                         f"{' ...' if len(lazy) > 5 else ''}. Run one forward pass (model(x) on a batch) before "
                         f"building the optimizer and the weighter, as PyTorch advises for lazy modules.")


def check_ignore_index(ignore_index: object) -> int:
    """The one check of an ``ignore_index`` argument (the losses, the validation objectives,
    :func:`collect_logits`): an int, never a bool (``True == 1`` would silently drop every class-1
    label), a float, ``None`` or a string."""
    value = integer_value(ignore_index)
    if value is None:
        raise TypeError(f"Invalid ignore_index: {ignore_index!r}. Expected an int (labels to leave out), e.g. "
                        f"{IGNORE_INDEX} (the default, as in torch's cross_entropy) or -1.")
    return value


def _numpy_bool(value: object) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")


def check_callbacks(callbacks: object) -> tuple[Callable[..., Any], ...]:
    """A weighter's ``callbacks``: an iterable of callables (a list, a tuple, a generator, ...), checked whole
    before any is registered, as a tuple."""
    if isinstance(callbacks, Mapping):
        raise TypeError(f"`callbacks` should be a list of callables taking a MetaStepRecord, in the order they are "
                        f"called. Found a `{type(callbacks).__name__}`: pass list(callbacks.values()).")
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Iterable):
        raise TypeError(f"`callbacks` should be a list (or another iterable) of callables taking a MetaStepRecord. "
                        f"Found `{type(callbacks).__name__}`.")
    given = tuple(callbacks)
    for i, callback in enumerate(given):
        if not callable(callback):
            raise TypeError(f"`callbacks[{i}]` should be callable with a MetaStepRecord. Found "
                            f"`{type(callback).__name__}`.")
    return given


def check_flag(value: object, name: str) -> bool:
    """A bool option: ``True`` or ``False`` (NumPy's bools too), never a truthy string such as ``"no"``
    or a number standing in for one."""
    if isinstance(value, bool) or _numpy_bool(value):
        return bool(value)
    raise TypeError(f"`{name}` should be a bool (True or False). Found {value!r}.")


def _has_plain_values(value: Tensor) -> bool:
    """Whether a tensor's numbers can be read as they are: not on the meta device (no values) and
    in the plain (strided) layout; a sparse tensor is refused rather than read through torch errors
    (``reshape is not implemented for sparse tensors``)."""
    return not value.is_meta and value.layout == torch.strided


def integer_value(value: object) -> int | None:
    """An integer as an int: a Python int, a NumPy integer scalar (``np.int64(2)``, as NumPy
    arithmetic gives them) or a 0-d integer tensor (``torch.tensor(2)``, not on the meta device);
    ``None`` for anything else (bools, floats, strings, a tensor of several numbers). The one rule
    for every integer option and attribute (``num_exits``, ``k``, ``bins``, ``iterations``, ``seed``)."""
    if isinstance(value, bool) or _numpy_bool(value):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, Tensor):
        if value.dim() != 0 or not _has_plain_values(value) or value.is_floating_point() or value.is_complex() \
                or value.dtype == torch.bool:
            return None
        return int(value.item())
    kind = type(value)
    if kind.__module__ == "numpy" and getattr(value, "ndim", None) == 0 and value.dtype.kind in "iu":  # type: ignore[attr-defined]
        return int(value)  # type: ignore[call-overload]
    return None


def real_numbers(values: object) -> list[float] | None:
    """A list of real numbers as floats: a list, tuple or other sequence, or a dict's
    ``.values()``, of numbers :func:`real_scalar` accepts (Python, NumPy, 0-d tensors), a 1-d
    NumPy array or a 1-d tensor of reals; ``None``
    for anything else (a string, a dict, a bool among them, a meta tensor). The one rule for
    every list of numbers (temperatures, steps, weights, accuracies); what the numbers may be
    (finite, positive) is the caller's check."""
    if isinstance(values, Tensor):
        if values.dim() != 1 or not _has_plain_values(values) or values.dtype == torch.bool or values.is_complex():
            return None
        return [float(v) for v in values.detach().double().cpu().tolist()]
    if type(values).__module__ == "numpy" and type(values).__name__ == "ndarray":
        if values.ndim != 1 or values.dtype.kind not in "iuf":  # type: ignore[attr-defined]
            return None
        return [float(v) for v in values.tolist()]  # type: ignore[attr-defined]
    if not isinstance(values, (Sequence, ValuesView)) or isinstance(values, (str, bytes)):
        return None  # (ordered collections only: a set has no order, a generator can be read once)
    numbers = [real_scalar(v) for v in values]
    return None if any(v is None for v in numbers) else numbers  # type: ignore[return-value]


def real_list(values: object, name: str, what: str, use: str) -> list[float]:
    """:func:`real_numbers`' reading of ``values`` (the one reading of a list of numbers), or a
    ``TypeError`` naming ``name``, what it should be (``what``) and what is not a real number in it:
    the first item that is not (``'a' in [1, 'a']``), or the tensor's dtype and shape, or the type
    of what came. A tensor on the meta device is refused as :func:`check_has_values` refuses it
    (``use`` says what reads its values). What the numbers may be is the caller's check."""
    numbers = real_numbers(values)
    if numbers is not None:
        return numbers
    if isinstance(values, Tensor):
        check_has_values(values, f"`{name}`", use)
        found = f"a {values.dtype} {values.layout} tensor of shape {tuple(values.shape)}"
    elif isinstance(values, (Sequence, ValuesView)) and not isinstance(values, (str, bytes)):
        items = list(values)
        found = next((f"{v!r} in {items!r}" for v in items if real_scalar(v) is None), repr(items))
    elif type(values).__module__ == "numpy" and type(values).__name__ == "ndarray":
        found = f"a NumPy array of {values.dtype} of shape {values.shape}"  # type: ignore[attr-defined]
    else:
        found = f"`{type(values).__name__}`"
    raise TypeError(f"`{name}` should be {what}: a list, a 1-d NumPy array or a 1-d tensor of real numbers. "
                    f"Found {found}.")


def per_term(values: Any, names: Sequence[str], name: str) -> Any:
    """``values`` given one per term, in the order of ``names``: a mapping from term name to value
    (``weighter.gamma_dict()``, as ``SDNSchedule(max_weights=)`` takes) as the list of its values
    in that order, refused with a ``ValueError`` naming the terms it leaves out and the names it
    has that are not terms; anything else as it came (a list, an array, a tensor: the caller
    reads it with :func:`real_numbers`). The one reading of per-term numbers (``init``,
    ``min_losses``)."""
    if not isinstance(values, Mapping):
        return values
    unknown = [k for k in values if k not in names]
    missing = [n for n in names if n not in values]
    if unknown or missing:
        raise ValueError(f"`{name}` should map every term name {list(names)} to a number. "
                         + (f"It names {unknown}, which are not terms. " if unknown else "")
                         + (f"It leaves out {missing}. " if missing else "")
                         + "Give one entry per term (or a list in the order of the terms).")
    return [values[n] for n in names]


def real_scalar(value: object) -> float | None:
    """A real number as a float: a Python int or float, a NumPy scalar or 0-d array, or a 0-d tensor
    of a real dtype; ``None`` for anything else (bools, strings, complex numbers, a meta or sparse
    tensor, an int beyond the float range such as ``10**400``, and a tensor or array with a
    dimension, ``torch.tensor([0.5])`` as ``np.array([0.5])``: one shape rule for both, as
    :func:`integer_value` has)."""
    if isinstance(value, bool) or _numpy_bool(value):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an int past float's range: not a number an option can hold
            return None
    if isinstance(value, Tensor):
        if value.dim() != 0 or not _has_plain_values(value) or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.detach().double().cpu())
    kind = type(value)
    if kind.__module__ == "numpy" and hasattr(value, "dtype") and getattr(value, "ndim", None) == 0 \
            and value.dtype.kind in "iuf":  # np.float32(0.5), np.int64(2)
        return float(value)  # type: ignore[arg-type]
    return None


def lost_in(value: float, dtype: torch.dtype) -> float | None:
    """What ``dtype`` makes of ``value`` when it loses it, else ``None``: a non-zero number stored
    as 0 (underflow) or a finite one stored as inf (overflow). The one rule of :func:`in_dtype`
    and :func:`real_option`; an infinite or NaN ``value`` is the caller's to allow or refuse."""
    stored = float(torch.tensor(value, dtype=torch.float64, device="cpu").to(dtype))
    return stored if (value != 0 and stored == 0) or (math.isfinite(value) and math.isinf(stored)) else None


def dtype_range(dtype: torch.dtype) -> str:
    """What ``dtype`` can hold, for messages: ``float32 holds non-zero magnitudes from 1.4e-45 to 3.4e+38``."""
    info = torch.finfo(dtype)
    kind = str(dtype).replace("torch.", "")
    return f"{kind} holds non-zero magnitudes from {info.tiny * info.eps:.3g} to {info.max:.3g}"


def in_dtype(values: Sequence[float], dtype: torch.dtype, name: str) -> Tensor:
    """``values`` (finite floats, already checked) as a CPU tensor of ``dtype``, the one they are
    stored in; a number that ``dtype`` cannot hold is refused, naming ``name``: a finite one that
    becomes inf (overflow), and a non-zero one that becomes 0 (underflow: a weight of ``1e-50``
    stored as 0 would switch its term off)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device="cpu").to(dtype)
    lost = [(v, t) for v in values if (t := lost_in(v, dtype)) is not None]
    if lost:
        raise ValueError(f"`{name}` holds {', '.join(f'{v!r} (stored as {t!r})' for v, t in lost)}: "
                         f"{dtype_range(dtype)}. Give numbers in that range, or exactly 0.")
    return tensor


_USES = {1: "{}", -1: "1/{}", 2: "{}²"}


def real_option(value: object, name: str, expected: str, accept: Callable[[float], bool] = math.isfinite, *,
                dtype: torch.dtype = torch.float32, powers: Sequence[int] = (1,)) -> float:
    """The one check of a real-number option (``temperature``, ``alpha``, ``lr``, ``max_norm``, ...): its
    value as a float when :func:`real_scalar` reads one (a Python, NumPy or 0-d tensor real) and
    ``accept`` takes it, else ``Invalid {name}: {value!r}. Expected {expected}.`` NaN fails every
    comparison, so a range check in ``accept`` refuses it too.

    Every option is used in ``dtype`` arithmetic (float32: the weights, the losses, the logits),
    as ``value ** p`` for each of ``powers`` (a temperature divides logits, 1/T, and scales the
    distillation term by T², so ``(1, -1, 2)``). A finite value that ``dtype`` turns into 0 or inf
    there (:func:`lost_in`) is refused as well, also where tiny values would be harmless (a
    learning rate of ``1e-50``, 0 in float32, learns nothing): a number that is not the one the
    arithmetic uses is never what was meant, and ``0`` itself stays allowed where it is."""
    number = real_scalar(value)
    if number is None or not accept(number):
        raise ValueError(f"Invalid {name}: {value!r}. Expected {expected}.")
    if math.isfinite(number) and number != 0:
        for p in powers:
            used = float(torch.tensor(number, dtype=torch.float64, device="cpu") ** p)
            stored = lost_in(used, dtype) if math.isfinite(used) and used != 0 else used
            if stored is not None:
                uses = [_USES[q].format(name) for q in powers]
                kind = str(dtype).replace("torch.", "")
                raise ValueError(
                    f"Invalid {name}: {value!r}. Expected {expected}, one that {kind} arithmetic can use: it computes "
                    f"with {', '.join(uses)} in {kind}, where {_USES[p].format(name)} = {used!r} becomes {stored!r} "
                    f"({dtype_range(dtype)}). Give a value for which {', '.join(uses)} "
                    f"{'lie' if len(uses) > 1 else 'lies'} in that range.")
    return number

# The labels of the current weighter step, summarised once at its start (summarize_labels) and
# forgotten at its end (forget_labels): one step checks the same label batch several times (the
# training terms, the look-ahead's forwards, the model's step), and each check would be a read back
# to the host. Outside a step nothing is remembered: a label tensor changed in place without a
# version bump (through ``.data`` or NumPy) is checked afresh.
_LAST_LABELS: list[tuple[Any, ...]] = []


def _label_key(target: Tensor, ignore_index: int | None) -> tuple[Any, ...]:
    # (an inference tensor keeps no version: within one step nothing but the user's own inference-mode code could
    # change it in place)
    version = None if target.is_inference() else target._version
    return (version, ignore_index, target.shape, target.dtype, target.device)


_UNCHECKED: list[bool] = []  # inside unchecked_labels()


@contextlib.contextmanager
def unchecked_labels() -> Iterator[None]:
    """Inside the block the losses take their labels as valid and every one scored (no padding), with no read
    back to the host: for the capturable step (:mod:`metaweight._capturable`), whose warm-up checked them and
    which a CUDA graph replays without Python."""
    _UNCHECKED.append(True)
    try:
        yield
    finally:
        _UNCHECKED.pop()


def _label_summary(target: Tensor, ignore_index: int | None) -> tuple[int, int, int]:
    """The smallest and largest label and the number of labels that are not ``ignore_index``, in one
    read back to the host (none for labels the current weighter step has summarised already, or inside
    :func:`unchecked_labels`, where they are taken as valid and all scored)."""
    if _UNCHECKED:
        return 0, 0, target.numel()
    remembered = _remembered(target, ignore_index)
    if remembered is not None:
        return remembered[0]
    return _summaries([(target, ignore_index)])[0][0]


def _remembered(target: Tensor, ignore_index: int | None) -> tuple[tuple[int, int, int], Any] | None:
    """The summary of ``target`` remembered in this step, and the ranks' (or ``None``): see :func:`summarize_labels`."""
    key = _label_key(target, ignore_index)
    for ref, k, summary, ranks, _ in _LAST_LABELS:
        if ref() is target and k == key:
            return summary, ranks
    return None


def _validation_labels(target: Tensor) -> bool:
    """Whether ``target`` is the validation batch's labels of the weighter step under way (not the training
    batch's too), as :func:`summarize_step_labels` found them: named so where a loss refuses them."""
    roles = {role for ref, _, _, _, role in _LAST_LABELS if ref() is target}
    return roles == {"validation"}


def forget_labels() -> None:
    """End of a weighter step: labels are checked afresh from now on."""
    _LAST_LABELS.clear()


def summarize_labels(labels: Sequence[tuple[Tensor, int | None]], ranks: Any = None,
                     roles: Sequence[str | None] | None = None) -> None:
    """Start of a weighter step: summarise its label tensors (see :func:`_label_summary`) in one read
    back to the host and remember them until :func:`forget_labels`. With ``ranks`` (a
    :class:`~metaweight._hypergradient.Reducer` of more than one rank) the ranks' summaries are
    combined too (one all-reduce), so that a refusal of one rank's labels is every rank's
    (:func:`checked_target`). ``roles``: each tensor's batch (``"training"``, ``"validation"``), which a
    refusal names."""
    forget_labels()
    if labels:
        roles = list(roles) if roles is not None else [None] * len(labels)
        for (target, ignore_index), (summary, combined), role in zip(labels, _summaries(labels, ranks), roles):
            _LAST_LABELS.append((weakref.ref(target), _label_key(target, ignore_index), summary, combined, role))


def _step_labels(batches: Sequence[tuple[Any, Any, str]]) -> tuple[list[tuple[Tensor, int | None]], list[str]]:
    """The integer label tensors of ``(batch, loss, role)`` triples, each with the padding label of its loss, and
    their roles."""
    labels, roles = [], []
    for batch, part, role in batches:
        target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 2 else None
        if isinstance(target, Tensor) and not target.is_floating_point():
            labels.append((target, getattr(part, "ignore_index", IGNORE_INDEX)))
            roles.append(role)
    return labels, roles


def _unreadable(target: Tensor) -> bool:
    """Labels without values to summarise (meta) or that do not reshape (sparse): refused by the losses' own
    checks; summarised as a placeholder that tells the other ranks."""
    return target.is_meta or target.layout != torch.strided


def summarize_step_labels(train_batch: Any, val_batch: Any, criterion: Any, validation: Any, ranks: Any = None
                          ) -> None:
    """Start of a weighter step: its training and validation labels (range, padding), each with the
    padding label of the loss that reads it, in one read back to the host; the losses then find them
    checked (with ``ranks``: the ranks' too, see :func:`summarize_labels`)."""
    labels, roles = _step_labels([(train_batch, criterion, "training"), (val_batch, validation, "validation")])
    summarize_labels(labels, ranks, roles)


def _summaries(labels: Sequence[tuple[Tensor, int | None]], ranks: Any = None
               ) -> list[tuple[tuple[int, int, int], tuple[int, int, int] | None]]:
    """Each label tensor's smallest and largest scored label and number scored, and (with ``ranks``
    of more than one rank) the same over every rank's tensor in that place: smallest, largest, and
    the fewest scored on one rank; one read back to the host."""
    rows = []
    device = next((t.device for t, _ in labels if not _unreadable(t)), torch.device("cpu"))
    for target, ignore_index in labels:
        if _unreadable(target):  # (scored -1: the other ranks refuse too; this rank's own check says why)
            rows.append(torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64, device=device))
            continue
        flat = target.detach().reshape(-1).long()
        scored = flat != ignore_index if ignore_index is not None else torch.ones_like(flat, dtype=torch.bool)
        largest = torch.iinfo(torch.long).max
        low = torch.where(scored, flat, largest).min() if flat.numel() else flat.new_zeros(())
        high = torch.where(scored, flat, -largest).max() if flat.numel() else flat.new_zeros(())
        rows.append(torch.stack([low, high, scored.sum()]).double().to(device))
    n = len(labels)
    if ranks is not None and getattr(ranks, "world", 1) > 1:
        import torch.distributed as dist

        local = torch.stack(rows)  # [n, 3]
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(ranks.group) == "nccl" \
            else local.device
        combined = (local * torch.tensor([-1.0, 1.0, -1.0], dtype=local.dtype, device=local.device)).to(device)
        dist.all_reduce(combined, op=dist.ReduceOp.MAX, group=ranks.group)
        rows.append((combined * torch.tensor([-1.0, 1.0, -1.0], dtype=combined.dtype, device=device)).reshape(-1)
                    .to(local.device))
    values = host_read(rows)
    out = []
    for j in range(n):
        summary = (int(values[3 * j]), int(values[3 * j + 1]), int(values[3 * j + 2]))
        combined_summary = (int(values[3 * (n + j)]), int(values[3 * (n + j) + 1]), int(values[3 * (n + j) + 2])) \
            if len(values) > 3 * n else None
        out.append((summary, combined_summary))
    return out


def all_padding_message(where: str, ignore_index: int) -> str:
    """The refusal of a batch whose every label is padding (``ignore_index``): nothing to score."""
    return (f"Every label given with the {where} is ignore_index={ignore_index} (padding): there is nothing to "
            f"score. Check the padding mask or the labels.")


def unstacked_hint(logits: object) -> str:
    """What to say where stacked logits ``[K, N, C]`` are expected and ``logits`` is a list or tuple of tensors (the
    exits' logits, as a multi-exit model's forward returns them); empty for anything else."""
    if not isinstance(logits, (list, tuple)) or not logits or not all(isinstance(t, Tensor) for t in logits) \
            or len({tuple(t.shape) for t in logits}) != 1 or logits[0].dim() not in (2, 3):
        return ""  # (not one logits tensor per exit: an EarlyExit result, predictions and exits, is no such list)
    tokens = (" They are per token ([N, T, C]): score the tokens as samples, torch.stack(logits).flatten(1, 2), "
              "with the labels flattened alike (labels.flatten()).") if logits[0].dim() == 3 else ""
    return (f" It is a {type(logits).__name__} of {len(logits)} tensors, the exits' logits as a model's forward "
            f"returns them: pass torch.stack(logits) (in exit order), or collect them over a loader with "
            f"collect_logits(model, loader).{tokens}")


def stack_exit_logits(outputs: object, target: object, num_exits: int, where: str = "model output",
                      ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Check outputs and labels, then stack the logits to ``[K, N, C]`` over the scored positions
    (half precision raised to float32); returns them with the labels ``[N]`` as ``torch.long``.

    Logits ``[B, C]`` with labels ``[B]`` score every sample; token-level logits ``[B, T, C]``
    with labels ``[B, T]`` score every token. Positions whose label is ``ignore_index``
    (padding) are left out; a batch with none left is refused.
    """
    outputs = check_exit_outputs(outputs, num_exits, where)
    check_has_values(outputs, f"The {where}", "the loss")
    shape = outputs[0].shape
    if shape[0] == 0 or (len(shape) == 3 and shape[1] == 0):
        raise ValueError(f"The batch of the {where} is empty: the losses are means over the batch and need a sample.")
    target, (_, _, scored) = checked_target(target, shape[0], shape[-1], "target",
                                             tokens=shape[1] if len(shape) == 3 else None, ignore_index=ignore_index)
    logits = torch.stack(outputs)
    target = target.to(logits.device)  # CPU labels for a GPU model: the logits' device decides
    if logits.dim() == 4:
        logits, target = logits.flatten(1, 2), target.flatten()
    if scored < target.numel():
        if scored == 0:
            raise ValueError(all_padding_message(where, ignore_index))
        keep = target != ignore_index
        logits, target = logits[:, keep], target[keep]
    return (logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits), target


def check_target(target: object, batch_size: int, num_classes: int | None, name: str = "target", *,
                 tokens: int | None = None, ignore_index: int | None = None) -> Tensor:
    """Check integer class labels of shape ``[batch_size]`` with values in ``[0, num_classes)``.

    Returns them as ``torch.long``: labels of any integer type (int32 from NumPy, uint8, ...) are
    accepted and cast, as ``cross_entropy`` needs int64; float, bool and complex labels are refused.
    """
    return checked_target(target, batch_size, num_classes, name, tokens=tokens, ignore_index=ignore_index)[0]


def checked_target(target: object, batch_size: int, num_classes: int | None, name: str, *,
                    tokens: int | None, ignore_index: int | None) -> tuple[Tensor, tuple[int, int, int]]:
    """:func:`check_target`, and the labels' summary it read (smallest, largest, number scored)."""
    subject = f"`{name}`" if name.isidentifier() else f"The {name}"  # the argument, named as the caller has it
    if isinstance(target, Tensor) and name == "target" and not _UNCHECKED and _validation_labels(target):
        subject = "The validation target"  # (a validation objective's own argument, in a weighter step)
    if not isinstance(target, Tensor):
        numpy = type(target).__module__ == "numpy"
        raise ValueError(f"{subject} should be a Tensor of class indices. Found `{type(target).__name__}`"
                         f"{': pass torch.as_tensor(target)' if numpy or isinstance(target, (list, tuple)) else ''}.")
    check_has_values(target, subject, "checking the labels' range")
    if target.layout != torch.strided:
        raise ValueError(f"{subject} is a {str(target.layout).replace('torch.', '')} tensor; the losses take a dense "
                         f"tensor of class indices: pass target.to_dense().")
    expected = (batch_size,) if tokens is None else (batch_size, tokens)
    if tuple(target.shape) == (*expected, num_classes) and num_classes is not None:
        raise ValueError(
            f"{subject} has shape {tuple(target.shape)}: one row of {num_classes} per sample, as one-hot or soft "
            f"(probability) targets are. The losses take class indices of shape {expected}: pass "
            f"target.argmax(-1) for one-hot targets; soft targets are not supported.")
    if tuple(target.shape) != expected:
        column = tuple(target.shape) == (*expected, 1)
        raise ValueError(
            f"{subject} should have shape {expected} to match the logits' "
            f"{'batch size' if tokens is None else 'batch and tokens'}. Found shape {tuple(target.shape)}."
            + (" For labels with a trailing dimension of 1, pass target.squeeze(-1)." if column else "")
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"{subject} should hold integer class indices (torch.long). Found {target.dtype}.")
    low, high, scored = _label_summary(target, ignore_index)
    if scored > 0:
        if low < 0 or (num_classes is not None and high >= num_classes):
            what = (f"the logits have {num_classes} classes, so labels must lie in [0, {num_classes - 1}]"
                    if num_classes is not None else "class indices must be >= 0")
            hint = ""
            if low < 0:  # most often padding: say how to leave it out
                hint = (f" If {low} marks padding, pass ignore_index={low} (it is {ignore_index} now)."
                        if ignore_index is not None else
                        f" If {low} marks padding, leave those positions out first (collect_logits(..., "
                        f"ignore_index={low}) does).")
            raise ValueError(f"{subject} has labels in [{low}, {high}], but {what}.{hint}")
    remembered = None if _UNCHECKED else _remembered(target, ignore_index)
    if remembered is not None and remembered[1] is not None:  # under DDP: another rank's refusal is this one's
        _refuse_for_another_rank(subject, remembered[1], scored, num_classes, ignore_index)
    return target.long(), (low, high, scored)


ANOTHER_RANK = ("Every rank refuses this call together, so that none is left waiting for the others in a collective "
                "(DDP's gradient all-reduce, the weighter's): the weighter changed nothing on any rank. Fix that rank's "
                "data (or leave such batches out on every rank).")


def _refuse_for_another_rank(subject: str, ranks: tuple[int, int, int], scored: int, num_classes: int | None,
                             ignore_index: int | None) -> None:
    """The refusal, on a rank whose own labels are fine, of labels another rank refuses in the same place:
    ``ranks`` is the ranks' combined summary (smallest, largest, fewest scored on one rank)."""
    low, high, fewest = ranks
    if fewest < 0:
        raise ValueError(f"{subject}: another rank's labels in this place have no values to check (on the meta "
                         f"device, or sparse). {ANOTHER_RANK}")
    if fewest == 0 and scored > 0:
        raise ValueError(f"{subject}: on another rank every label in this place is ignore_index={ignore_index} "
                         f"(padding): that rank has nothing to score. {ANOTHER_RANK}")
    if fewest > 0 and (low < 0 or (num_classes is not None and high >= num_classes)):
        what = f"[0, {num_classes - 1}]" if num_classes is not None else "class indices >= 0"
        raise ValueError(f"{subject}: another rank's labels in this place lie in [{low}, {high}], outside {what}. "
                         f"{ANOTHER_RANK}")


def unpack_batch(batch: Any, name: str) -> tuple[Any, Tensor]:
    """The inputs and labels of a weighter's batch argument ``name``, which must be a pair of tensors
    (or nestings of them; :func:`refuse_arrays`)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"`{name}` should be a pair (inputs, labels). Found `{type(batch).__name__}`"
                         f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}.")
    refuse_arrays(batch, f"`{name}`")
    return batch[0], batch[1]


def _is_array(value: object) -> bool:
    """Whether ``value`` is a NumPy array (a subclass too: masked, memmap, one's own); a NumPy scalar
    (``np.float32(0.5)``, ``np.str_``) is not: a model may take one as an option. NumPy is never imported
    here: without it imported, no array exists."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray)


def refuse_arrays(batch: Any, subject: str) -> None:
    """Refuse a batch pair (inputs, labels) holding a NumPy array at any depth, before anything runs: the
    library slices, moves and compares batches as tensors, and the model and losses take tensors."""
    for place, part in zip(("inputs", "labels"), batch):
        arrays = [leaf for leaf in tree_leaves(part) if _is_array(leaf)]
        if arrays:
            raise TypeError(f"{subject} holds {'NumPy arrays' if len(arrays) > 1 else 'a NumPy array'} in its {place} "
                            f"(`{type(arrays[0]).__name__}`): pass tensors, e.g. (torch.as_tensor(x), "
                            f"torch.as_tensor(y)), or load the data with a torch DataLoader, which makes tensors of "
                            f"NumPy arrays. Nothing was changed.")


def real_tensor(value: object, name: str, what: str) -> Tensor:
    """A list of real numbers as :func:`real_list` reads every list option (a list, tuple, a dict's
    ``.values()``, a 1-d NumPy array or a 1-d tensor of reals; bools, complex numbers, strings, sets,
    generators, meta and sparse tensors refused with its ``TypeError``, naming ``name``), as a tensor:
    a tensor keeps its dtype and device, an array its dtype, a list is float64 (its numbers exactly).
    The one reading of thresholds and distributions (what length and values they may have is the
    caller's check)."""
    if isinstance(value, Tensor) and value.layout != torch.strided and value.device.type != "meta":
        raise TypeError(f"`{name}` should be {what} in a dense tensor. Found a {value.layout} tensor: pass "
                        f"`.to_dense()`.")
    numbers = real_list(value, name, what, "choosing exits")  # the one reading of a list of numbers
    if isinstance(value, Tensor):
        return value.detach()
    if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
        return torch.as_tensor(value)
    return torch.tensor(numbers, dtype=torch.float64)


def check_thresholds(thresholds: object, num_exits: int) -> Tensor:
    """The one check of exit thresholds (:class:`EarlyExit`, :func:`exit_assignment`,
    :func:`evaluate_thresholds`): ``num_exits`` real numbers (:func:`real_tensor`), none NaN."""
    thresholds = real_tensor(thresholds, "thresholds", f"{num_exits} thresholds, one per exit")
    if thresholds.shape != (num_exits,):
        last = (f" One for each exit but the last? The last exit takes every sample still in, whatever its "
                f"threshold: append any number (e.g. -1.0)." if thresholds.shape == (num_exits - 1,) else "")
        raise ValueError(f"Expected {num_exits} thresholds, one per exit. Found shape {tuple(thresholds.shape)}.{last}")
    if torch.isnan(thresholds).any():
        raise ValueError(f"The thresholds {thresholds.tolist()} hold NaN, which no score reaches or fails to reach: "
                         f"give every exit a number (a score reaches it to leave there; float('inf') for an exit "
                         f"no sample should leave at; the last exit takes every sample left whatever its "
                         f"threshold). Thresholds computed as quantiles of an empty set of scores come out NaN: "
                         f"thresholds_for_budget gives them from held-out logits.")
    return thresholds


def check_temperatures(temperatures: Any, num_exits: int) -> list[float] | None:
    """``temperatures`` (a :class:`Calibration`, or ``num_exits`` positive finite numbers) as floats."""
    if temperatures is None:
        return None
    values = real_numbers(getattr(temperatures, "temperatures", temperatures))  # a Calibration holds them
    if values is None or len(values) != num_exits or not all(math.isfinite(t) and t > 0 for t in values):
        raise ValueError(f"`temperatures` should be a Calibration or {num_exits} positive finite numbers, one per "
                         f"exit (a list, a NumPy array or a tensor). Found {temperatures!r}.")
    for k, t in enumerate(values):  # logits are divided by T in float32 (score_dtype), the rule of every option
        real_option(t, f"temperatures[{k}]", "a positive finite number", powers=(1, -1))
    return values


def check_bins(bins: Any) -> int:
    """The number of equal-width confidence bins: an int >= 1."""
    value = integer_value(bins)
    if value is None or value < 1:
        raise ValueError(f"Invalid bins: {bins!r}. Expected an int >= 1.")
    return value


def checked_counters(state_dict: Mapping[str, Any], who: str) -> tuple[dict[str, int], int | None, bool | None]:
    """A checkpoint's counters (``num_meta_steps``, ``num_calls``, ``num_skipped``: 0 where an older one has
    none), its ``pending_calls`` and its ``meta_step_due`` (whether it was saved between an optimizer step and the
    meta step that scores it; each ``None`` where it has none), refused with a ``ValueError`` where they are no
    ints >= 0 or impossible (more meta steps than calls), or no bool; ``who``: the class whose ``state_dict()`` it
    should be."""
    counts = {k: state_dict.get(k, 0) for k in ("num_meta_steps", "num_calls", "num_skipped")}
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts.values()):
        raise ValueError(f"The checkpoint's counters {counts} should be ints >= 0.")
    if "num_calls" in state_dict and counts["num_meta_steps"] > counts["num_calls"]:
        raise ValueError(f"The checkpoint's counters {counts} are impossible: every meta step kept is a call, so "
                         f"num_meta_steps <= num_calls. Pass a {who}.state_dict() as saved. Nothing was changed.")
    pending = state_dict.get("pending_calls")  # (none in older checkpoints)
    if pending is not None and (isinstance(pending, bool) or not isinstance(pending, int) or pending < 0):
        raise ValueError(f"The checkpoint's `pending_calls` should be an int >= 0 (the loss() calls of the "
                         f"accumulated step it was saved in). Found {pending!r}. Nothing was changed.")
    due = state_dict.get("meta_step_due")  # (none in older checkpoints)
    if due is not None and not isinstance(due, bool):
        raise ValueError(f"The checkpoint's `meta_step_due` should be a bool (whether it was saved between an "
                         f"optimizer step and its meta step). Found {due!r}. Nothing was changed.")
    return counts, pending, due


def one_sample_batchnorm(exc: BaseException, batches: Mapping[str, Any], unchanged: bool = True) -> BaseException:
    """``exc``, or, where it is torch's refusal of a BatchNorm in training mode given one value per channel ("Expected
    more than 1 value per channel when training"), a ``ValueError`` saying that the weighter's look-ahead runs the
    model in training mode on ``batches`` (name: the labels), which of them holds one sample, and what to do."""
    if not isinstance(exc, ValueError) or "Expected more than 1 value per channel when training" not in str(exc):
        return exc
    single = [name for name, target in batches.items()
              if next((t.shape[0] for t in tree_leaves(target) if isinstance(t, Tensor) and t.dim() > 0), None) == 1]
    which = (f"the {' and the '.join(single)} batch{'es hold' if len(single) > 1 else ' holds'} one sample" if single
             else "a BatchNorm layer got one value per channel")
    return ValueError(f"{exc} (torch's BatchNorm): the weighter's look-ahead runs the model in training mode, as the "
                      f"step it looks ahead at does (BatchNorm normalising with the batch's statistics), on the "
                      f"{' and '.join(batches)} batch{'es' if len(batches) > 1 else ''}, and {which}. Pass batches "
                      f"of 2 or more samples (for a held-out loader whose last batch may hold one: "
                      f"DataLoader(..., drop_last=True))."
                      + (" Nothing was changed." if unchanged else ""))
