"""What the weighter needs of the loss terms and of the validation objective: small protocols.

The weighter harmonizes *any* vector of named loss terms against *any* scalar validation
objective. Two adapters say exactly what it asks of the user's objects and what it falls back
to when an optional part is missing; :class:`~metaweight.DenseDistillLoss` and
:class:`~metaweight.BalancedValidation` are one implementation of each.

**Loss terms** — a callable ``criterion(outputs, target) -> Tensor[n]`` (an ``nn.Module`` or a
function; or returning a dict of one scalar loss per term name), where ``outputs`` is whatever the
model returns. Needed: the names of its ``n``
terms, as ``criterion.term_names`` or the weighter's ``term_names`` argument. Optional:

* ``criterion.active``: a bool tensor ``[n]``; inactive terms have weight 0, are never
  learned and read as 0 whatever the criterion returns for them (a NaN there changes
  nothing) (default: all active);
* a keyword argument ``teacher_outputs`` in its ``forward``/``__call__``: model outputs to take
  every detached target from (a teacher's soft labels, a feature target) instead of
  ``outputs``. The ``"finite_difference"`` backend needs it, to hold those targets fixed while
  the parameters move; it cannot see whether a criterion detaches anything, so it refuses a
  criterion without the keyword (one that detaches nothing takes it and ignores it).
  ``"jvp"`` and ``"higher"`` see ``.detach()`` by themselves.

**Validation objective** — a callable ``validation(outputs, target) -> scalar``. Optional, as a
set: ``exit_losses(outputs, target) -> Tensor[m]``, ``objective(losses) -> scalar`` and
``update(losses)``: an objective of per-exit losses with a state that is updated once per
successful meta step with the losses averaged over ranks (:class:`BalancedValidation`'s moving
average). If it is an ``nn.Module`` its ``state_dict`` is saved with the weighter's.
"""

from __future__ import annotations

import ast
import copy
import inspect
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from metaweight._checks import IGNORE_INDEX, integer_value
from metaweight._hooks import is_own_hook
from metaweight._on_outputs import (OnOutputs, has_state, hidden_state, scored_unseen, takes_teacher_outputs,
                                    unwrapped)
from metaweight._validation import BalancedValidation
from metaweight._walk import watched_forward
from metaweight._warn import warn_user


