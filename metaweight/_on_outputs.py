"""A loss term vector or a validation objective on part of a model's outputs, its protocol kept.

A model that returns more than its exits' logits (``{"logits": [...], "hidden": h}``, a tuple of
logits and features, a Hugging Face output) cannot be given :class:`~metaweight.DenseDistillLoss` or
:class:`~metaweight.BalancedValidation` as they are. A lambda that picks the part they take
(``lambda outputs, y: balanced(outputs["logits"], y)``) hides what the weighter asks of them beyond
a call (:mod:`metaweight._protocols`): a criterion's ``term_names`` and ``active``, an objective's
``exit_losses``, ``objective`` and ``update``, through which :class:`BalancedValidation`'s moving
average (Eq. 9) is updated, and its ``state_dict``, through which the average is checkpointed.
:class:`OnOutputs` picks the part and keeps all of them; the weighter refuses a validation
objective that calls a stateful one through a wrapper that hides them (:func:`hidden_state`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dis
import functools
import inspect
import types
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from torch import Tensor, nn

#: What the weighter asks of a validation objective with a state (see metaweight._protocols).
PER_EXIT = ("exit_losses", "objective", "update")


class OnOutputs(nn.Module):
    """``loss(select(outputs), target)``: a criterion or validation objective on part of a model's outputs.

    Every attribute of ``loss`` is read through, so everything the weighter reads of it beyond the call is kept: a
    criterion's ``term_names``, ``active``, ``num_exits``, ``teachers`` and ``ignore_index`` and its
    ``teacher_outputs`` keyword (``select`` applied to the teacher's outputs too); an objective's ``exit_losses``
    (on the selected part), ``objective`` and ``update``. The weighter checkpoints the state of the objective
    ``OnOutputs`` holds (:class:`BalancedValidation`'s moving average; any object's with ``state_dict`` and
    ``load_state_dict``) under the keys it has without ``OnOutputs``. Works for the loss weightings' criteria too.
    A key as ``select`` pickles with the weighter; a lambda does not.

    Args:
        loss: a criterion (``loss(outputs, target) -> Tensor[n]``, e.g. :class:`DenseDistillLoss`) or a
            validation objective (``-> scalar``, e.g. :class:`BalancedValidation`).
        select: what ``loss`` takes of the model's outputs: a key or index (``outputs[select]``), or a callable
            ``select(outputs)`` (e.g. ``lambda out: out.logits``).

    Raises:
        TypeError: ``loss`` not callable, or ``select`` neither a key nor callable.
        ValueError: (at a call) outputs without ``select``, naming what they hold.

    Example::

        model = ...  # forward returns {"logits": [exit_1, ..., exit_K], "features": f}
        weighter = mw.HarmonizedWeighter(model, optimizer, mw.OnOutputs(mw.DenseDistillLoss(K), "logits"),
                                         mw.OnOutputs(mw.BalancedValidation(K), "logits"))
    """

    def __init__(self, loss: Callable[..., Tensor], select: Hashable | Callable[[Any], Any]) -> None:
        super().__init__()
        if not callable(loss):
            raise TypeError(f"`loss` should be callable as loss(outputs, target). Found `{type(loss).__name__}`.")
        if not callable(select) and not isinstance(select, Hashable):
            raise TypeError(f"`select` should be a key or index of the model's outputs, or a callable "
                            f"select(outputs). Found `{type(select).__name__}`.")
        self.loss = loss  # (an nn.Module is registered as a submodule: its state is in this module's state_dict)
        self.select = select

    def _selected(self, outputs: Any) -> Any:
        if callable(self.select):
            return self.select(outputs)
        try:
            return outputs[self.select]
        except (KeyError, IndexError, TypeError) as exc:
            held = f"keys {list(outputs)}" if isinstance(outputs, dict) else (
                f"{len(outputs)} entries" if isinstance(outputs, (list, tuple)) else f"`{type(outputs).__name__}`")
            raise ValueError(f"OnOutputs: the model's outputs have no {self.select!r} ({type(exc).__name__}: {exc}); "
                             f"they hold {held}. Pass select= a key they have, or a callable select(outputs).") \
                from None

    def forward(self, outputs: Any, target: Any, **kwargs: Any) -> Tensor:
        """``loss(select(outputs), target)``; ``teacher_outputs`` (where ``loss`` takes it) selected too."""
        if kwargs.get("teacher_outputs") is not None:
            kwargs["teacher_outputs"] = self._selected(kwargs["teacher_outputs"])
        return self.loss(self._selected(outputs), target, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # (its own parameters, buffers and submodules: its loss)
        except AttributeError:
            loss = self.__dict__.get("_modules", {}).get("loss", self.__dict__.get("loss"))
            if loss is None or name.startswith("__"):
                raise
        value = getattr(loss, name)  # (what the loss has, read through; an AttributeError where it has none)
        if name == "exit_losses":
            return lambda outputs, target: value(self._selected(outputs), target)
        return value

    def extra_repr(self) -> str:
        return f"select={self.select!r}"


def unwrapped(obj: Any) -> Any:
    """``obj``'s loss where ``obj`` is an :class:`OnOutputs` (through any number of them), else ``obj``."""
    while isinstance(obj, OnOutputs):
        obj = obj.loss
    return obj


def takes_teacher_outputs(fn: Any) -> bool:
    """Whether ``fn`` takes a ``teacher_outputs`` keyword (an :class:`OnOutputs` where its ``loss`` does)."""
    fn = unwrapped(fn)
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return "teacher_outputs" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def has_state(obj: Any) -> bool:
    """Whether ``obj`` is a validation objective with a state the weighter updates (``exit_losses``,
    ``objective`` and ``update``)."""
    return not isinstance(obj, type) and all(callable(_attribute(obj, a)) for a in PER_EXIT)


# (a private name and a public one: a catch-all that refuses private names, as many do for copy and pickle, answers
# the public one; helper-190)
_NO_OBJECTIVE_HAS = ("_metaweight_no_objective_has_this_name", "metaweight_no_objective_has_this_name")


def _declares_state(obj: Any) -> bool:
    """:func:`has_state` for an object a validation objective's code names, less one whose ``__getattr__`` makes up
    a method for any name (a null logger standing in on other ranks, a ``MagicMock``: refused as stateful objectives,
    helper-188): one that answers a name no objective has. A wrapper forwarding the attributes it lacks to an
    objective (``torch.compile``'s module, one's own) counts, as it did (helper-189)."""
    return has_state(obj) and not any(callable(_attribute(obj, name)) for name in _NO_OBJECTIVE_HAS)


def hidden_state(validation: Any) -> tuple[Any, str] | None:
    """A validation objective with a state that ``validation`` names without having its methods itself, and how
    (``None`` where there is none): a bound method of it or whose code names it, a ``functools.partial`` of it, a
    function or lambda whose code (or a lambda's inside it) names it (a closure, a global it loads, a default
    argument), an :class:`OnOutputs` of any of these. Such an objective's ``update`` is never called by the weighter
    (its moving average stays where it is) and its state is not checkpointed. Objects and modules that merely hold
    one (a model keeping a ``BalancedValidation`` for its reports) are not looked into: one called through them is
    seen when it runs (:func:`scored_unseen`)."""
    seen: set[int] = set()

    def held(obj: Any, depth: int) -> tuple[Any, str] | None:
        if id(obj) in seen or depth > 3 or isinstance(obj, (str, bytes, int, float, bool, type(None), Tensor, type)):
            return None
        seen.add(id(obj))
        if depth > 0 and _declares_state(obj):
            # (BalancedValidation with alpha=1, the plain sum of Eq. 10, reads no average: a wrapper hides nothing)
            return None if _attribute(obj, "alpha") == 1.0 else (obj, "")
        inside: list[tuple[str, Any]] = []
        if inspect.ismethod(obj):
            inside.append(("it is a method of it", obj.__self__))
            inside.append(("through a name its method uses", obj.__func__))  # (the method's code: helper-186)
        elif isinstance(obj, functools.partial):
            inside += [("through functools.partial", v) for v in (obj.func, *obj.args, *obj.keywords.values())]
        elif isinstance(obj, OnOutputs):
            inside.append(("through OnOutputs", obj.loss))
        elif inspect.isfunction(obj):
            cells = [c.cell_contents for c in (obj.__closure__ or ()) if _filled(c)]
            names = _globals_used(obj.__code__, obj.__globals__)
            defaults = [*(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()]
            inside += [(f"through a name the function `{obj.__name__}` uses", v) for v in (*cells, *names, *defaults)
                       if not inspect.ismodule(v)]
        for how, value in inside:
            found = held(value, depth + 1)
            if found is not None:
                return found[0], found[1] or how
        return None

    return None if has_state(validation) else held(validation, 0)


_SCORED: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("metaweight_scored", default=None)


def scored(objective: Any) -> None:
    """Note that ``objective`` (a stateful validation objective) computed its objective, where a call of the
    weighter's is watching (:func:`scored_unseen`)."""
    watching = _SCORED.get()
    if watching is not None:
        watching.append(objective)


@contextlib.contextmanager
def scored_unseen() -> Iterator[list[Any]]:
    """Within: the stateful objectives that computed their objective (``BalancedValidation`` with ``alpha`` below
    1), which the weighter's validation objective called without their methods reaching the weighter."""
    found: list[Any] = []
    token = _SCORED.set(found)
    try:
        yield found
    finally:
        _SCORED.reset(token)


def _globals_used(code: types.CodeType, namespace: dict[str, Any]) -> list[Any]:
    """The globals of ``namespace`` that ``code`` and the functions and lambdas defined in it load, from their
    bytecode (``LOAD_GLOBAL``), not attribute names: ``co_names`` holds both, and ``cfg.validation`` named a global
    ``validation`` (helper-186). Any load counts, an attribute read too: ``bv.expected`` is the state itself
    (helper-187). Of a module loaded so (a config module of the user's), the attributes the code reads next, down
    to the first that is not a module (``config.balanced``, helper-188; ``pkg.config.balanced``, helper-189); not
    what ``getattr`` or an import inside the function reaches."""
    used = []
    instructions = list(dis.get_instructions(code))
    for i, instruction in enumerate(instructions):
        if instruction.opname != "LOAD_GLOBAL" or instruction.argval not in namespace:
            continue
        value = namespace[instruction.argval]
        for after in instructions[i + 1:]:
            if not isinstance(value, types.ModuleType) or after.opname not in ("LOAD_ATTR", "LOAD_METHOD"):
                break
            value = vars(value).get(after.argval)  # (the module's own dict: no module __getattr__ run)
        used.append(value)
    for const in code.co_consts:  # (a lambda or function defined inside: helper-186)
        if isinstance(const, types.CodeType):
            used += _globals_used(const, namespace)
    return used


def _attribute(obj: Any, name: str) -> Any:
    """``getattr(obj, name, None)``, whatever a ``__getattr__`` raises (a dict subclass's ``KeyError``)."""
    try:
        return getattr(obj, name, None)
    except Exception:  # (an object's own __getattr__ may raise anything for a name it lacks)
        return None


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # (an empty cell)
        return False
    return True
