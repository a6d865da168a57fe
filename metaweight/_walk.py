"""The model's module tree, walked once per step.

``named_modules()``, ``named_parameters()`` and ``named_buffers()`` walk the whole tree in Python at
every call: on the CIFAR MSDNet (769 modules) about 1-2 ms each on a CPU core, and an exact meta step
asked for 25 such walks (its checks, each forward's ``functional_call``, the generators, the
transaction), which on a GPU is host time beside a few milliseconds of kernels. A :class:`ModelWalk`
is one walk that gives all of them; :func:`walked` keeps one for the length of a call of ``step()``
(or ``meta_step()``), and :func:`walk` returns it there (a new walk elsewhere).

What a forward may change, the walk must not hide: a forward can register a buffer or create a
submodule (a mask built at its first call). The parameters, modules and generators a step reads are
those at its start (a forward that creates them is refused or outside what the look-ahead replays,
as before); the buffers are read from a walk taken since the last forward (:func:`buffers_walk`: the
step's own walk until one of the library's forwards runs, :func:`forward_ran`, then a new one).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from torch import Tensor, nn

_F = TypeVar("_F", bound=Callable[..., Any])


class ModelWalk:
    """One walk over ``model``'s modules (preorder, each module once, as ``named_modules()``).

    Attributes (lists in the order and with the removal of duplicates of torch's ``named_*`` methods):
        modules: ``(name, module)`` pairs, as ``named_modules()``.
        parameters: ``(name, parameter)`` pairs, as ``named_parameters()``.
        buffers: ``(name, buffer)`` pairs, as ``named_buffers()``.
        empty: ``(id(module), name)`` of the buffer slots registered as ``None``.
        aliases: for each name of :attr:`parameters` and :attr:`buffers`, a name for every slot (module
            and attribute) holding the tensor, itself first (more than one for tied weights); a module used
            twice is one module, its slots named once (through the first name).
        current: ``False`` once a forward of the library ran since the walk (see :func:`forward_ran`).
    """

    def __init__(self, model: nn.Module) -> None:
        modules: list[tuple[str, nn.Module]] = []
        seen = {id(model)}
        append, add = modules.append, seen.add

        def visit(prefix: str, module: nn.Module) -> None:  # (recursive, as named_modules: its order)
            append((prefix, module))
            dot = prefix + "." if prefix else ""
            for name, child in module._modules.items():
                if child is not None and id(child) not in seen:
                    add(id(child))
                    visit(dot + name, child)

        visit("", model)
        self.modules = modules
        parameters: list[tuple[str, Tensor]] = []
        buffers: list[tuple[str, Tensor]] = []
        empty: set[tuple[int, str]] = set()
        aliases: dict[str, list[str]] = {}
        first_parameter: dict[int, str] = {}
        first_buffer: dict[int, str] = {}  # (each kind has its own memo, as torch's named_* methods)
        for prefix, module in modules:
            held, kept = module._parameters, module._buffers
            if not held and not kept:
                continue
            dot = prefix + "." if prefix else ""
            for leaf, t in held.items():
                if t is not None:
                    name = dot + leaf
                    known = first_parameter.get(id(t))
                    if known is None:
                        first_parameter[id(t)] = name
                        parameters.append((name, t))
                        aliases[name] = [name]
                    else:
                        aliases[known].append(name)
            for leaf, t in kept.items():
                if t is None:
                    empty.add((id(module), leaf))
                    continue
                name = dot + leaf
                known = first_buffer.get(id(t))
                if known is None:
                    first_buffer[id(t)] = name
                    buffers.append((name, t))
                    aliases[name] = [name]
                else:
                    aliases[known].append(name)
        self.parameters, self.buffers, self.empty, self.aliases = parameters, buffers, empty, aliases
        self.current = True
        self._generators: list[tuple[str, Any]] | None = None

    def generators(self, find: Callable[[list[tuple[str, nn.Module]]], list[tuple[str, Any]]]) -> list[tuple[str, Any]]:
        """``find(self.modules)``, computed once per walk (the generators the modules hold)."""
        if self._generators is None:
            self._generators = find(self.modules)
        return self._generators

    def untied(self, tensors: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """``tensors`` (by the names of :attr:`parameters` and :attr:`buffers`) with each entry also under
        every other name its tensor is held under (what ``functional_call(..., tie_weights=True)`` finds by
        walking the model); ``None`` if a name is not one of this walk's."""
        out: dict[str, Tensor] = {}
        aliases = self.aliases
        for name, t in tensors.items():
            names = aliases.get(name)
            if names is None:
                return None
            for alias in names:
                out[alias] = t
        return out


class _Scopes(threading.local):
    """The walks of the enclosing :func:`walked` blocks by ``id(model)``, per thread."""

    def __init__(self) -> None:
        self.walks: dict[int, ModelWalk] = {}


_scopes = _Scopes()


@contextlib.contextmanager
def walked(model: nn.Module) -> Iterator[ModelWalk]:
    """Within the block, :func:`walk` of ``model`` is one walk taken at its start (nested blocks share it)."""
    key, walks = id(model), _scopes.walks
    if key in walks:
        yield walks[key]
        return
    walks[key] = one = ModelWalk(model)
    try:
        yield one
    finally:
        walks.pop(key, None)


def walk(model: nn.Module) -> ModelWalk:
    """The walk of the enclosing :func:`walked` block, else a new one: for the parameters, modules and
    generators (as at the block's start)."""
    return _scopes.walks.get(id(model)) or ModelWalk(model)


def buffers_walk(model: nn.Module) -> ModelWalk:
    """A walk taken since the last :func:`forward_ran` (the block's own if no forward ran since it, else a
    new one, which the block then keeps): for the buffers, which a forward may register."""
    walks = _scopes.walks
    one = walks.get(id(model))
    if one is not None and one.current:
        return one
    fresh = ModelWalk(model)
    if one is not None:
        walks[id(model)] = fresh
    return fresh


def forward_ran() -> None:
    """Note that one of the library's forwards ran (it may have registered buffers): :func:`buffers_walk` walks
    anew. Every block's walk, since the model called may be a wrapper (DDP, ``torch.compile``) of the one walked."""
    for one in _scopes.walks.values():
        one.current = False


def walked_call(method: _F) -> _F:
    """Decorate a method of an object with a ``module`` attribute: the call runs inside :func:`walked`."""
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        with walked(self.module):
            return method(self, *args, **kwargs)
    return call  # type: ignore[return-value]