class Terms:
    """The weighter's view of the user's loss terms (see the module docstring)."""

    def __init__(self, criterion: Any, term_names: Sequence[str] | None = None) -> None:
        if not callable(criterion):
            raise TypeError(f"`criterion` should be callable as criterion(outputs, target) -> Tensor of loss terms. "
                            f"Found `{type(criterion).__name__}`.")
        names = term_names if term_names is not None else getattr(criterion, "term_names", None)
        if names is None:
            raise ValueError(f"Name the loss terms: give `{type(criterion).__name__}` a `term_names` attribute or pass "
                             f"term_names=[...] to the weighter, one name per entry of the vector it returns.")
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ValueError(f"`term_names` should be a non-empty list of strings. Found {names!r}.")
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise ValueError(f"Every term name should be a non-empty string. Found {bad!r} in {list(names)}.")
        duplicates = sorted({n for n in names if list(names).count(n) > 1})
        if duplicates:
            raise ValueError(f"Term names should be unique; {duplicates} appear more than once in {list(names)}.")
        self.criterion = criterion
        self.term_names: list[str] = list(names)
        active = getattr(criterion, "active", None)
        if active is None:
            active = torch.ones(len(names), dtype=torch.bool)
        own = getattr(criterion, "term_names", None)
        if term_names is not None and isinstance(own, Sequence) and not isinstance(own, str) and \
                len(own) != len(names):
            raise ValueError(f"`term_names` has {len(names)} names, but `{type(criterion).__name__}` has "
                             f"{len(own)} terms {list(own)}. Pass one name per term, or leave term_names out "
                             f"to use the criterion's.")
        if isinstance(active, Tensor) and active.dim() == 1 and active.numel() != len(names) and \
                term_names is not None:
            raise ValueError(f"`term_names` has {len(names)} names, but `criterion.active` marks {active.numel()} "
                             f"terms. Pass one name per term of the vector the criterion returns.")
        if not isinstance(active, Tensor) or active.dtype != torch.bool or active.shape != (len(names),):
            raise ValueError(f"`criterion.active` should be a bool tensor of shape ({len(names)},), one entry per "
                             f"term. Found {active!r}.")
        self.active = active
        self._all_active = bool(active.all())
        self._masks: dict[torch.device, Tensor] = {}  # ``active`` on each device the terms came on (no copy per call)
        self.fixed_targets = takes_teacher_outputs(criterion)


    @property
    def num_terms(self) -> int:
        return len(self.term_names)

    def _stacked(self, values: Mapping[Any, Any]) -> Tensor:
        """The terms of a criterion returning ``{name: scalar loss}``, in the order of :attr:`term_names`."""
        names = set(self.term_names)
        missing, extra = [n for n in self.term_names if n not in values], [k for k in values if k not in names]
        if missing or extra:
            wrong = ([f"missing {missing}"] if missing else []) + ([f"not terms {extra}"] if extra else [])
            raise ValueError(f"The criterion returned a dict with the keys {list(values)}, where the term names are "
                             f"{self.term_names}: " + "; ".join(wrong) + ". Return one scalar loss per name (a term "
                             "with nothing to score in a batch still needs a value), or pass term_names= the keys it "
                             "returns.")
        bad = [n for n in self.term_names if not isinstance(values[n], Tensor) or values[n].numel() != 1
               or not values[n].is_floating_point()]
        if bad:
            said = [f"{n}: shape {tuple(values[n].shape)} ({values[n].dtype})" if isinstance(values[n], Tensor)
                    else f"{n}: `{type(values[n]).__name__}`" for n in bad]
            raise ValueError(f"The criterion's dict should hold one float scalar tensor per term; {bad} are not: "
                             + ", ".join(said) + ".")
        return torch.stack([values[n].reshape(()) for n in self.term_names])

    def __call__(self, outputs: Any, target: Any, *, teacher_outputs: Any = None) -> Tensor:
        if teacher_outputs is not None:
            values = self.criterion(outputs, target, teacher_outputs=teacher_outputs)
        else:
            values = self.criterion(outputs, target)
        if isinstance(values, Mapping):
            values = self._stacked(values)
        if not isinstance(values, Tensor) or values.shape != (self.num_terms,) or not values.is_floating_point():
            found = f"shape {tuple(values.shape)} ({values.dtype})" if isinstance(values, Tensor) else \
                f"`{type(values).__name__}`"
            hint = (" For a list of the terms, in the order of the names, return torch.stack(terms)."
                    if isinstance(values, (list, tuple)) else "")
            raise ValueError(f"The criterion should return a float tensor of shape ({self.num_terms},), one loss per "
                             f"name in {self.term_names}, or a dict of one scalar loss per name. It returned "
                             f"{found}.{hint}")
        if self._all_active:
            return values
        # an inactive term is 0 whatever the criterion put there: selected, not multiplied by a weight of 0, so a
        # NaN or inf in it (0 * NaN = NaN) cannot reach the weighted loss, its gradient or any update
        return torch.where(self.active_on(values.device), values, values.new_zeros(()))

    def active_on(self, device: torch.device) -> Tensor:
        """:attr:`active` on ``device``, copied there once (a copy between devices at every step is a
        synchronisation on a GPU)."""
        mask = self._masks.get(device)
        if mask is None:
            mask = self._masks[device] = self.active.to(device)
        return mask


