"""Real early exit at inference: stop computing a sample at its first confident exit."""

from __future__ import annotations

import collections
import copy
import enum
import functools
import sys
import types
from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy
from torch.nn.utils.rnn import PackedSequence

from metaweight._anytime import same_mapping
from metaweight._budget import warn_unreachable
from metaweight._checks import (UNDEFINED_SOFTMAX_FIX, check_exit_outputs, check_temperatures, check_thresholds,
                               holds_meta, refuse_nan_logits, softmax_undefined)
from metaweight._exit_rules import (RULES, Entropy, ExitRule, Margin, MaxProbability, as_rule, calibrated,
                                   decision_dtype, predict, reaches, score_dtype)
from metaweight._graphs import StageGraphs
from metaweight._multiexit import check_exit_classes, check_head_classes, head_logits
from metaweight._protocols import ModelCall, first_stage_call, wrapper_call
from metaweight._randomness import model_generators, rng_state, set_rng_state
from metaweight._warn import warn_user


class EarlyExitResult(NamedTuple):
    """What an :class:`EarlyExit` call returns: a named tuple, so ``predictions, exits = predictor(x)``
    unpacks it as the plain tuple it was before.

    Attributes:
        predictions: the class predicted for each sample, ``[N]`` (``torch.long``), at the exit it left at.
        exits: the exit each sample left at, 0-based, ``[N]`` (``torch.long``).
    """

    predictions: Tensor
    exits: Tensor


def exit_parts(model: nn.Module) -> tuple[Sequence[nn.Module], Sequence[nn.Module]]:
    """The model's stages and exit heads, by metaweight's multi-exit protocol.

    A model takes part by defining ``exit_stages()`` returning ``(stages, heads)``: stage ``k``
    maps stage ``k-1``'s output to features, head ``k`` maps them to exit ``k``'s logits. Stage 1
    takes the model's inputs: the one argument of a call that binds to one parameter of the
    model's ``forward`` (``MultiExit.forward(x)``'s ``x``, given as ``x``, ``x=...`` or
    ``{"x": ...}``), or else the arguments the model is called with. :class:`MultiExit` does, and
    so can any model: nothing here knows the attribute names of a particular architecture.
    """
    parts = getattr(model, "exit_stages", None)
    if not callable(parts):
        raise TypeError(
            f"`{type(model).__name__}` does not expose its stages and heads. Early exit needs "
            f"`exit_stages()` returning (stages, heads), stage k feeding stage k+1 and head k; build the model "
            f"with metaweight.MultiExit, or define exit_stages() on it. A module that holds the multi-exit model (a "
            f"LightningModule, a wrapper of your own): pass the model it holds."
        )
    stages, heads = parts()
    stages, heads = list(stages), list(heads)
    if not stages or len(stages) != len(heads) or not all(isinstance(m, nn.Module) for m in stages + heads):
        raise TypeError(f"`{type(model).__name__}.exit_stages()` should return two equally long, non-empty lists "
                        f"of modules. Found {len(stages)} stages and {len(heads)} heads.")
    return stages, heads


def refuse_meta(model: nn.Module, inputs: Any, what: str) -> None:
    """Refuse, before anything runs, a model or inputs on the meta device: early exit decides from
    the values of the scores, which meta tensors do not have."""
    on_meta = [f"the parameters of `{type(model).__name__}`"] if any(
        t.is_meta for t in [*model.parameters(), *model.buffers()]) else []
    if inputs is not None and holds_meta(inputs):
        on_meta.append("the inputs")
    if on_meta:
        raise ValueError(f"{what} needs values, and {' and '.join(on_meta)} are on the meta device (shapes "
                         f"only). Load the weights (e.g. model.to_empty(device='cpu') and load_state_dict) and "
                         f"pass real inputs; exit_costs(..., executed=False) counts the costs on meta tensors.")


def _per_sample(logits: Tensor) -> Tensor:
    if logits.dim() != 2:
        raise ValueError(f"EarlyExit decides per sample and needs exit logits [batch, classes]; found shape "
                         f"{tuple(logits.shape)}. Token-level exits are evaluated per token with collect_logits, "
                         f"anytime_accuracy_from_logits and budgeted_curve.")
    return logits


def _tensors(value: Any) -> list[Tensor]:
    """The tensors of an input: itself, or those inside nested lists, tuples and dicts, in order."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            found.append(item)
        elif isinstance(item, Mapping):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    return found


def _shapes(tensors: Sequence[Tensor], limit: int = 6) -> str:
    shown = ", ".join(str(tuple(t.shape)) for t in tensors[:limit])
    return shown + (f" and {len(tensors) - limit} more" if len(tensors) > limit else "")


_BATCH_FIRST_FIX = ("Put the batch first: for sequence-first layers ([T, B, H], nn.TransformerEncoderLayer's default) "
                    "build them with batch_first=True, or give the model a first stage that transposes [B, T, H] "
                    "inputs.")


def _check_inputs_batch(logits: Tensor, inputs: Sequence[Tensor]) -> None:
    """Refuse inputs none of whose tensors has the samples in its first dimension. Exit 1's logits
    say how many samples there are (stage 1 and head 1 see every one); a sequence-first input
    ``[T, B, H]`` shows here as no input with ``B`` rows (``T == B`` is seen once samples leave)."""
    n = logits.shape[0]
    if not any(t.dim() > 0 and t.shape[0] == n for t in inputs):
        raise ValueError(f"EarlyExit takes the batch as the first dimension of the inputs, but exit 1 gave logits "
                         f"of shape {tuple(logits.shape)} for {n} samples and no tensor of the inputs has {n} as its "
                         f"first dimension (found {_shapes(inputs)}). {_BATCH_FIRST_FIX}")


def _refuse_unselected(k: int, logits: Tensor, expected: int, passed: Sequence[tuple[str, Tensor]]) -> None:
    """Exit ``k`` gave logits for other samples than those still in: its stage was given features in
    which the samples were not (or wrongly) selected."""
    kept = "; ".join(f"{path} {tuple(t.shape)}" for path, t in passed[:6]) or "nothing"
    raise ValueError(f"Exit {k + 1} gave logits of shape {tuple(logits.shape)}, but {expected} samples are still "
                     f"in the network: the features stage {k + 1} was given did not hold exactly those samples. "
                     f"EarlyExit takes the batch as the first dimension of the inputs and of every per-sample tensor "
                     f"of the features: between stages it keeps the samples still in from each tensor (in tuples, "
                     f"lists and dicts) whose first dimension is the number of samples in the network, and passes "
                     f"every other value on unchanged (passed on unchanged at the last selection: {kept}). "
                     f"{_BATCH_FIRST_FIX}")


def _uses_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` normalises with the statistics of the batch it is given in eval mode: a
    BatchNorm without running statistics (torch's own test, ``_BatchNorm.forward``)."""
    return isinstance(module, _BatchNorm) and module.running_mean is None and module.running_var is None


def refuse_batch_statistics(model: nn.Module, stages: Sequence[nn.Module], heads: Sequence[nn.Module]) -> None:
    """Refuse a model whose stages 2..K or heads 2..K hold a module that computes batch statistics
    in eval mode: EarlyExit runs them on the samples still in the network, where such a module
    computes other values than on the whole batch, so the predictions would differ from the full
    forward's without a sign."""
    later = {id(m): m for part in [*stages[1:], *heads[1:]] for m in part.modules()}
    found = [m for m in later.values() if _uses_batch_statistics(m)]
    if not found:
        return
    names = {id(m): name for name, m in model.named_modules()}
    listed = ", ".join(f"`{names.get(id(m), '(not a registered submodule)')}` ({type(m).__name__}, track_running_stats="
                       f"{m.track_running_stats})" for m in found)
    raise ValueError(f"`{type(model).__name__}` holds {listed} in a stage or head after the first, which "
                     f"normalise(s) with the statistics of the batch it is given, in eval mode too (a BatchNorm "
                     f"without running statistics). EarlyExit runs those stages and heads on the samples still in the "
                     f"network only, where such a layer computes other values than on the whole batch, so its "
                     f"predictions would differ from the model's (exit_assignment on a full forward). Build the "
                     f"layer with track_running_stats=True and learn its running statistics (a pass over training "
                     f"data in train mode; EarlyExit then runs it in eval mode, as model.eval() does), or use a "
                     f"per-sample normalisation (nn.GroupNorm, nn.LayerNorm); exits attached with attach_exits run "
                     f"the whole batch through the forward (saving less).")


