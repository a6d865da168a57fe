"""The random numbers of a forward: read, compared and replayed, from every generator it can draw from.

A forward draws from the global generators (the CPU one and, on a CUDA device, that device's; NumPy's
global ``np.random`` state and Python's ``random`` module, for models that draw from them) and from
any ``torch.Generator`` a module of the model holds (``torch.rand(..., generator=self.g)``). The
look-ahead's extra forwards must draw what the training forward drew, so each of these is read
before it, and rewound to that state for each replay. The modules' generators are found at every
call, by scanning their attributes (directly, inside lists, tuples, sets and dicts, nested, or as
an attribute of a plain object a module holds, ``self.helper.g``), so a generator re-created
between iterations is the one read. What cannot be seen: a generator deeper in other objects
(``self.helper.inner.g``), in a container of more than 64 entries, or a
``numpy.random.Generator``; a generator that first
appears during a forward (created lazily) is seen, but not the state it started from, and is refused
(:data:`NEW_GENERATOR`).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import filterfalse
from typing import Any

import torch
from torch import Tensor, nn

from metaweight._walk import current_walk, walk

try:  # NumPy is optional for torch; its global state is read only where it is installed
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]

_DEPTH = 4  # containers inside containers, as deep as this
NEW_GENERATOR = ("A torch.Generator the model holds ({names}) was created or replaced during the training forward "
                 "(e.g. lazily, on its first use): the state it started that forward from is unknown, so the "
                 "look-ahead cannot draw that forward's random numbers again. Create the generator before the "
                 "forward (e.g. in __init__; re-seeding it between iterations with manual_seed is fine). gamma is "
                 "unchanged.")


_GENERATOR = torch.Generator
_CONTAINERS = (list, tuple, set, frozenset, dict)
_WIDE = 64  # a container or object with more entries than this holds no generator we look for (and costs)
_PLAIN = {type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size}
_INTERNAL = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping: parameters, buffers, hooks


def _generators_in(value: Any, depth: int, found: dict[int, tuple[str, torch.Generator]], name: str) -> None:
    kind = type(value)  # type tests: isinstance(x, torch.Generator) goes through a slow metaclass check
    if kind is _GENERATOR:
        found.setdefault(id(value), (name, value))
    elif depth <= 0 or kind in _PLAIN:
        return
    elif kind in _CONTAINERS or isinstance(value, _CONTAINERS):
        if len(value) <= _WIDE:
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                _generators_in(item, depth - 1, found, f"{name}[{key!r}]")
    elif not isinstance(value, (nn.Module, Tensor, type, types.ModuleType, types.FunctionType, types.MethodType,
                                types.BuiltinFunctionType, functools.partial)):
        attributes = getattr(value, "__dict__", None)  # a plain object a module holds (a helper): one level
        if type(attributes) is dict and len(attributes) <= _WIDE:
            for attr, item in attributes.items():
                if type(item) is _GENERATOR or isinstance(item, _CONTAINERS):
                    _generators_in(item, min(depth - 1, 1), found, f"{name}.{attr}")


def _generators_of(modules: list[tuple[str, nn.Module]]) -> list[tuple[str, torch.Generator]]:
    found: dict[int, tuple[str, torch.Generator]] = {}
    plain, internal = _PLAIN, _INTERNAL.__contains__
    for prefix, module in modules:
        attributes = vars(module)
        # (each module's own attributes, in order, nn.Module's bookkeeping left out in C; a tuple of plain values,
        # a convolution's kernel_size and strides, passed over without a call per entry: the CIFAR MSDNet's 770
        # modules in half the time, and this runs twice per meta step)
        for attr in filterfalse(internal, attributes):
            value = attributes[attr]
            kind = type(value)
            if kind in plain or (kind is tuple and plain.issuperset(map(type, value))):
                continue
            _generators_in(value, _DEPTH, found, f"{prefix}.{attr}" if prefix else attr)
    return list(found.values())


def model_generators(model: nn.Module) -> tuple[torch.Generator, ...]:
    """The ``torch.Generator`` objects the modules of ``model`` hold, found anew at each call (once per
    call of ``step()``: :func:`metaweight._walk.walk`)."""
    return tuple(g for _, g in walk(model).generators(_generators_of))


def new_generators(model: nn.Module, known: tuple[torch.Generator, ...]) -> list[str]:
    """Where ``model`` holds generators that are not among ``known`` (created or replaced since): the modules'
    attributes read anew, over the modules of a walk that is current (:func:`metaweight._walk.current_walk`)."""
    ids = {id(g) for g in known}
    return [name for name, g in _generators_of(current_walk(model).modules) if id(g) not in ids]


def _numpy_state() -> Any:
    return np.random.get_state() if np is not None else None


def _same_numpy(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and a[2:] == b[2:] and bool(np.array_equal(a[1], b[1]))


@dataclasses.dataclass(frozen=True)
class RngState:
    """The CPU generator's state, the CUDA device's (host tensors: no synchronisation), each of the
    model's own generators', NumPy's global state and Python's ``random``'s."""

    cpu: Tensor
    cuda: Tensor | None
    own: tuple[tuple[torch.Generator, Tensor], ...] = ()
    numpy: Any = None
    python: Any = None