class Objective:
    """The weighter's view of the user's validation objective (see the module docstring)."""

    def __init__(self, validation: Any) -> None:
        if not callable(validation):
            raise TypeError(f"`validation` should be callable as validation(outputs, target) -> scalar. Found "
                            f"`{type(validation).__name__}`.")
        hidden = hidden_state(validation)
        if hidden is not None:
            raise ValueError(_hides(validation, hidden[0], f" ({hidden[1]})", verb="uses") + " Nothing was changed.")
        self.validation = validation
        self.per_exit = has_state(validation)
        # a state saved with the weighter's: an nn.Module's, or any object's with state_dict and load_state_dict; of
        # the objective an OnOutputs holds (a plain object's too, which its module state would leave out; helper-183)
        inner = unwrapped(validation)
        self._state = inner if isinstance(inner, nn.Module) or all(
            callable(getattr(inner, a, None)) for a in ("state_dict", "load_state_dict")) else None
        self.unseen = ""  # (what was said of a stateful objective called without its methods, where one was)
        if self.per_exit and self._state is None:
            warn_user(f"The validation objective `{type(inner).__name__}` has a state (update) but no state_dict: "
                      f"the weighter's state_dict and checkpoints do not hold it, and a resumed run starts it again "
                      f"(BalancedValidation's moving average from its next batch). Make it an nn.Module with its "
                      f"state in buffers, give it state_dict and load_state_dict, or use mw.OnOutputs(objective, "
                      f"select) to score part of the model's outputs.")

    def losses(self, outputs: Any, target: Any) -> Tensor:
        """The vector the objective is a function of: per-exit losses, or the scalar itself as ``[1]``."""
        if self.per_exit:
            return self.validation.exit_losses(outputs, target)
        with scored_unseen() as unseen:
            value = self.validation(outputs, target)
        if unseen and not self.unseen:  # (one held where the check at construction does not look)
            self.unseen = _hides(self.validation, unseen[0], verb="called")
            warn_user(self.unseen + " (Said once.)")
        if not isinstance(value, Tensor) or value.numel() != 1 or not value.is_floating_point():
            found = f"shape {tuple(value.shape)} ({value.dtype})" if isinstance(value, Tensor) else \
                f"`{type(value).__name__}`"
            raise ValueError(f"The validation objective should return a float scalar tensor (one number to lower). "
                             f"It returned {found}.")
        return value.reshape(1)

    def objective(self, losses: Tensor) -> Tensor:
        return self.validation.objective(losses) if self.per_exit else losses.sum()

    def update(self, losses: Tensor) -> None:
        """Fold the losses of a meta step the weighter found finite into the objective's average."""
        if self.per_exit:
            fold = getattr(self.validation, "_fold", None)  # BalancedValidation: without the host-side check
            (fold if callable(fold) else self.validation.update)(losses)

    def state_dict(self) -> dict[str, Any]:
        if self._state is not None:
            return {k: v.detach().cpu().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
                    for k, v in self._state.state_dict().items()}
        return {}

    def check_state(self, state: Any) -> None:
        """Refuse a saved state this objective could not load, changing nothing."""
        if not isinstance(state, dict):
            raise ValueError("The checkpoint's `validation` should be the validation objective's state_dict.")
        if self._state is None:
            if state:
                raise ValueError(f"The checkpoint holds a validation state {sorted(state)}, but this validation "
                                 f"objective has none.")
            return
        scratch = copy.deepcopy(self._state)
        try:
            scratch.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"The checkpoint's validation state does not fit: {exc}") from None
        for key, value in scratch.state_dict().items():
            name = key.rsplit(".", 1)[-1]  # (BalancedValidation's own names, inside a module of the user's too)
            if isinstance(value, Tensor) and value.is_floating_point():
                if not torch.isfinite(value).all() or (name == "expected" and (value < 0).any()):
                    raise ValueError(f"The checkpoint's validation state `{name}` {value.tolist()} is not finite "
                                     f"and >= 0.")
            elif name == "num_updates" and isinstance(value, Tensor) and (value < 0).any():  # BalancedValidation's
                raise ValueError(f"The checkpoint's validation state `num_updates` {value.tolist()} is negative: it "
                                 f"counts the updates of the average, which no run makes negative (a negative count "
                                 f"reads as no average yet). Pass the state_dict() as saved. Nothing was changed.")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._state is not None:
            self._state.load_state_dict(state)


def _hides(validation: Any, stateful: Any, how: str = "", *, verb: str) -> str:
    """What is said of a validation objective that calls ``stateful`` (an objective with a state) without having
    its methods itself (``how``: how it holds it, for the refusal at construction, whose ``verb`` is "uses": its
    code names it; "called" where it was seen calling it)."""
    name = getattr(validation, "__qualname__", type(validation).__name__)
    return (f"The validation objective `{name}` {verb} a `{type(stateful).__name__}`{how}, an objective with a state "
            f"(exit_losses, objective and update: BalancedValidation's moving average of Eq. 9), without having those "
            f"methods itself: the weighter could never update that state, which would stay as it is for the whole "
            f"run, nor checkpoint it. To score part of the model's outputs pass mw.OnOutputs(objective, select) "
            f"(select: the key, or a callable picking what it takes from the outputs), which keeps them; otherwise "
            f"pass the objective itself, or give your wrapper the three methods (metaweight._protocols).")