def _refuse_undefined(k: int, count: int) -> None:
    raise ValueError(f"Exit {k + 1} gave {count} sample(s) logits that are all -inf (every class masked) or hold "
                     f"+inf: such a row has no softmax, so no confidence and no prediction; EarlyExit refuses "
                     f"rather than guess. {UNDEFINED_SOFTMAX_FIX}")


# the built-in rules whose scores give NaN for every row that holds NaN or has no softmax, with the very functions
# that do (taken at import: a scores replaced later, on the class or on an instance, is not trusted)
_NAN_SCORES = {MaxProbability: MaxProbability.scores, Entropy: Entropy.scores, Margin: Margin.scores}


def _undefined_scores_nan(rule: ExitRule, logits: Tensor) -> bool:
    """Whether ``rule`` scores NaN (which never leaves) every row of ``logits`` ``[N, C]`` that holds
    NaN or has no softmax (all ``-inf``, or a ``+inf``: the softmax is 0/0 or inf/inf there):
    :class:`MaxProbability` and :class:`Entropy` do; :class:`Margin` with two classes or more (with
    one it scores 1 whatever the row). Early exit then learns both from the score it reads anyway;
    for other rules (patience counts agreeing argmaxes, a NaN row's too; a subclass) it counts them
    apart, as it does for one of these whose ``scores`` is no longer the built-in function (replaced on
    the instance, ``rule.scores = ...``, or on the class: its type is still the built-in one, its scores
    need not be NaN there)."""
    kind = type(rule)
    built_in = _NAN_SCORES.get(kind)
    if built_in is None or getattr(rule.scores, "__func__", None) is not built_in:
        return False
    return kind is not Margin or logits.shape[-1] > 1


def _check_last(model: nn.Module, k: int, raw: Tensor, logits: Tensor) -> None:
    """Refuse, at the last exit (which predicts every sample still in), a row of NaN logits (its argmax
    is no prediction) or one with no softmax. One host read: a row's largest logit is finite unless
    the row holds NaN (``amax`` propagates it) or has no softmax (``-inf`` or ``+inf``), and
    ``top - top`` sums to 0 exactly when every one is finite; only otherwise (rare) are the counts
    the messages give read, a second time."""
    top = logits.amax(-1)
    if top.sub(top).sum().tolist() == 0:
        return
    nan = torch.isnan(raw)
    undefined, *nan_counts = torch.stack([softmax_undefined(logits).sum(), nan.sum(), nan.any(-1).sum()]).tolist()
    _refuse_nan(model, k, nan_counts)
    if undefined:
        _refuse_undefined(k, undefined)


def _refuse_nan(model: nn.Module, k: int, counts: Sequence[int]) -> None:
    """Refuse exit ``k``'s logits when ``counts`` (NaN values, samples) of the samples it predicts
    hold NaN: the argmax of a NaN row (class 0) would be returned as a prediction. A NaN score
    never leaves an exit (MaxProbability and Entropy give one, Margin with two classes or more), so
    such a sample reaches the last exit, which takes everyone; a rule that scores a NaN row (Margin
    with one class scores 1) is caught where the sample leaves."""
    refuse_nan_logits(f"The exit logits of `{type(model).__name__}`", "EarlyExit (the last exit predicts every "
                      "sample still in)", {k: counts}, True, quoted=False)


def _batch_inputs(x: Any) -> list[Tensor]:
    """The tensors of a call's inputs; refuse a call with no tensor, or with none that has a first
    dimension (a batch), before anything runs."""
    tensors = _tensors(x)
    if not tensors:
        given = ([type(a).__name__ for a in x.args] + [f"{k}={type(v).__name__}" for k, v in x.kwargs.items()]
                 if isinstance(x, ModelCall) else [type(x).__name__])
        raise TypeError(f"EarlyExit needs a batch holding at least one tensor (its first dimension is the batch). "
                        f"Found the inputs ({', '.join(given)}), with no tensor in them. Pass torch tensors "
                        f"(e.g. torch.as_tensor(x) for a NumPy array), as the model takes them.")
    if all(t.dim() == 0 for t in tensors):
        raise ValueError(f"EarlyExit takes the batch as the first dimension of a tensor of the inputs, and the "
                         f"inputs hold only 0-d tensors ({len(tensors)}). Pass the samples as a tensor [batch, ...].")
    return tensors


class _Selection:
    """Keeps the samples still in the network from the features a stage hands to the next.

    Per sample: a tensor whose first dimension is the number of samples in the network before the
    selection, at any depth of tuples, lists (namedtuples too) and dicts (a dict subclass, such as
    Hugging Face's ``ModelOutput``, keeps its type and attribute access). Passed on unchanged:
    every other value (``None``, numbers, 0-d tensors, a broadcast ``[1, T]`` mask, a table of
    another first dimension), and, whatever their first dimension, a parameter of the model
    (an ``nn.Parameter`` itself), an input tensor whose first dimension is not the batch, and any
    tensor already passed on unchanged at an earlier exit of this call (a table carried through the
    stages; in an object too, where :func:`_refuse_hidden` adds every tensor it lets through).
    Another tensor that is not per sample (a buffer, a table a stage computes) whose first
    dimension happens to equal the number of samples in the network cannot be told apart: it is
    selected (refused in an object, which cannot be selected in)."""

    def __init__(self, inputs: Sequence[Tensor], n: int) -> None:
        # held (not only their ids) for the whole call, so no id is reused by another tensor
        self.fixed: dict[int, Tensor] = {id(t): t for t in inputs if t.dim() == 0 or t.shape[0] != n}
        self.passed: list[tuple[str, Tensor]] = []  # what the last selection passed on unchanged
        self.made: dict[int, Tensor] = {}  # what the last selection made (the samples kept of a per-sample tensor)

    def __call__(self, features: Any, keep: Tensor, before: int, stage: int) -> Any:
        self.passed, self.made = [], {}
        return self._take(features, keep, before, "features", stage)

    def _take(self, value: Any, keep: Tensor, before: int, path: str, stage: int) -> Any:
        if isinstance(value, Tensor):
            if value.dim() > 0 and value.shape[0] == before and not isinstance(value, nn.Parameter) and \
                    self.fixed.get(id(value)) is not value:
                kept = value[keep]
                self.made[id(kept)] = kept  # (held: no id is reused meanwhile)
                return kept
            self.fixed[id(value)] = value
            self.passed.append((path, value))
            return value
        if isinstance(value, PackedSequence):
            raise TypeError(f"Stage {stage} returned a PackedSequence ({path}), whose samples EarlyExit cannot select "
                            f"(they are interleaved by time step). Return padded tensors [batch, T, ...] between "
                            f"stages (torch.nn.utils.rnn.pad_packed_sequence with batch_first=True).")
        if isinstance(value, Mapping):  # in its own type: the next stage may read it by attribute (ModelOutput)
            rebuilt = same_mapping(value, {k: self._take(v, keep, before, f"{path}[{k!r}]", stage)
                                           for k, v in value.items()})
            # attributes its items did not update
            _refuse_hidden(rebuilt, before, path, stage, self.fixed, self.made, items=False)
            return rebuilt
        if isinstance(value, (list, tuple)):
            items = [self._take(v, keep, before, f"{path}[{i}]", stage) for i, v in enumerate(value)]
            if type(value) in (list, tuple):
                return type(value)(items)
            rebuilt = type(value)(*items) if hasattr(value, "_fields") else _same_list(value, items)
            _refuse_hidden(rebuilt, before, path, stage, self.fixed, self.made, items=False)  # (a subclass's)
            return rebuilt
        _refuse_hidden(value, before, path, stage, self.fixed, self.made)
        return value


# values that hold no tensor: not looked into, and not counted (a function's or class's attributes are not what a
# stage passes on)
_ATOMS = (type(None), bool, int, float, complex, str, bytes, bytearray, memoryview, range, slice, torch.dtype,
          torch.device, torch.layout, torch.memory_format, torch.Size, enum.Enum, type, types.FunctionType,
          types.BuiltinFunctionType, types.MethodType, types.ModuleType, nn.Module)
# the exact types of the commonest of them, told by one set lookup (a vocabulary of 50,257 strings and numbers);
# an instance of a subclass (an enum's member, a module) is told by isinstance, once per type in a walk
_ATOM_TYPES = frozenset(t for t in _ATOMS if t not in (enum.Enum, nn.Module))
# collections looked into item by item without asking the abstract classes
_PLAIN_COLLECTIONS = frozenset((list, tuple, set, frozenset, collections.deque))
# how many values that could hold a tensor (objects, containers, tensors; not atoms) _refuse_hidden looks at in one
# object before refusing it as too large to check
HIDDEN_WALK_LIMIT = 100_000
# how _refuse_hidden names each step of where a value is (formatted only for a refusal)
_ATTRIBUTE, _ITEM, _KEY, _INDEX = ".{}", "[{!r}]", "[{!r}] (its key)", "[{}]"