def rng_state(device: torch.device, generators: tuple[torch.Generator, ...] = ()) -> RngState:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return RngState(torch.get_rng_state(), cuda, tuple((g, g.get_state()) for g in generators), _numpy_state(),
                    random.getstate())


def same_rng_state(a: RngState, b: RngState) -> bool:
    return torch.equal(a.cpu, b.cpu) and (a.cuda is None or b.cuda is None or torch.equal(a.cuda, b.cuda)) and \
        len(a.own) == len(b.own) and all(g is h and torch.equal(s, t) for (g, s), (h, t) in zip(a.own, b.own)) and \
        _same_numpy(a.numpy, b.numpy) and a.python == b.python


def set_rng_state(state: RngState, device: torch.device) -> None:
    """Put every generator in ``state`` back to it."""
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda, device)
    for generator, saved in state.own:
        generator.set_state(saved)
    if state.numpy is not None:
        np.random.set_state(state.numpy)
    if state.python is not None:
        random.setstate(state.python)


@contextmanager
def rewound_to(state: RngState, device: torch.device) -> Iterator[None]:
    """Run the block from the generators' ``state``, then put them back where they were."""
    now = rng_state(device, tuple(g for g, _ in state.own))
    set_rng_state(state, device)
    try:
        yield
    finally:
        set_rng_state(now, device)


@contextmanager
def replay_randomness(device: torch.device, generators: tuple[torch.Generator, ...] = (),
                      model: nn.Module | None = None, *, rewind_on_error: bool = False
                      ) -> Iterator[Callable[[], Any]]:
    """Lets later forwards draw the same random numbers (dropout masks) as the first one.

    Yields ``replay``: a context manager that rewinds the generators (the global ones and
    ``generators``) to where they were on entry and, on exit, puts them back where they were. So
    the look-ahead's extra forwards use the very masks of the forward whose gradients they
    differentiate. With ``model``, ``replay`` first refuses (``ValueError``) a generator the model
    holds that was not there on entry: the first forward created or replaced it, from a state that
    cannot be rewound to. With ``rewind_on_error``, a block that raises leaves the generators where
    they were on entry (its draws undone).
    """
    start = rng_state(device, generators)

    def replay() -> Any:
        if model is not None:
            appeared = new_generators(model, generators)
            if appeared:
                raise ValueError(NEW_GENERATOR.format(names=", ".join(appeared)))
        return rewound_to(start, device)

    try:
        yield replay
    except BaseException:
        if rewind_on_error:
            set_rng_state(start, device)
        raise