class ModelCall(NamedTuple):
    """The positional and keyword arguments of one call of a model, as a wrapper received them."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def terms_and_objective(criterion: Any, validation: Any, term_names: Sequence[str] | None
                        ) -> tuple[Terms, Any, Objective]:
    """The weighter's view of ``criterion`` (:class:`Terms`) and of ``validation`` (:class:`Objective`), checked
    as a pair: ``validation`` ``None`` is ``BalancedValidation(criterion.num_exits)`` with the criterion's
    ``ignore_index`` (padding is neither refused nor scored); their ``num_exits`` and ``ignore_index``, where both
    have them, must agree. Returns the terms, the validation objective (built or given) and its view.

    Raises:
        ValueError: no validation objective and a criterion without ``num_exits``; ``num_exits`` or
            ``ignore_index`` that differ.
    """
    terms = Terms(criterion, term_names)
    if validation is None:
        num_exits = integer_value(getattr(criterion, "num_exits", None))
        if num_exits is None:
            raise ValueError(f"Pass a validation objective: `{type(criterion).__name__}` has no num_exits to build "
                             f"the default BalancedValidation(num_exits) from.")
        # the criterion's padding label is the objective's too: padding is neither refused nor scored
        ignore_index = getattr(criterion, "ignore_index", IGNORE_INDEX)
        validation = BalancedValidation(num_exits, ignore_index=ignore_index if isinstance(ignore_index, int)
                                        and not isinstance(ignore_index, bool) else IGNORE_INDEX)
        selects, wrapped = [], criterion  # (on the part of the outputs the criterion scores; helper-183)
        while isinstance(wrapped, OnOutputs):
            selects.append(wrapped.select)
            wrapped = wrapped.loss
        for select in reversed(selects):
            validation = OnOutputs(validation, select)
    objective = Objective(validation)
    k_terms = integer_value(getattr(criterion, "num_exits", None))
    k_val = integer_value(getattr(validation, "num_exits", None))
    if k_terms is not None and k_val is not None and k_terms != k_val:
        raise ValueError(
            f"The criterion has num_exits={k_terms} but the validation objective has "
            f"num_exits={k_val}. Build both for the model's number of exits."
        )
    i_terms, i_val = getattr(criterion, "ignore_index", None), getattr(validation, "ignore_index", None)
    if isinstance(i_terms, int) and isinstance(i_val, int) and i_terms != i_val:
        raise ValueError(
            f"The criterion leaves out labels equal to ignore_index={i_terms} (padding), but the validation "
            f"objective leaves out {i_val}: the meta step would score the training padding as a class, or refuse "
            f"it. Build both with one ignore_index, e.g. {type(validation).__name__}({k_val}, "
            f"ignore_index={i_terms}), or leave `validation` out to get it from the criterion."
        )
    return terms, validation, objective


def _wrapper_chain(model: Any) -> list[Any]:
    """``model`` and the models it forwards its inputs to, outermost first: through ``torch.compile``,
    DDP and metaweight's own wrappers (which define ``_inputs_target``)."""
    chain = [model]
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if inner is None:
            follow = getattr(type(model), "_inputs_target", None)
            inner = follow(model) if callable(follow) else None
        if inner is None or inner is model:
            return chain
        model = inner
        chain.append(model)


def _call_target(model: Any) -> Any:
    """The module whose ``forward`` decides how inputs are passed: the innermost of :func:`_wrapper_chain`."""
    return _wrapper_chain(model)[-1]