_NONE, _PLAIN, _DICT, _MAPPING, _COLLECTION = range(5)  # how a type's instances hold items


class _Layout(NamedTuple):
    atom: bool  # holds no tensor (an instance of _ATOMS: an enum's member, a module too)
    items: int  # how it holds items: _NONE, _PLAIN (a list, tuple, set, deque), _DICT, _MAPPING, _COLLECTION
    has_dict: bool  # its instances may have a __dict__
    slots: tuple[str, ...]  # the names of every __slots__ of its classes (a dataclass with slots=True, a base's)


def _layout(kind: type) -> _Layout:
    """What :func:`_refuse_hidden` needs to know of a type, asked once per type (a walk meets few
    types, many times; a type that cannot be hashed, by its metaclass, is asked each time)."""
    try:
        return _cached_layout(kind)
    except TypeError:
        return _cached_layout.__wrapped__(kind)


@functools.lru_cache(maxsize=1024)
def _cached_layout(kind: type) -> _Layout:
    try:  # (an abstract class whose subclass check fails: its items are not looked into, as an iteration that fails)
        atom = issubclass(kind, _ATOMS)
        items = (_PLAIN if kind in _PLAIN_COLLECTIONS else _DICT if issubclass(kind, dict) else
                 _MAPPING if issubclass(kind, Mapping) else _COLLECTION if issubclass(kind, Collection) else _NONE)
    except Exception:
        atom, items = False, _NONE
    has_dict = kind.__dictoffset__ != 0 or any("__dict__" in k.__dict__ for k in kind.__mro__)
    slots: list[str] = []
    for k in kind.__mro__:
        names = k.__dict__.get("__slots__", ())
        slots += [n for n in ((names,) if isinstance(names, str) else names) if n not in ("__dict__", "__weakref__")]
    return _Layout(atom, items, has_dict, tuple(slots))


def _inside(value: Any, layout: _Layout, items: bool) -> list[tuple[tuple[str, Any], Any]]:
    """The values ``value`` (of that layout) holds that are not of an atom's exact type, each with
    where it is (a format and its key): a mapping's keys and values, a collection's items (a set, a
    deque; with ``items``), and the object's attributes, in its ``__dict__`` and in every
    ``__slots__`` of its classes. A dict whose values are all atoms (a vocabulary) gives its keys
    only, making no pair."""
    found: list[tuple[tuple[str, Any], Any]] = []
    kind = layout.items if items else _NONE
    if kind:
        try:  # (a collection whose iteration fails holds nothing EarlyExit could look at)
            if kind == _PLAIN or kind == _COLLECTION and not _flat_array(value):
                found = [((_INDEX, i), v) for i, v in enumerate(list(value)) if type(v) not in _ATOM_TYPES]
            elif kind == _DICT and not [v for v in value.values() if type(v) not in _ATOM_TYPES]:
                found = [((_KEY, k), k) for k in list(value) if type(k) not in _ATOM_TYPES]
            elif kind != _COLLECTION:
                pairs = list(value.items())
                found = [((_KEY, k), k) for k, _ in pairs if type(k) not in _ATOM_TYPES]
                found += [((_ITEM, k), v) for k, v in pairs if type(v) not in _ATOM_TYPES]
        except Exception:
            found = []
    if layout.has_dict:
        try:  # (read as object does: a class's __getattr__ is not called)
            inner = object.__getattribute__(value, "__dict__")
        except (AttributeError, TypeError):
            inner = None
        if isinstance(inner, dict):
            for k, v in list(inner.items()):
                if type(v) not in _ATOM_TYPES:
                    found.append(((_ATTRIBUTE, k), v))
    for name in layout.slots:
        try:
            v = object.__getattribute__(value, name)
        except AttributeError:  # a slot never set
            continue
        if type(v) not in _ATOM_TYPES:
            found.append(((_ATTRIBUTE, name), v))
    return found