def _forward_signature(model: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(_call_target(model).forward)
    except (TypeError, ValueError, AttributeError):
        return None


def _only_tensor(annotation: Any) -> bool:
    """Whether a parameter's annotation is ``Tensor`` itself (not a union or a container of it)."""
    if annotation is Tensor:
        return True
    return isinstance(annotation, str) and annotation.replace(" ", "") in ("Tensor", "torch.Tensor")


HOW_INPUTS_ARE_PASSED = ("metaweight passes a batch's inputs as the model is called: a tensor, a tuple or list, or "
                         "a dict is passed as the forward's one positional argument, except a dict whose keys are "
                         "the forward's keyword parameters (all the required ones), which is passed as keyword "
                         "arguments (forward(**inputs)).")


def check_one_input(target: Any, value: Any, who: str, signature: inspect.Signature | None = None) -> None:
    """Refuse, before anything runs, a non-tensor input (a dict, a tuple, a list) handed as the one
    positional argument of ``target``'s ``forward`` when that parameter is annotated ``Tensor``: the
    forward says it cannot take it, and torch would fail deep inside (``linear(): argument 'input'
    must be Tensor, not dict``); and when the forward cannot take one argument at all
    (``forward(x, mask)`` given the tuple ``(x, mask)``). An unannotated parameter is left to the forward."""
    if isinstance(value, Tensor) or not isinstance(value, (Mapping, list, tuple)):
        return
    if signature is None:
        signature = _forward_signature(target)
    if signature is None:
        return
    positional = [p for p in signature.parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                inspect.Parameter.VAR_POSITIONAL)]
    unbound = None
    if not _rewrites_inputs(target):  # (a forward pre-hook may unpack the tuple itself)
        try:  # a forward of two required parameters given a tuple (x, mask): Python would refuse it, less clearly
            signature.bind(value)
        except TypeError as exc:
            unbound = str(exc)
    if unbound is None and (not positional or positional[0].kind is inspect.Parameter.VAR_POSITIONAL or
                            not _only_tensor(positional[0].annotation)):
        return
    first = positional[0].name if positional else "(none)"
    names = [n for n, p in signature.parameters.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                                      inspect.Parameter.KEYWORD_ONLY)]
    params = ", ".join(str(p) for p in signature.parameters.values())
    if isinstance(value, Mapping):
        keys = list(value)
        unknown = [k for k in keys if k not in names]
        found = (f"a dict with keys {keys}" + (f", of which {unknown} are not parameters of the forward" if unknown
                                               else ", which leaves out a required parameter"))
        fix = (f"Name the keys after the forward's parameters {names} to pass them as keywords, or pass the tensor "
               f"itself.")
    else:
        found = f"a {type(value).__name__} of {len(value)}"
        keywords = "{" + ", ".join(f"'{n}': ..." for n in names) + "}"
        fix = (f"Pass the tensor itself, or call {who} with the forward's own arguments ({who}(a, b)), or give a "
               f"dict of its keyword parameters {names}." if who in ("AttachedExits", "EarlyExit") else
               f"Pass the inputs as a dict of the forward's keyword parameters, {keywords} (a batch: "
               f"({keywords}, labels)), or the tensor itself.")
    cannot = "which takes a Tensor there" if unbound is None else f"which cannot take it alone ({unbound})"
    raise TypeError(f"{who} was given {found}, and would pass it as the one positional argument `{first}` of "
                    f"`{type(_call_target(target)).__name__}.forward({params})`, {cannot}. "
                    f"{HOW_INPUTS_ARE_PASSED} {fix}")


def _rewrites_inputs(target: Any) -> bool:
    """Whether a forward pre-hook (the user's, not metaweight's own) may change what ``target``'s
    ``forward`` is called with, on it, on a module wrapping it, or globally."""
    from torch.nn.modules.module import _global_forward_pre_hooks

    def theirs(hooks: Any) -> bool:
        return any(not is_own_hook(h) for h in hooks.values())

    return any(isinstance(m, nn.Module) and theirs(m._forward_pre_hooks) for m in _wrapper_chain(target)) or \
        theirs(_global_forward_pre_hooks)


def _failed_holding(error: BaseException, value: Any) -> bool:
    """Whether the innermost Python frame of ``error``'s traceback (the code that called the torch
    op that raised it: ``nn.Linear.forward``'s ``F.linear(input, ...)``) holds ``value`` itself."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return any(v is value for v in tb.tb_frame.f_locals.values())


def _holds_kind(value: Any, kind: str, depth: int = 4) -> bool:
    """Whether a value inside ``value`` (through nested mappings, lists and tuples, ``depth`` levels)
    is of a type named ``kind``: then torch's "must be Tensor, not dict" may be about that value."""
    if depth == 0:
        return False
    inside = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    return any(type(v).__name__ == kind or _holds_kind(v, kind, depth - 1) for v in inside)


_MAPPING_METHODS = frozenset({"get", "items", "keys", "values"})


def _reads_as_mapping(fn: Any) -> bool:
    """Whether the source of ``fn`` (a forward) uses its first parameter as a mapping: ``batch[...]``,
    ``batch.get/items/keys/values``, ``**batch`` or ``... in batch``. Such a forward takes the mapping
    it is given, so an error that names the mapping's type is the model's own (it passed the whole
    mapping on), not a misread call. ``False`` when the source cannot be read (a built-in, a lambda
    in an interactive session): nothing is known then."""
    try:
        signature = inspect.signature(fn)
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (TypeError, ValueError, OSError, SyntaxError, IndentationError):
        return False
    first = next((n for n, p in signature.parameters.items() if p.kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)), None)
    defs = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if first is None or not defs:
        return False

    def named(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id == first

    for node in ast.walk(defs[0]):  # the forward itself (its source starts with its def)
        if isinstance(node, ast.Subscript) and named(node.value):
            return True
        if isinstance(node, ast.Attribute) and node.attr in _MAPPING_METHODS and named(node.value):
            return True
        if isinstance(node, ast.Call) and any(k.arg is None and named(k.value) for k in node.keywords):
            return True
        if isinstance(node, ast.Dict) and any(k is None and named(v) for k, v in zip(node.keys, node.values)):
            return True  # {**batch}
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) and named(right)
                                                 for op, right in zip(node.ops, node.comparators)):
            return True
    return False


def _mapping_note(model: Any, call: ModelCall, error: BaseException, who: str) -> str | None:
    """What to add to an error of a forward that failed on a mapping handed to it as its one positional
    argument (its keys not the forward's keyword parameters, its first parameter not annotated, so
    :func:`check_one_input` could not refuse it up front), when the mapping itself is what failed:
    an ``AttributeError`` on that very object (``x.shape``), or torch's ``TypeError`` naming the
    mapping's type (``linear(): argument 'input' must be Tensor, not dict``) raised where the code
    that called the op holds that very object. ``None`` for any other error, which is the model's
    own (a forward that takes the dict and fails on a dict inside it, ``batch["meta"].shape``).
    Torch's message names only the type, and the calling frame holds the mapping whenever the
    forward reads a key of it inline (``torch.relu(batch["meta"])``), so where the mapping holds a
    value of the type named (a dict inside a dict) the error may be about that value: no note then.
    Nor for a forward whose source uses its first parameter as a mapping (:func:`_reads_as_mapping`:
    ``batch["x"]``). What is left cannot be told apart from a forward that takes the mapping
    (delegating it, ``self.body(batch)``, or reading it by attribute, ``batch.x``) and whose own code
    misuses it, so the note is worded as a possibility and the error is never replaced."""
    if len(call.args) != 1 or call.kwargs or not isinstance(call.args[0], Mapping) or \
            not isinstance(error, (TypeError, AttributeError)):
        return None
    value = call.args[0]
    kind = type(value).__name__
    if isinstance(error, AttributeError):  # the mapping itself read as a tensor (x.shape): Python names it (3.10+)
        if getattr(error, "obj", None) is not value:
            return None  # (a dict inside it, or anything else: the model's own error)
    elif not any(f in str(error) for f in (f"not {kind}", f"got {kind}", f"({kind}", f" {kind})")) or \
            not _failed_holding(error, value) or _holds_kind(value, kind):
        return None  # (not the mapping, or maybe a value inside it of its type: the model's own error)
    if _reads_as_mapping(getattr(_call_target(model), "forward", None)):
        return None  # (the forward takes the mapping, batch["x"]: what failed is the model's own code)
    signature = _forward_signature(model)
    params = signature.parameters if signature is not None else {}
    names = [n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                        inspect.Parameter.KEYWORD_ONLY)]
    unknown = [k for k in value if k not in names]
    first = next(iter(params), "input")
    return (f"{who}: metaweight passed the {kind} with keys {list(value)} (of which {unknown} are not parameters "
            f"of the forward) as the one positional argument `{first}` of "
            f"`{type(_call_target(model)).__name__}.forward({', '.join(str(p) for p in params.values())})`; if the "
            f"forward does not take a mapping, name the keys after its parameters {names} to pass them as "
            f"keywords, or pass the tensor itself. {HOW_INPUTS_ARE_PASSED}")