def _flat_array(value: Any) -> bool:
    """A NumPy array of numbers (no object in it to look into, maybe millions of items)."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray) and value.dtype != object


def _same_list(original: Any, items: list[Any]) -> Any:
    """``items`` in the type of ``original`` (a list or tuple subclass): a list subclass by a copy whose
    items are set, so its attributes go on (and are looked at, as a ``ModelOutput``'s are), else by its
    constructor."""
    if isinstance(original, list):
        try:
            rebuilt = copy.copy(original)
            rebuilt[:] = items
            return rebuilt
        except Exception:  # a subclass that refuses copying or item assignment
            pass
    return type(original)(items)


def _where(chain: Any) -> str:
    """The path a chain of ``(parent, (format, key))`` steps names, from the object looked into."""
    steps = []
    while chain is not None:
        chain, (form, key) = chain
        steps.append(form.format(key))
    return "".join(reversed(steps))


def _refuse_hidden(value: Any, before: int, path: str, stage: int, fixed: dict[int, Tensor],
                   made: Mapping[int, Tensor], items: bool = True) -> None:
    """Refuse an object that holds, at any depth, a tensor of the ``before`` samples in the network (a
    per-sample tensor EarlyExit cannot select: the object would go on with the samples that left).
    Looked into: attributes (``__dict__`` and ``__slots__``, dataclasses of either kind), mappings,
    sets, deques and other collections, and what they hold in turn, each object once (a cycle ends).
    Atoms (``None``, numbers, strings, bytes, enums, dtypes, devices...) hold no tensor: they are
    skipped at next to no cost and not counted, so a container of them (a vocabulary) costs one type
    lookup per item; an object holding more than :data:`HIDDEN_WALK_LIMIT` other values (objects,
    containers, tensors) is refused as too large to check. Not per sample, as where samples are
    selected: a parameter, a tensor of another first dimension, and a tensor in ``fixed`` (passed on
    unchanged at an earlier exit of the call). Every tensor found and not refused is added to
    ``fixed``: passed on unchanged here, it is not per sample at a later exit either, whatever the
    number of samples then in (a table an object carries through the stages). ``items=False``: a
    container whose items were selected already, only its attributes are looked at (a
    ``ModelOutput``'s)."""
    if type(value) in _ATOM_TYPES:
        return
    layout = _layout(type(value))
    if layout.atom:
        return
    seen, stack, count = {id(value)}, [(value, layout, None, items)], 0
    while stack:
        current, layout, chain, walk_items = stack.pop()
        for step, inner in _inside(current, layout, walk_items):
            tensor = isinstance(inner, Tensor)
            if not tensor:
                inner_layout = _layout(type(inner))
                if inner_layout.atom:
                    continue
            count += 1
            if count > HIDDEN_WALK_LIMIT:
                raise TypeError(f"Stage {stage} returned a `{type(value).__name__}` ({path}) holding more than "
                                f"{HIDDEN_WALK_LIMIT} values that could hold a tensor (objects, containers, "
                                f"tensors; numbers, strings and other atoms are not counted): EarlyExit looks into "
                                f"every object between stages for tensors of the samples in the network (which it "
                                f"could not select), and this one is too large to check. Pass the next stage its "
                                f"tensors in tuples, lists or dicts, and keep large objects in the module (an "
                                f"attribute of the stage) rather than between stages.")
            if tensor:
                if made.get(id(inner)) is inner:  # the samples kept of a per-sample tensor (a ModelOutput's)
                    continue
                if inner.dim() > 0 and inner.shape[0] == before and not isinstance(inner, nn.Parameter) and \
                        fixed.get(id(inner)) is not inner:
                    raise TypeError(
                        f"Stage {stage} returned a `{type(value).__name__}` ({path}) holding tensors whose first "
                        f"dimension is the number of samples in the network ({before}): "
                        f"{path}{_where((chain, step))} {tuple(inner.shape)}. EarlyExit selects samples in tensors "
                        f"and in tuples, lists and dicts of them, and would pass this object on with the samples "
                        f"that left. Return its tensors in a tuple, list or dict (or a namedtuple). A tensor that "
                        f"is not per sample (a table) whose first dimension only happens to equal that number, where "
                        f"the object is first handed on, cannot be told from one: keep it in the module (an "
                        f"attribute of the stage), or give it another first dimension (a leading 1).")
                fixed[id(inner)] = inner  # passed on unchanged: not per sample at a later exit either
            elif id(inner) not in seen:
                seen.add(id(inner))
                stack.append((inner, inner_layout, (chain, step), True))


def _rule_argument(name: str) -> str:
    """How to pass the rule named ``name``: by its name where it is built in, else an instance of it."""
    return f"rule={name!r}" if name in RULES else f"rule={name.rsplit('.', 1)[-1]}() (an instance of {name})"


def _forward_key(model: nn.Module, modules: list[int]) -> tuple[Any, ...]:
    """What :func:`check_forward_agrees` depends on, by identity: the model, its class and forward (the class's, or
    one set on the instance), its own hooks, and every module of its tree (``modules``: their ids, a module
    replaced is checked again; stages or heads that ``exit_stages()`` wraps anew at each call are not)."""
    return (id(model), type(model), getattr(type(model), "forward", None), id(model.__dict__.get("forward")),
            tuple(model._forward_pre_hooks), tuple(model._forward_hooks), tuple(modules))


CHECKED_SAMPLES = 8  # how many samples of a first call check_forward_agrees runs through the forward and the stages


@torch.no_grad()
def check_forward_agrees(model: nn.Module, call: ModelCall, inputs: Sequence[Tensor],
                         parts: tuple[Sequence[nn.Module], Sequence[nn.Module]], n: int,
                         samples: int = CHECKED_SAMPLES) -> None:
    """Refuse a model whose ``forward`` gives other logits than its ``exit_stages()`` run in turn (stage 1,
    head 1, stage 2, ...), which is what :class:`EarlyExit` runs: a ``forward`` that normalises or reshapes its
    input before stage 1, is overridden in a subclass of :class:`MultiExit`, or a forward hook on the model
    itself. Early exit would then predict from other logits than ``model(x)`` gives (and the thresholds were
    found on), silently. Both are run on the first ``samples`` samples of the call (at most; each pass on its own
    copy of them), in eval mode (the caller's), from one state of the random generators and of the model's buffers
    and tensor attributes (a model random in eval mode, MC dropout, draws the same in both; a running normaliser is
    the same in both; both put back afterwards, :class:`_ModuleState`; a parameter the forward changes in place is
    warned of), a compiled model's forward run eagerly. The
    logits are compared as probabilities (:func:`_differ`). Not checked: a call whose inputs cannot be cut to
    those samples, a forward that does not return one logits tensor per exit, a forward that differs from itself
    (random from a generator out of reach, a module-level one, or changing a state of its own at each call: seen
    by running it a second time where the stages differ, and warned of), and what the forward does to other
    samples only (a step that leaves the checked ones as they are).
    A host read per exit.

    Raises:
        ValueError: an exit whose probabilities differ (beyond rounding: 1e-3, 5e-2 in half precision) or whose
            shapes differ, naming it and what to change.
    """
    stages, heads = parts
    m = min(n, samples)
    device = next(t.device for t in inputs if t.dim() > 0 and t.shape[0] == n)

    def cut() -> ModelCall:  # (a copy for each pass: a stage, or the forward, may write into what it takes)
        select = _Selection(inputs, n)
        keep = torch.arange(m, device=device)
        return ModelCall(tuple(select(list(call.args), keep, n, 1)), dict(select(dict(call.kwargs), keep, n, 1)))

    try:
        few, again, third = cut(), cut(), cut()
    except Exception:  # noqa: BLE001 - inputs EarlyExit cannot cut here (sparse, on two devices): not checked
        return
    eager = getattr(model, "_orig_mod", model)  # (a compiled model: its forward eagerly, not compiled for the check)
    eager = eager if isinstance(eager, nn.Module) else model
    start = rng_state(device, model_generators(model))
    # the model's state as the call left it: each pass starts from it, and it is put back after (a running
    # normaliser, a call counter: the check changes none of the model's tensors and plain attributes)
    state = _ModuleState([eager, *stages, *heads])

    def reset() -> None:
        set_rng_state(start, device)
        state.restore()

    def forward(inputs: ModelCall) -> list[Tensor]:
        reset()
        return check_exit_outputs(eager(*inputs.args, **inputs.kwargs), len(heads))

    try:
        try:
            reference = forward(few)
        except Exception:  # noqa: BLE001 - a forward of another form (not K logits tensors): nothing to compare with
            return
        reset()
        name = f"`{type(model).__name__}`"
        features: Any = None
        for k, (stage, head) in enumerate(zip(stages, heads)):
            if k == 0:
                first = first_stage_call(model, again, stage)
                features = stage(*first.args, **first.kwargs)
            else:
                features = stage(features)
            staged, expected = head_logits(head(features), k, head, name), reference[k]
            differ = _differ(staged, expected)
            if differ is None:
                continue
            if _differ(forward(third)[k], expected) is not None:  # (the forward differs from itself)
                warn_user(f"EarlyExit could not check that the stages and heads of {name} compute what its forward "
                          f"does: two forwards of the batch's first {m} sample(s) from one state of the random "
                          f"generators gave other logits at exit {k + 1} (the forward is random from a generator "
                          f"metaweight cannot put back, a module-level one, or changes a state of its own at each "
                          f"call). Make sure that exit_stages() does what the forward does: early exit runs the "
                          f"stages alone.")
                return
            raise ValueError(
                f"EarlyExit runs {name} through its exit_stages() (stage 1, head 1, stage 2, ...), and its forward "
                f"computes something else: on the batch's first {m} sample(s), exit {k + 1}'s logits from the stages "
                f"{differ}. Early exit would predict from other logits than model(x) gives, and than thresholds "
                f"found on them assume. The forward does something the stages do not: a step before stage 1 "
                f"(normalising or reshaping the input), an overridden forward, a step between stages, or a forward "
                f"hook or pre-hook on the model itself. Move that step into a stage (e.g. nn.Sequential(normalize, "
                f"stage_1) as the first stage), or make exit_stages() return stages that do what the forward does. "
                f"(A forward random in eval mode can differ from its stages by chance where it draws its random "
                f"numbers in another order than stage 1, head 1, stage 2, ..., or from a generator metaweight cannot "
                f"put back, a module-level torch.Generator: hold the generator in a module attribute.)")
    finally:
        reset()
        moved = state.parameters_changed()
        if moved:
            warn_user(f"EarlyExit's check of `{type(model).__name__}` ran its forward and its stages on {m} sample(s), "
                      f"and they changed the parameter(s) {moved} in place, which the check cannot put back (it "
                      f"copies the buffers, not the weights): they now hold what those extra passes made of them. "
                      f"Hold state a forward updates (a running mean) in a buffer (register_buffer), which the check "
                      f"puts back, not in an nn.Parameter.")


class _ModuleState:
    """What a forward may change in ``modules`` and their submodules, kept so that :func:`check_forward_agrees`
    leaves the model as it found it: each module's buffers and tensor attributes (the objects in their slots and
    their values: a buffer updated in place, through ``.data`` too, or replaced, ``self.mean = 0.9 * self.mean +
    ...``, or one registered by the forward, is put back; an attribute the forward made a tensor gets its value
    before, ``None`` for a lazy cache), its other attributes rebound (the object each held is put back: a Python
    call counter, ``self.calls += 1``, the shape of the last batch or a cache's key, a list made a tuple) or added
    holding an immutable value (a number, a string, ``None``, a tuple, a dtype: deleted again); not in a lazy
    module, whose first forward sets its sizes, and its parameters (the
    objects in their slots; a parameter changed in place is only noticed, by its version counter, since copying
    every weight could double the model's memory). A value is written back only where it differs from the one kept
    (an alias of a parameter, ``weight.detach()``, is not written through). Inference tensors' values are put back
    only inside inference mode (outside it torch refuses to write them). Not put back: Python containers changed in
    place (a list the forward appends to)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        seen: dict[int, tuple[str, nn.Module]] = {}
        for root in modules:
            for name, module in root.named_modules():
                seen.setdefault(id(module), (name or type(module).__name__, module))
        # (each module's slots, its attributes kept, and whether it was a lazy module then: one the check's passes
        # initialise becomes another class, whose sizes its first forward set)
        self._slots: list[tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any], bool]] = []
        values: dict[int, list[Any]] = {}
        self._versions: dict[int, tuple[str, Tensor, int]] = {}
        for path, module in seen.values():
            lazy = isinstance(module, _LAZY)
            # (every attribute, whatever it holds: one the forward rebinds, a list made a tuple, is put back as it
            # was; a lazy module's tensors only)
            own = {k: v for k, v in vars(module).items() if not lazy or isinstance(v, Tensor)}
            self._slots.append((module, dict(module._buffers), dict(module._parameters), own, lazy))
            for t in (*module._buffers.values(), *own.values()):
                if isinstance(t, Tensor) and id(t) not in values and not t.is_sparse and not is_lazy(t):
                    values[id(t)] = [t, t.detach().clone()]
            for name, p in module._parameters.items():
                if p is not None and not is_lazy(p) and not p.is_inference():
                    self._versions.setdefault(id(p), (f"{path}.{name}", p, p._version))
        self._values = list(values.values())

    def restore(self) -> None:
        """Put every slot's object back, then the value of each one changed (in place, or through ``.data``)."""
        for module, buffers, parameters, attributes, lazy in self._slots:
            for held, saved in ((module._buffers, buffers), (module._parameters, parameters)):
                if held.keys() != saved.keys() or any(held[k] is not v for k, v in saved.items()):
                    held.clear()
                    held.update(saved)
            own = vars(module)
            added = Tensor if lazy else (Tensor, *_PLAIN)  # (what the forward may add and the check deletes again)
            for name, value in attributes.items():  # (an attribute rebound or deleted by the forward: as it was)
                if own.get(name, _ABSENT) is not value:
                    own[name] = value
            for name in [k for k, v in own.items() if k not in attributes and isinstance(v, added)]:
                del own[name]  # (one the forward added: a lazy cache, a counter made at the first call)
        inference = torch.is_inference_mode_enabled()
        with torch.no_grad():
            for tensor, value in self._values:
                if tensor.is_inference() and not inference:
                    continue
                if tensor.shape != value.shape or tensor.dtype != value.dtype or tensor.device != value.device:
                    tensor.data = value.clone()  # (``.data`` given another shape by the forward)
                elif not _same_values(tensor, value):
                    tensor.copy_(value)

    def parameters_changed(self) -> list[str]:
        """The parameters changed in place since the state was kept (their version counters moved), by their path
        in the model."""
        return [name for name, p, version in self._versions.values() if p._version != version]


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of one shape hold the same values, NaN equal to NaN (a host read; two where they differ
    or hold NaN)."""
    if torch.equal(a, b):
        return True
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return False


# what _ModuleState puts back of a module's other attributes: immutable values a forward rebinds (a call counter, the
# shape of the last batch, a cache's key)
_PLAIN = (int, float, complex, str, bytes, type(None), tuple, frozenset, torch.dtype, torch.device, enum.Enum)
_LAZY = torch.nn.modules.lazy.LazyModuleMixin
_ABSENT = object()


def _differ(staged: Tensor, expected: Tensor) -> str | None:
    """How exit logits from the stages differ from the forward's (``None``: they agree), compared as
    probabilities, what every rule scores: beyond rounding, 1e-3 (5e-2 in half precision), whatever the logits'
    scale or a class masked with a large negative logit (-1e9), and a forward giving ``log_softmax`` agrees."""
    if staged.shape != expected.shape:
        return f"have shape {tuple(staged.shape)} where the forward's have {tuple(expected.shape)}"
    a = torch.softmax(staged.double(), -1)
    b = torch.softmax(expected.to(staged.device).double(), -1)
    tolerance = 5e-2 if min(staged.element_size(), expected.element_size()) < 4 else 1e-3
    if bool(torch.isclose(a, b, rtol=0.0, atol=tolerance, equal_nan=True).all()):
        return None
    gap = (a - b).abs().nan_to_num(nan=float("inf")).max()
    return f"give probabilities that differ by up to {float(gap):.3g}"


class EarlyExit(nn.Module):
    """Runs a multi-exit model so that each sample stops at its first confident exit.

    Stage ``k`` and head ``k`` run only for the samples still in the network; a sample
    leaves at exit ``k`` when its softmax confidence reaches ``thresholds[k]`` (the last
    exit takes all). The predictions equal those of taking, from a full forward pass, the
    first exit over threshold (:func:`exit_assignment`), but the compute of the skipped stages
    is really saved. Both decide alike in every dtype: the prediction is the argmax of the
    head's logits in their own dtype, the scores are computed in float32 (float64 for a float64
    model; calibrated logits divided as :meth:`Calibration.apply` divides them) and compared with
    the thresholds in float64 (float32 on MPS, which has no float64), which are kept so when
    the predictor is cast (``.half()``, ``.bfloat16()``, ``.double()`` cast the model, never the
    thresholds). The structure is read at every call (``exit_stages()`` and the modules' modes),
    so a head or stage replaced after construction is the one used. What runs is the stages and
    heads, never the model's ``forward``: the first call (and the first after a stage, a head or the
    model's own hooks or its modules change) checks on its first 8 samples that they give the
    forward's logits, running the forward and the stages on them (twice the last exit's cost of those
    samples, once), and refuses a model whose forward does something they do not (see
    :func:`check_forward_agrees`). Equal up to rounding: a
    stage run on the sub-batch still in the network may round its output differently in the last bit than on the whole batch (a matrix
    multiply over fewer rows; one float32 ulp of a logit, about 6e-8, seen on CPU), so a sample
    whose score lies that close to a threshold can leave at the neighbouring exit. Thresholds
    from :func:`find_thresholds` on the very logits evaluated sit exactly on some samples'
    scores, so there a few such samples are expected; on other data they are rare.

    What is per sample. The batch is the samples of exit 1's logits (stage 1 and head 1 see
    every sample): ``N`` rows, and some tensor of the inputs must have ``N`` as its first
    dimension (a sequence-first ``[T, B, H]`` input is refused), wherever it comes in them: after
    a 0-d or ``[1]`` scale, in any order of a dict. Between stages, the samples still in are
    kept from every tensor of the features (at any depth of tuples, lists, namedtuples and dicts;
    each in its own type, a ``ModelOutput`` too) whose first dimension is the number of samples in
    the network; every other value goes on
    unchanged: ``None``, numbers and strings, 0-d tensors, broadcast tensors (``[1, T]`` masks),
    tensors of another first dimension (a table), and, whatever their first dimension, the
    model's parameters (an ``nn.Parameter`` itself), input tensors whose first dimension is not
    ``N`` and tensors already passed on unchanged at an earlier exit of the call (a table carried
    through the stages). The limit: a tensor that is not per sample, made by a stage or a buffer,
    whose first dimension happens to equal the number of samples in the network is selected as if
    it were (nothing tells them apart); pass it on from stage 1, keep it in the module, or give
    it another first dimension (a leading 1). A per-sample tensor inside another object is
    refused (``TypeError``, naming where it is), as is a ``PackedSequence``: EarlyExit could not
    select its samples. It is looked for at any depth of attributes (``__dict__`` and
    ``__slots__``: dataclasses of both kinds), sets, deques and other collections, and the
    attributes of a list or dict subclass, each object once; not inside a module, an iterator
    (which looking would consume) or a NumPy array of numbers. A tensor in an object follows the
    rule above: a table of another first dimension goes on, and so does one the object carried
    past an earlier exit of the call, whatever the number of samples in the network later; one
    whose first dimension equals that number where the object is first handed on (a ``[6, d]``
    table with a batch of 6) is taken as per sample, as in a tuple (where it is selected), and
    refused. Atoms (``None``, numbers, strings, bytes, enums, dtypes, devices) cost next to nothing
    and are not counted: a vocabulary of strings and numbers goes on at any size; an object holding
    more than ``HIDDEN_WALK_LIMIT`` (100,000) other values (objects, containers, tensors) is
    refused as too large to check.

    Every exit must predict the same classes. Heads that declare different numbers (an
    ``nn.Linear``, or an ``nn.Sequential`` ending in one) are refused when built and at every call;
    other heads are checked on their logits, at each exit a call reaches: a batch whose samples all
    leave before the exit of other classes is answered (from exits that agree), and the next batch
    that reaches it is refused. Not checked beforehand: that would run the remaining stages.

    Layers that compute statistics of the batch at inference would compute other values on the
    samples still in than on the whole batch: a BatchNorm without running statistics
    (``track_running_stats=False``, or ``running_mean``/``running_var`` set to ``None``) in a stage
    or head after the first is refused with a ``ValueError`` naming it, when built and at every
    call, rather than warned about: the predictions would silently differ from the model's, which
    the equality above promises (exits attached with :func:`attach_exits` run the whole batch
    through the forward, so nothing is refused there). BatchNorm with running statistics is fine
    in any mode, since EarlyExit runs the model in eval mode. Statistics over the batch computed by
    the model's own code (``x - x.mean(0)``) cannot be seen and break the equality the same way.

    Args:
        model: a model with ``exit_stages()`` returning ``(stages, heads)`` (e.g.
            :class:`MultiExit`; see :func:`exit_parts`), or one wrapped in ``DistributedDataParallel``
            or ``nn.DataParallel``, whose module is run.
        thresholds: ``K`` thresholds on the rule's scores, e.g. from :func:`find_thresholds` or
            :func:`thresholds_for_budget` with the same rule.
        rule: the exit rule (:class:`MaxProbability` by default, :class:`Entropy`,
            :class:`Margin`, :class:`Patience`, or a name).
        temperatures: scores from calibrated logits: a :class:`Calibration` (from
            :func:`calibrate`) or ``K`` positive temperatures; exit ``k``'s logits are divided by
            the ``k``-th before the rule scores them (the predictions do not change). Use it when
            the thresholds were found on calibrated logits
            (``find_thresholds(calibration.apply(logits), ...)``). ``None``: raw logits.
        cuda_graphs: run each stage with its exit head from a CUDA graph (``torch.cuda.graphs``):
            on a GPU, a model of many small layers is bound by kernel launches, so a stage run on
            few samples costs as much as on the whole batch; a replayed graph is one launch. A
            graph is fixed in its shapes, so after stage 1 the samples still in are padded to the
            next power of two (the padded rows, copies of a real sample, are computed and dropped;
            predictions are the same, up to rounding as above), and each stage keeps a graph per
            padded size (at most ``log2(N) + 1``); stage 1 sees the whole batch as the model does,
            with a graph per batch size. The first call that needs a graph runs the stage eagerly
            (its answer) and captures it, with a synchronisation (seconds in all for a first batch
            and a first single sample; memory: each graph keeps the stage's activations at its
            size; CUDA work of other threads during a capture fails). A parameter, buffer or
            submodule replaced (in a module's dicts, however written), moved or cast is seen at the
            next call (by identity and the tensors' addresses, about 0.6 ms per call on the CPU for
            the 8-exit CIFAR MSDNet) and the stage is captured again; changed in place (an
            optimizer step), it is read by the graph. What a stage writes in place into what it
            takes is written back into the call's tensors. What the stage's Python decides is fixed
            at capture: a stage may not read a value back to the host (a ``RuntimeError`` names it),
            its hooks and Python attributes are those of the capture, and its features may hold
            tensors, numbers, strings, ``None``, dtypes and devices, in tuples, lists and dicts
            (anything else is refused with a ``TypeError``, a value that changes with the number of
            samples with a ``ValueError``). Exits attached by name (:func:`attach_exits`) run the
            model's own forward and are refused. On a device that is not CUDA nothing is captured:
            the padded stages run eagerly (slower than the default; for testing). Not yet measured
            on a GPU (``docs/guides/evaluation.md``).

    ``state_dict()`` holds the model's state, the thresholds and, as the extra state, the rule's
    name and the temperatures; ``load_state_dict`` restores the temperatures (a state saved
    before they were kept loads with this predictor's own) and refuses, before copying anything
    into this predictor, a state saved with another rule, temperatures that do not fit or NaN
    thresholds; where torch refuses a state after copying, the thresholds and temperatures are
    put back.

    Example:
        >>> import torch, metaweight as mw
        >>> net = mw.MultiExit([torch.nn.Linear(4, 4)] * 2, [torch.nn.Linear(4, 3)] * 2).eval()
        >>> result = mw.EarlyExit(net, torch.tensor([0.0, -1.0]))(torch.randn(5, 4))
        >>> result.exits.tolist()  # a threshold of 0 lets everyone leave at exit 1
        [0, 0, 0, 0, 0]
        >>> predictions, exits = result  # a named tuple: it unpacks as a pair

    Raises:
        TypeError: a model that is not an ``nn.Module`` or exposes no stages; thresholds that are
            not numbers; ``cuda_graphs`` not a bool. At a call: inputs holding no tensor; features
            whose per-sample tensors cannot be selected (inside another object, a
            ``PackedSequence``); a head returning anything but a logits tensor (a tuple, a dict);
            with ``cuda_graphs``, features a graph cannot hold.
        ValueError: a model on the meta device; thresholds not one per exit, or NaN; temperatures
            not one positive number per exit; a BatchNorm without running statistics in a stage
            or head after the first (also at a call); ``cuda_graphs`` with exits attached by name.
            At a first call, a model whose forward gives other logits than its stages and heads.
            Heads declaring different numbers of classes (at a call too, and heads that do not
            declare them where a call reaches an exit of other classes than exit 1's).
            At a call: the batch not in the first dimension (of the inputs, or of the features: a
            later exit with other rows than the samples still in), a row of logits with no
            softmax, NaN logits at the last exit (which predicts every sample still in), a model
            whose number of exits changed; with ``cuda_graphs``, a stage giving other values
            beside its tensors for another number of samples. At ``load_state_dict``: a state of
            another rule, temperatures that do not fit, NaN thresholds.
        RuntimeError: with ``cuda_graphs`` on CUDA, a stage that cannot be captured (it reads a
            value back to the host), naming it.
    """

    _check_statistics = True  # (off for exit_costs(executed=True): every sample leaves at one exit there)
    _forward_checked: tuple[Any, ...] | None = None  # the structure check_forward_agrees last passed

    def __init__(self, model: nn.Module, thresholds: Tensor | Sequence[float], *,
                 rule: ExitRule | str = "max_probability", temperatures: Any = None,
                 cuda_graphs: bool = False) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` should be an nn.Module. Found `{type(model).__name__}`.")
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"`cuda_graphs` should be True or False. Found {cuda_graphs!r}.")
        # (inference needs no DistributedDataParallel: its stages are the module's, run without its hooks)
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        refuse_meta(model, None, "EarlyExit")
        self.model = model
        self.rule = as_rule(rule)
        self._whole_batch = callable(getattr(model, "run_until", None)) and not callable(getattr(model, "exit_stages",
                                                                                                  None))
        if cuda_graphs and self._whole_batch:
            raise ValueError(f"EarlyExit(cuda_graphs=True) captures each stage of the model with its exit head, and "
                             f"`{type(model).__name__}` has exits attached by name (attach_exits), whose forward runs "
                             f"whole: it has no stages to capture. Build the model with exit_stages() (e.g. "
                             f"metaweight.MultiExit), or use cuda_graphs=False.")
        self._graphs: StageGraphs | None = StageGraphs() if cuda_graphs else None
        if self._whole_batch:  # exits attached by name: stop the forward once every sample has left
            num_exits = int(model.num_exits)
        else:
            stages, heads = exit_parts(model)
            check_head_classes(heads, f"`{type(model).__name__}`")
            if self._check_statistics:
                refuse_batch_statistics(model, stages, heads)
            num_exits = len(heads)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        # float64 holds a list's numbers and any float tensor's exactly (cast on the CPU: MPS has no float64)
        thresholds = check_thresholds(thresholds, num_exits).cpu()
        warn_unreachable(thresholds, self.rule, "EarlyExit")
        thresholds = thresholds.to(dtype=decision_dtype(device)).to(device)  # where the scores will be
        # a copy: the caller's tensor is not the buffer that load_state_dict() and .to() write
        self.register_buffer("thresholds", thresholds.clone())
        self.temperatures: list[float] | None = check_temperatures(temperatures, num_exits)

    @property
    def stages(self) -> Sequence[nn.Module]:
        """The model's stages, read now (see :func:`exit_parts`)."""
        return exit_parts(self.model)[0]

    @property
    def heads(self) -> Sequence[nn.Module]:
        """The model's exit heads, read now (see :func:`exit_parts`)."""
        return exit_parts(self.model)[1]

    def _apply(self, fn: Any, recurse: bool = True) -> EarlyExit:
        """Move and cast the model as ``nn.Module`` does; the thresholds follow the device only, in its
        :func:`decision_dtype` (float64; float32 on MPS, which has no float64): a cast (``.half()``,
        ``.bfloat16()``) would round them (0.2013 to 0.20117) and change exits. CUDA graphs captured
        before are dropped (they read the tensors as they were)."""
        if getattr(self, "_graphs", None) is not None:
            self._graphs.clear()
        kept = self._buffers.pop("thresholds")
        try:
            super()._apply(fn, recurse)
            target = fn(kept.to(torch.float32)).device  # where fn sends a tensor (a cast keeps the device)
            self._buffers["thresholds"] = kept.to(dtype=decision_dtype(target)).to(target)
        except BaseException:
            self._buffers["thresholds"] = kept
            raise
        return self

    def __getstate__(self) -> dict[str, Any]:
        """Pickled and copied without its CUDA graphs (captured again as calls need them)."""
        state = self.__dict__.copy()
        if state.get("_graphs") is not None:
            state["_graphs"] = StageGraphs()
        state.pop("_forward_checked", None)  # (identities: the copy's model is checked again at its first call)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_graphs", None)  # (pickled before cuda_graphs existed)
        super().__setstate__(state)

    def get_extra_state(self) -> dict[str, Any]:
        """What ``state_dict()`` keeps beside the model and the thresholds: the rule's name and the
        temperatures (``None`` for raw logits), which the thresholds were fitted with."""
        temperatures = None if self.temperatures is None else list(self.temperatures)  # (a copy: not the live list)
        return {"rule": self.rule.name, "temperatures": temperatures}

    def set_extra_state(self, state: Any) -> None:
        """Load the temperatures saved by :meth:`get_extra_state` (checked as at construction)."""
        self.temperatures = self._loaded_temperatures(state)

    def _loaded_temperatures(self, state: Any) -> list[float] | None:
        """The temperatures a saved extra state holds, after checking it fits this predictor: the
        same rule (thresholds are numbers on one rule's scores) and one temperature per exit."""
        if not isinstance(state, dict) or set(state) != {"rule", "temperatures"}:
            raise ValueError(f"EarlyExit.load_state_dict: the state's extra state should be a dict with 'rule' and "
                             f"'temperatures', as EarlyExit.state_dict() saves it. Found {state!r}.")
        legacy = state["rule"] == "rule" and self.rule._default_name  # (a rule without a name, saved before it had one)
        if state["rule"] != self.rule.name and not legacy:
            raise ValueError(f"EarlyExit.load_state_dict: the state was saved with rule {state['rule']!r} and this "
                             f"EarlyExit scores with {self.rule.name!r}; its thresholds are numbers on the saved "
                             f"rule's scores. Build it with {_rule_argument(state['rule'])} to load it (or, if "
                             f"{type(self.rule).__name__} scores on the saved rule's scale, set name = "
                             f"{state['rule']!r} in its class); this EarlyExit was left as it was.")
        try:
            return check_temperatures(state["temperatures"], len(self.thresholds))
        except ValueError as error:
            raise ValueError(f"EarlyExit.load_state_dict: the state's temperatures do not fit this EarlyExit "
                             f"({len(self.thresholds)} exits): {error} This EarlyExit was left as it was.") from None

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, with the thresholds, rule and temperatures checked before anything
        is copied (see the class), and the thresholds and temperatures put back where torch refuses the
        state after copying them (with ``strict``: keys missing or unexpected; tensors of other shapes).
        The model's own weights follow torch's rules."""
        thresholds, temperatures = self.thresholds.clone(), self.temperatures
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except Exception:
            self._buffers["thresholds"], self.temperatures = thresholds, temperatures
            raise

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        """Check the saved rule and temperatures before torch copies anything (a mismatch loses
        nothing); a state saved before they were kept (no extra state) loads with this predictor's."""
        key = prefix + "_extra_state"
        if key in state_dict:
            self._loaded_temperatures(state_dict[key])
        if prefix + "thresholds" in state_dict:  # the constructor's check (NaN sends every sample to the last exit)
            try:
                loaded = check_thresholds(state_dict[prefix + "thresholds"], len(self.thresholds))
            except (TypeError, ValueError) as error:
                raise type(error)(f"EarlyExit.load_state_dict: the state's thresholds do not fit this EarlyExit: "
                                  f"{error} This EarlyExit was left as it was.") from None
            warn_unreachable(loaded, self.rule, "EarlyExit.load_state_dict")  # (as the constructor does)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)

    def _inputs_target(self) -> nn.Module:
        """The model this wrapper passes its inputs to (how a dict of inputs is passed is decided on it)."""
        return self.model

    def forward(self, *args: Any, **kwargs: Any) -> EarlyExitResult:
        """Predicted classes ``[N]`` and the exit each sample left at ``[N]`` (0-based), as an
        :class:`EarlyExitResult` ``(predictions, exits)`` (a named tuple: it unpacks as a pair).

        Takes what the model takes: ``predictor(x)``, ``predictor(x=x)``, ``predictor(a, b)``, or
        one dict of the forward's keyword arguments (passed as keywords, as the weighter and
        :func:`collect_logits` pass a batch); ``N`` is the number of rows of exit 1's logits, the
        first dimension of some tensor of the inputs (the others, a 0-d scale, a ``[1]`` one, a
        table, may come before it; see the class). A call the model's ``forward`` cannot take is
        refused with a ``TypeError`` before it runs. A sample whose logits at an exit it reaches are
        all ``-inf`` (every class masked) or hold ``+inf`` has no softmax: a ``ValueError`` says so
        rather than guess. A NaN score never leaves an exit, so a sample with NaN logits goes on; at
        the last exit, which takes every sample left, its prediction would be the argmax of NaN
        (class 0): a ``ValueError`` names the exit and how many samples, as :func:`exit_assignment`
        does. The model runs in eval mode (BatchNorm's running statistics, no dropout) whatever mode
        it was left in, and is
        put back in its mode afterwards: predicting never changes it.
        """
        x = wrapper_call(self.model, args, kwargs, "EarlyExit")
        inputs = _batch_inputs(x)  # a call without a tensor is refused here, not by a bare StopIteration
        if holds_meta(x):
            refuse_meta(self.model, x, "EarlyExit")
        # read at every call, before anything runs: a head or stage replaced later is the one used
        parts = None if self._whole_batch else exit_parts(self.model)
        training, batch_statistics, modules = [], False, []
        for m in self.model.modules():  # one pass over the modules (the cost of a call at batch 1)
            modules.append(id(m))  # (the structure check_forward_agrees passed: checked again when it changes)
            if m.training:
                training.append(m)
            if _uses_batch_statistics(m):
                batch_statistics = True  # (in which stage, only looked up then)
        if batch_statistics and parts is not None and self._check_statistics:
            refuse_batch_statistics(self.model, *parts)
        for m in training:
            m.training = False
        try:
            predictions, exits = self._run(x, inputs, parts)
            if parts is not None and exits.numel():
                key = _forward_key(self.model, modules)
                if key != self._forward_checked:  # (once per model structure: the call's only extra cost then)
                    check_forward_agrees(self.model, x, inputs, parts, exits.shape[0])
                    self._forward_checked = key
            return EarlyExitResult(predictions, exits)
        finally:
            for m in training:
                m.training = True

    @torch.no_grad()
    def _run(self, x: ModelCall, inputs: list[Tensor], parts: Any) -> tuple[Tensor, Tensor]:
        if parts is None:
            return self._run_attached(x, inputs)
        features: Any = None
        stages, heads = parts
        if len(heads) != self.thresholds.numel():
            raise ValueError(f"`{type(self.model).__name__}` now has {len(heads)} exits, but this EarlyExit holds "
                             f"{self.thresholds.numel()} thresholds: build a new EarlyExit with one per exit.")
        check_head_classes(heads, f"`{type(self.model).__name__}`")
        exits = torch.empty(0, dtype=torch.long)
        classes = torch.empty(0, dtype=torch.long)
        # The samples still in, by their index in the batch; None while they are the whole batch in
        # order (no index to gather through before a first sample leaves).
        alive: Tensor | None = None
        size = 0  # how many samples are still in
        # Per exit some sample left at: their indices in the batch and their predictions, written
        # into the predictions once at the end (one scatter, not two per exit).
        gone: list[Tensor | None] = []
        taken: list[Tensor] = []
        select: _Selection | None = None
        last = len(heads) - 1
        history: list[Tensor] = []  # earlier exits' logits of the samples still in (rules such as patience)
        first_logits: Tensor | None = None
        for k, (stage, head) in enumerate(zip(stages, heads)):
            if k == 0:  # the first stage takes the model's inputs (see exit_parts)
                call = first_stage_call(self.model, x, stage)
                args, kwargs = call.args, call.kwargs
            else:
                args, kwargs = (features,), {}
            if self._graphs is None:
                features = stage(*args, **kwargs)
                raw = head_logits(head(features), k, head, f"`{type(self.model).__name__}`")
            else:
                features, raw = self._graphs_run(k, stage, head, args, kwargs, size, inputs, select)
            raw = _per_sample(raw)
            if k == 0:  # stage 1 and head 1 see every sample: exit 1's rows are the batch
                _check_inputs_batch(raw, inputs)
                size = raw.shape[0]
                device = next(t.device for t in inputs if t.dim() > 0 and t.shape[0] == size)
                exits = torch.empty(size, dtype=torch.long, device=device)
                select = _Selection(inputs, size)
            elif raw.shape[0] != size:
                _refuse_unselected(k, raw, size, select.passed if select is not None else [])
            classes = predict(raw)  # in the logits' own dtype, as exit_assignment predicts
            # calibrated scores as Calibration.apply gives them (the predictions are the same)
            logits = score_dtype(raw) if self.temperatures is None else \
                calibrated(raw[None], self.temperatures[k:k + 1])[0]
            first_logits = logits if first_logits is None else first_logits
            check_exit_classes([first_logits] * k + [logits], f"`{type(self.model).__name__}`")
            nan_scored = _undefined_scores_nan(self.rule, logits)
            if self.rule.uses_history:
                history.append(logits)
                score = self.rule.scores(torch.stack(history))[-1].to(logits.device)
            elif k < last or not nan_scored:  # (a built-in rule's score at the last exit decides nothing)
                score = self.rule.scores(logits[None])[0].to(logits.device)
            if k == last:  # everyone still in is predicted here: a NaN row too, so it is counted
                _check_last(self.model, k, raw, logits)
                self._take_all(k, alive, classes, exits, gone, taken)
                break
            leaving = reaches(score, self.thresholds[k])  # a NaN score never leaves
            # The one host read of the exit: how many samples continue sizes what the next stage
            # gets (and whether a row had no softmax or a leaving one NaN). Everything else selects
            # by indices of known size, so no other sync.
            if nan_scored:  # a row without a softmax scores NaN, as a NaN row does (which never leaves)
                leaving_count, nan_count = torch.stack([leaving, torch.isnan(score)]).sum(-1).tolist()
                # only when some score is NaN (rare), which of them had no softmax: a second read
                undefined_count = softmax_undefined(logits).sum().tolist() if nan_count else 0
            else:  # (patience counts agreeing argmaxes, a NaN row's too; a rule of the user's may score it)
                nan = torch.isnan(raw) & leaving[:, None]
                leaving_count, undefined_count, *nan_counts = torch.stack(
                    [leaving.sum(), softmax_undefined(logits).sum(), nan.sum(), nan.any(-1).sum()]).tolist()
                _refuse_nan(self.model, k, nan_counts)
            if undefined_count:
                _refuse_undefined(k, undefined_count)
            if leaving_count == 0:
                continue  # nobody leaves: no bookkeeping, no copy of the features
            if leaving_count == size:
                self._take_all(k, alive, classes, exits, gone, taken)
                break
            # the leavers first, then those staying, each in batch order (a stable sort of the mask
            # gives both sets, where two nonzero calls and a negation did)
            order = torch.sort(leaving.view(torch.uint8), descending=True, stable=True).indices
            left, staying = order[:leaving_count], order[leaving_count:]
            ids = order if alive is None else alive[order]  # the same, as indices in the batch
            gone.append(ids[:leaving_count])
            taken.append(classes[left])
            exits.index_fill_(0, ids[:leaving_count], k)
            features = select(features, staying, size, k + 1)
            alive, size = ids[leaving_count:], size - leaving_count
            history = [h[staying] for h in history]
        if len(gone) == 1 and gone[0] is None:  # every sample left at one exit: its predictions in batch order
            return classes.to(exits.device), exits
        predictions = torch.empty_like(exits)
        if len(gone) == 1:
            return predictions.index_copy_(0, gone[0], taken[0]), exits
        return predictions.index_copy_(0, torch.cat(gone), torch.cat(taken)), exits

    def _graphs_run(self, k: int, stage: nn.Module, head: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    size: int, inputs: list[Tensor], select: _Selection | None) -> tuple[Any, Tensor]:
        """Stage ``k`` and head ``k`` from their CUDA graph (:class:`StageGraphs`), with what tells per-sample
        tensors from those passed on and the check of exit ``k``'s rows, as the eager path has them."""
        assert self._graphs is not None
        where = f"`{type(self.model).__name__}`"
        if k == 0:  # exit 1's rows say how many samples there are
            return self._graphs.run(0, stage, head, args, kwargs, None, lambda t: False,
                                    lambda logits: _check_inputs_batch(_per_sample(head_logits(logits, 0, head, where)),
                                                                       inputs))
        fixed = select.fixed if select is not None else {}
        passed = select.passed if select is not None else []
        return self._graphs.run(k, stage, head, args, kwargs, size, lambda t: fixed.get(id(t)) is t,
                                lambda logits: _per_sample(head_logits(logits, k, head, where)).shape[0] == size or
                                _refuse_unselected(k, logits, size, passed))

    @staticmethod
    def _take_all(k: int, alive: Tensor | None, classes: Tensor, exits: Tensor, gone: list[Tensor | None],
                  taken: list[Tensor]) -> None:
        """Every sample still in leaves at exit ``k``."""
        gone.append(alive)
        taken.append(classes)
        if alive is None:
            exits.fill_(k)
        else:
            exits.index_fill_(0, alive, k)

    def _run_attached(self, x: ModelCall, inputs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Exits attached by name: every sample takes its first confident exit; the forward stops
        at the first exit after which no sample is left."""
        state: dict[str, Any] = {}
        last = len(self.thresholds) - 1

        history: list[Tensor] = []

        def leave(k: int, logits: Tensor) -> bool:
            _per_sample(logits)
            if k == 0:  # exit 1's rows are the batch; the forward runs every sample to the last exit it computes
                _check_inputs_batch(logits, inputs)
            elif logits.shape[0] != history[0].shape[0]:
                raise ValueError(f"Exit {k + 1} gave logits of shape {tuple(logits.shape)}, but exit 1 gave "
                                 f"{history[0].shape[0]} rows (samples): every exit should give one row per sample "
                                 f"of the batch. {_BATCH_FIRST_FIX}")
            history.append(score_dtype(logits) if self.temperatures is None
                           else calibrated(logits[None], self.temperatures[k:k + 1])[0])
            confidence = self.rule.scores(torch.stack(history))[-1].to(logits.device)
            classes = predict(logits)  # in the logits' own dtype, as exit_assignment predicts
            if not state:
                n = logits.shape[0]
                state.update(predictions=torch.empty(n, dtype=torch.long, device=logits.device),
                             exits=torch.empty(n, dtype=torch.long, device=logits.device),
                             alive=torch.ones(n, dtype=torch.bool, device=logits.device))
            alive = state["alive"]
            leaving = alive & (reaches(confidence, self.thresholds[k]) | (k == last))
            # masks, not boolean indexing: the only host read of the exit is whether anyone is left
            state["predictions"] = torch.where(leaving, classes, state["predictions"])
            state["exits"].masked_fill_(leaving, k)
            # only the samples that reach this exit count: the forward computes every sample, including
            # those that already left, whose rows here decide nothing (as the staged path sees them)
            if k != last and _undefined_scores_nan(self.rule, logits):  # (see _run)
                nan = torch.isnan(confidence) & alive  # rows without a softmax among them
                alive &= ~leaving
                any_alive, nan_count = torch.stack([alive.any().long(), nan.sum()]).tolist()
                # only when some score is NaN (rare), which of them had no softmax: a second read
                undefined_count = (softmax_undefined(history[-1]) & nan).sum().tolist() if nan_count else 0
            else:  # predicted here (at the last exit, everyone left)
                undefined = (softmax_undefined(history[-1]) & alive).sum()
                alive &= ~leaving
                nan = torch.isnan(logits) & leaving[:, None]
                any_alive, undefined_count, *nan_counts = torch.stack(
                    [alive.any().long(), undefined, nan.sum(), nan.any(-1).sum()]).tolist()
                _refuse_nan(self.model, k, nan_counts)  # read with the exit's one host read
            if undefined_count:
                _refuse_undefined(k, undefined_count)
            state["done"] = not any_alive
            return state["done"]

        computed = self.model.run_until(x, leave)
        for k in range(len(history), len(computed)):  # the model's own exits, available at the end
            if k > last or state.get("done", False):
                break
            leave(k, computed[k])
        if not state.get("done", False):  # never hand back what torch.empty held
            raise RuntimeError(f"EarlyExit assigned no exit to some samples: the model gave {len(computed)} of its "
                               f"{last + 1} exits. Check the model's num_exits against its output.")
        return state["predictions"], state["exits"]


class _CostProbe(EarlyExit):
    """An :class:`EarlyExit` that :func:`exit_costs` (``executed=True``) runs with every sample leaving
    at one exit: no stage runs on a sub-batch, so a layer using batch statistics computes what the
    full forward does, and is not refused (the FLOPs do not depend on it)."""

    _check_statistics = False