def note_mapping_misread(model: Any, call: ModelCall, error: BaseException, who: str) -> None:
    """Add to ``error`` (raised by ``model`` called as ``call``), in place, the note of
    :func:`_mapping_note` where it applies, once (a wrapper inside may have added it already). The
    caller re-raises ``error`` itself: its type and message are the model's or torch's. Python 3.11+
    shows the note under the message (PEP 678); before, it is the error's ``__cause__``, shown above it."""
    note = _mapping_note(model, call, error, who)
    if note is None or any("metaweight passed the" in n for n in getattr(error, "__notes__", ())):
        return
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # pragma: no cover - Python < 3.11
        error.__notes__ = [*getattr(error, "__notes__", ()), note]
        if error.__cause__ is None:
            error.__cause__ = TypeError(note)


def model_arguments(model: nn.Module, inputs: Any, who: str = "metaweight"
                    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """How to call ``model`` with a batch's inputs: ``model(inputs)``, or ``model(**inputs)``.

    A mapping (a dict, a Hugging Face ``BatchEncoding``) whose keys are all keyword
    parameters of the model's ``forward`` (or whose ``forward`` takes ``**kwargs``) is passed as
    keyword arguments, as Hugging Face models expect; anything else, a mapping too, is passed as
    the one positional argument. One case reads both ways: a forward of one parameter ``p``
    given ``{"p": value}``; the annotation of ``p`` decides (``Tensor``: the value as ``p=``;
    ``dict``/``Mapping``: the dict), and without one the call is refused with a ``TypeError``. A :class:`ModelCall` (what a wrapper was called with) is passed
    as it is. A dict, tuple or list passed positionally to a forward whose first parameter is
    annotated ``Tensor`` is refused with a ``TypeError`` (see :func:`check_one_input`); ``who``
    names the caller in it.
    """
    if isinstance(inputs, ModelCall):
        return tuple(inputs.args), dict(inputs.kwargs)
    if isinstance(inputs, Mapping) and inputs and all(isinstance(k, str) for k in inputs):
        signature = _forward_signature(model)
        params = signature.parameters if signature is not None else {}
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        named = {n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                             inspect.Parameter.KEYWORD_ONLY)}
        required = {n for n in named if params[n].default is inspect.Parameter.empty}
        if required <= set(inputs) and (set(inputs) <= named or var_kw):
            if len(params) == 1 and set(inputs) == set(params):  # forward(batch) given {"batch": ...}
                return _one_key_dict(model, inputs, params[next(iter(inputs))])
            return (), dict(inputs)
    check_one_input(model, inputs, who)
    return (inputs,), {}


def _annotation_kind(annotation: Any) -> str | None:
    """``"mapping"`` or ``"tensor"`` where a parameter's annotation says which, else ``None``."""
    if annotation is inspect.Parameter.empty:
        return None
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__qualname__", None) or repr(annotation)
    for prefix in ("typing.", "collections.abc.", "torch.", "transformers."):
        text = text.replace(prefix, "")
    if text.startswith(("dict", "Dict", "Mapping", "MutableMapping", "OrderedDict", "BatchEncoding")):
        return "mapping"
    return "tensor" if "Tensor" in text else None


def _one_key_dict(model: Any, inputs: Mapping[str, Any], param: inspect.Parameter) -> tuple[tuple[Any, ...],
                                                                                         dict[str, Any]]:
    """A dict whose one key is the one parameter of the forward: the dict itself (a forward that
    reads ``batch["batch"]``) or its value as that keyword (``{"x": tensor}`` for ``forward(x)``)?
    The parameter's annotation decides; without one the call is refused, naming both readings."""
    kind = _annotation_kind(param.annotation)
    if kind == "mapping":
        return (inputs,), {}
    if kind == "tensor":
        return (), dict(inputs)
    name = type(_call_target(model)).__name__
    raise TypeError(f"`{name}.forward({param.name})` was given the dict {{'{param.name}': ...}}, whose one key is the "
                    f"name of its one parameter: it could mean forward({param.name}=<the value>) or forward(<the "
                    f"dict>). Say which with the parameter's annotation: `{param.name}: Tensor` (the value) or "
                    f"`{param.name}: dict` (the dict); or pass the value itself rather than a dict, or use another key.")


def call_model(model: nn.Module, inputs: Any, who: str = "metaweight") -> Any:
    """``model`` called with a batch's inputs, positionally or as keyword arguments (see
    :func:`model_arguments`; ``who`` names the caller in its errors)."""
    args, kwargs = model_arguments(model, inputs, who)
    try:
        with watched_forward():  # (the model may be a wrapper of the module a step walked: every walk)
            return model(*args, **kwargs)
    except (TypeError, AttributeError) as exc:
        note_mapping_misread(model, ModelCall(args, kwargs), exc, who)
        raise


def wrapper_call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], wrapper: str) -> ModelCall:
    """How a wrapper called as ``wrapper(*args, **kwargs)`` calls the ``model`` it wraps.

    Every wrapper (:class:`AttachedExits`, :class:`EarlyExit`) takes what the model takes: one
    positional argument is a batch's inputs, passed as :func:`model_arguments` decides (a dict of
    the model's keyword parameters as keywords, as the weighter and ``collect_logits`` pass it);
    any other call (``wrapper(x=t)``, ``wrapper(a, b)``) goes to the model as it is. A call the
    model's ``forward`` cannot bind is refused here with a ``TypeError``, before the model runs.
    """
    if len(args) == 1 and not kwargs:
        args, kwargs = model_arguments(model, args[0], wrapper)
        if len(args) == 1 and not kwargs:  # the common case, a tensor: nothing to bind (no cost at batch 1)
            return ModelCall(args, kwargs)
    signature = _forward_signature(model)
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            given = [type(a).__name__ for a in args] + [f"{k}=" for k in kwargs]
            params = ", ".join(str(p.replace(annotation=inspect.Parameter.empty))
                               for p in signature.parameters.values())
            raise TypeError(f"{wrapper} passes its inputs to `{type(_call_target(model)).__name__}.forward"
                            f"({params})`, which cannot take ({', '.join(given)}): {exc}. Call {wrapper} as you "
                            f"call the model: with the inputs as one argument (a tensor, a tuple, or a dict of "
                            f"the forward's keyword arguments), or with the forward's own arguments.") from None
    return ModelCall(tuple(args), dict(kwargs))


def first_stage_call(model: nn.Module, call: ModelCall, stage: nn.Module | None = None) -> ModelCall:
    """How stage 1 of a model with ``exit_stages()`` is called for a call of the model.

    A call that binds to one argument of the model's ``forward`` (``MultiExit.forward(x)``, given
    ``x`` positionally or as ``x=``, or a dict ``{"x": ...}``) hands that argument to stage 1;
    any other call hands stage 1 the model's own arguments, refused with a ``TypeError`` when
    ``stage`` (stage 1) cannot take them.
    """
    if len(call.args) == 1 and not call.kwargs:  # one positional argument is stage 1's already
        if stage is not None:
            check_one_input(stage, call.args[0], "EarlyExit (stage 1)")
        return call
    signature = _forward_signature(model)
    if signature is not None:
        try:
            bound = signature.bind(*call.args, **call.kwargs)
        except TypeError:
            bound = None
        if bound is not None and len(bound.arguments) == 1:
            (name, value), = bound.arguments.items()
            if signature.parameters[name].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                       inspect.Parameter.VAR_KEYWORD):
                if stage is not None:
                    check_one_input(stage, value, "EarlyExit (stage 1)")
                return ModelCall((value,), {})
    if stage is not None:  # stage 1 gets the model's arguments: refuse here what it cannot take
        try:
            stage_signature = inspect.signature(stage.forward)
        except (TypeError, ValueError, AttributeError):
            return call
        try:
            stage_signature.bind(*call.args, **call.kwargs)
        except TypeError as exc:
            given = [type(a).__name__ for a in call.args] + [f"{k}=" for k in call.kwargs]
            params = ", ".join(str(p.replace(annotation=inspect.Parameter.empty))
                               for p in stage_signature.parameters.values())
            raise TypeError(f"EarlyExit hands stage 1 of `{type(_call_target(model)).__name__}` "
                            f"(`{type(stage).__name__}.forward({params})`) the model's inputs ({', '.join(given)}), "
                            f"which it cannot take ({exc}): the model's own forward uses them in a way early exit "
                            f"cannot see. Make stage 1 a module that takes the model's arguments (the first of "
                            f"exit_stages()' stages), or call with the one input stage 1 takes.") from None
    return call
