"""The model's module tree, walked once per step.

``named_modules()``, ``named_parameters()`` and ``named_buffers()`` walk the whole tree in Python at
every call: on the CIFAR MSDNet (769 modules) about 1-2 ms each on a CPU core, and an exact meta step
asked for 25 such walks (its checks, each forward's ``functional_call``, the generators, the
transaction), which on a GPU is host time beside a few milliseconds of kernels. A :class:`ModelWalk`
is one walk that gives all of them; :func:`walked` keeps one for the length of a call of ``step()``
(or ``meta_step()``), and :func:`walk` returns it there (a new walk elsewhere). The weighter keeps its
last walk to the next call, which takes it again where a pass over the modules' dicts finds the same
names and objects (:meth:`ModelWalk.still_describes`): what the user changed between two steps is seen,
and an unchanged model is not walked anew at every step.

What a forward may change, the walk must not hide: a forward can register a buffer or create a
submodule (a mask built at its first call). The parameters, modules and generators a step reads are
those at its start (a forward that creates them is refused or outside what the look-ahead replays,
as before); the buffers are read from a walk that is current (:func:`current_walk`): the step's own
walk until the tree may have changed, then a new one. The tree is taken to have changed where a
buffer, parameter or submodule was registered (torch's global registration hooks, set while a step
runs: ``register_buffer``, attribute assignment, ``add_module``), where a forward left a module
holding another buffer, submodule or parameter than the walk saw (``del``, a write straight to
``_buffers``: :func:`watched_forward` compares their identities), and where the library wrote the
modules' dicts itself (:func:`tree_changed`). ``torch.func.functional_call``'s swaps write the
dicts under the names they hold and change nothing of the tree.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from torch import Tensor, nn
from torch.nn.modules.module import (register_module_buffer_registration_hook, register_module_module_registration_hook,
                                     register_module_parameter_registration_hook)

_F = TypeVar("_F", bound=Callable[..., Any])


class ModelWalk:
    """One walk over ``model``'s modules (preorder, each module once, as ``named_modules()``).

    Attributes (lists in the order and with the removal of duplicates of torch's ``named_*`` methods):
        modules: ``(name, module)`` pairs, as ``named_modules()``.
        parameters: ``(name, parameter)`` pairs, as ``named_parameters()``.
        buffers: ``(name, buffer)`` pairs, as ``named_buffers()``.
        empty: ``(id(module), name)`` of the buffer slots registered as ``None``.
        mixed: ``(parameter name, buffer name)`` of each tensor held both as a parameter and as a buffer.
        aliases: for each name of :attr:`parameters` and :attr:`buffers`, a name for every slot (module
            and attribute) holding the tensor, itself first (more than one for tied weights); a module used
            twice is one module, its slots named once (through the first name).
        current: ``False`` once a forward may have changed the tree since the walk (:func:`tree_changed`).
        held: the identities of what each module held, its buffers, submodules and parameters in order
            (:meth:`unchanged`).
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
        # a tensor held both as a parameter and as a buffer: no untied map (torch's functional_call refuses it)
        self.mixed = [(first_parameter[k], first_buffer[k]) for k in first_buffer if k in first_parameter]
        self.parameters, self.buffers, self.empty, self.aliases = parameters, buffers, empty, aliases
        # a model that overrides named_parameters / named_buffers (to hide a teacher, say) is read through them
        if type(model).named_parameters is not nn.Module.named_parameters:
            self.parameters = list(model.named_parameters())
        if type(model).named_buffers is not nn.Module.named_buffers:
            self.buffers = list(model.named_buffers())
        self.held = _held(modules)
        self.current = True
        self._generators: list[tuple[str, Any]] | None = None
        self._named_by_model = _lists_its_own(type(model))  # (its lists then come from the model's methods)
        self._slot_of: dict[str, tuple[nn.Module, str, str]] | None = None
        self._embeddings: list[tuple[str, nn.Module]] | None = None

    @property
    def embeddings(self) -> list[tuple[str, nn.Module]]:
        """The ``nn.Embedding`` and ``nn.EmbeddingBag`` modules, by name (found once per walk; whether each
        gives a sparse gradient, its ``sparse`` and its weight's ``requires_grad``, is read by the caller)."""
        if self._embeddings is None:
            self._embeddings = [(name or type(m).__name__, m) for name, m in self.modules
                                if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
        return self._embeddings

    def still_describes(self) -> bool:
        """Whether the walk may stand for a new one of its model (a walk kept from one step to the next): every
        module still holds the very buffers, submodules and parameters under the same names (:meth:`unchanged`),
        and the model does not list its parameters or buffers through methods of its own, whose answer no
        identity shows. A walk that does is made current again, its generators to be looked up anew (a
        generator is a plain attribute, which the identities do not cover). The model's class is read anew, as a
        walk's lists may have come from its methods at the walk or may at this step (no identity shows a
        ``model.__class__`` assigned between steps, or a method patched onto the class)."""
        if self._named_by_model or _lists_its_own(type(self.modules[0][1])) or not self.unchanged():
            return False
        self.current, self._generators = True, None
        return True

    def unchanged(self) -> bool:
        """Whether every module of the walk still holds the very buffers, submodules and parameters it held then
        (under the same slots: a write straight to ``module._buffers`` is seen, as a ``del``)."""
        return self.held == _held(self.modules)

    def generators(self, find: Callable[[list[tuple[str, nn.Module]]], list[tuple[str, Any]]]) -> list[tuple[str, Any]]:
        """``find(self.modules)``, computed once per walk (the generators the modules hold)."""
        if self._generators is None:
            self._generators = find(self.modules)
        return self._generators

    def slots(self, tensors: dict[str, Tensor]) -> list[tuple[Any, str, Tensor]] | None:
        """Where to write ``tensors`` (by the names of :attr:`parameters` and :attr:`buffers`) to run the model on
        them: ``(dict, key, tensor)`` for the slot of every name the tensor is held under (a tied weight's each), the
        dict a module's ``_parameters`` or ``_buffers``, what ``torch.func.functional_call(..., tie_weights=True)``
        swaps in; ``None`` where :meth:`untied` is ``None``. The slots are found once per walk."""
        untied = self.untied(tensors)
        if untied is None:
            return None
        if self._slot_of is None:
            self._slot_of = {}
            for prefix, module in self.modules:
                dot = prefix + "." if prefix else ""
                for kind in ("_parameters", "_buffers"):
                    for leaf in getattr(module, kind).keys():
                        self._slot_of.setdefault(dot + leaf, (module, kind, leaf))
        out: list[tuple[Any, str, Tensor]] = []
        slot_of = self._slot_of
        for name, t in untied.items():
            slot = slot_of.get(name)
            if slot is None:
                return None
            module, kind, leaf = slot
            out.append((getattr(module, kind), leaf, t))  # (read now: the dict a module holds at this call)
        return out

    def untied(self, tensors: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """``tensors`` (by the names of :attr:`parameters` and :attr:`buffers`) with each entry also under
        every other name its tensor is held under (what ``functional_call(..., tie_weights=True)`` finds by
        walking the model); ``None`` if a name is not one of this walk's, or if a tensor is held both as a
        parameter and as a buffer (:attr:`mixed`; :func:`check_single_roles` refuses it)."""
        if self.mixed:
            return None
        out: dict[str, Tensor] = {}
        aliases = self.aliases
        for name, t in tensors.items():
            names = aliases.get(name)
            if names is None:
                return None
            for alias in names:
                out[alias] = t
        return out


def check_single_roles(one: ModelWalk) -> None:
    """Refuse (a ``ValueError``) a model holding one tensor both as a parameter and as a buffer: the look-ahead
    substitutes parameters and copies buffers by name (``torch.func.functional_call``), which cannot give one
    tensor the two roles (torch's own refusal said "got multiple values for keys ..., which are tied")."""
    if one.mixed:
        pairs = ", ".join(f"parameter `{p}` is buffer `{b}`" for p, b in one.mixed)
        raise ValueError(
            f"The model holds a tensor both as a parameter and as a buffer ({pairs}: the same tensor object, e.g. "
            f"register_buffer(name, self.weight)): the look-ahead moves parameters and copies buffers, and cannot "
            f"give one tensor both roles. Hold it once: drop the buffer and read the parameter (or register a copy, "
            f"or keep the alias as a plain attribute), or use backend='higher' with mode='exact'. Nothing was "
            f"changed.")


def _lists_its_own(kind: type) -> bool:
    """Whether a model of class ``kind`` lists its parameters or buffers through methods of its own."""
    return kind.named_parameters is not nn.Module.named_parameters or kind.named_buffers is not nn.Module.named_buffers


def _held(modules: list[tuple[str, nn.Module]]) -> list[int | str]:
    """The names and the ids of the values of each module's ``_buffers``, ``_modules`` and ``_parameters``, in
    order, with each dict's length (so that a value moved from one slot to another, or a slot renamed, is a
    change)."""
    out: list[int | str] = []
    append, extend = out.append, out.extend
    for _, m in modules:
        d = m.__dict__  # (the dicts read straight: this runs at every step, over every module)
        for held in (d["_buffers"], d["_modules"], d["_parameters"]):
            if held:
                append(len(held))
                extend(held.keys())  # (keys(): a TorchScript module's dicts are wrappers, which iterate by index)
                extend(map(id, held.values()))
            else:
                append(0)
    return out


class _Scopes(threading.local):
    """The walks of the enclosing :func:`walked` blocks by ``id(model)``, per thread, and the handles of the
    registration hooks set while there are any."""

    def __init__(self) -> None:
        self.walks: dict[int, ModelWalk] = {}
        self.hooks: list[Any] = []


_scopes = _Scopes()


def _registered(*_: Any) -> None:
    """torch's global registration hook (a buffer, parameter or submodule registered or assigned, anywhere): the
    tree may have changed. Returns ``None``: the value registered is kept."""
    tree_changed()


@contextlib.contextmanager
def walked(model: nn.Module, owner: Any = None) -> Iterator[ModelWalk]:
    """Within the block, :func:`walk` of ``model`` is one walk taken at its start (nested blocks share it), and
    torch's global registration hooks mark the walks stale (:func:`tree_changed`) whenever a buffer, parameter
    or submodule is registered (``register_buffer``, assignment to a module's attribute, ``add_module``).

    With ``owner`` (an object calling into the library at every step, a weighter), the block's last walk is kept
    on it (``owner._kept_walk``) and the next block starts from it where it still describes the model
    (:meth:`ModelWalk.still_describes`: one pass over the modules' dicts, where a new walk is several), so that
    what the user changed between two steps is seen and a model left as it was is not walked again. A block that
    raised leaves the walk kept before it: the next call's check of replaced parameters compares with the last
    call that returned, so that a refusal repeats until the loop is mended (a retried call had run)."""
    key, scopes = id(model), _scopes
    if key in scopes.walks:
        yield scopes.walks[key]
        return
    kept = getattr(owner, "_kept_walk", None) if owner is not None else None
    one = kept if kept is not None and kept.modules[0][1] is model and kept.still_describes() else ModelWalk(model)
    if not scopes.walks:
        scopes.hooks = [hook(_registered) for hook in (register_module_buffer_registration_hook,
                                                        register_module_module_registration_hook,
                                                        register_module_parameter_registration_hook)]
    scopes.walks[key] = one
    returned = False
    try:
        yield one
        returned = True
    finally:
        last = scopes.walks.pop(key, None)
        if owner is not None and returned:  # (a call that raised keeps the walk of the last call that returned: the
            owner._kept_walk = last          # next call compares with it, so a refusal of a replaced parameter repeats)
        if not scopes.walks:
            for handle in scopes.hooks:
                handle.remove()
            scopes.hooks = []


def walk(model: nn.Module) -> ModelWalk:
    """The walk of the enclosing :func:`walked` block (its latest: :func:`current_walk` replaces it once the
    tree changed), else a new one: for the parameters, modules and generators, without checking that the tree
    is unchanged since."""
    return _scopes.walks.get(id(model)) or ModelWalk(model)


def current_walk(model: nn.Module) -> ModelWalk:
    """A walk of the tree as it is now (the block's own while no forward changed the tree since, else a new
    one, which the block then keeps): for the buffers and modules, which a forward may register."""
    walks = _scopes.walks
    one = walks.get(id(model))
    if one is not None and one.current:
        return one
    fresh = ModelWalk(model)
    if one is not None:
        walks[id(model)] = fresh
    return fresh


def tree_changed() -> None:
    """Note that the tree may have changed (a forward registered something, or the library wrote the modules'
    dicts itself, putting back what a refused step built): :func:`current_walk` walks anew. Every block's walk,
    since the model called may be a wrapper (DDP, ``torch.compile``) of the one walked."""
    for one in _scopes.walks.values():
        one.current = False


@contextlib.contextmanager
def watched_forward() -> Iterator[None]:
    """Run a forward of the model inside the block: on exit, a walked module that holds another buffer,
    submodule or parameter than at the walk (registered, assigned, deleted, written straight to
    ``module._buffers`` or ``_modules``, from any thread) makes the walks stale (:meth:`ModelWalk.unchanged`);
    registrations outside forwards are seen by :func:`walked`'s hooks."""
    try:
        yield
    finally:
        if not all(one.unchanged() for one in _scopes.walks.values() if one.current):
            tree_changed()


def walked_call(method: _F) -> _F:
    """Decorate a method of an object with a ``module`` attribute: the call runs inside :func:`walked`, which
    keeps the walk on the object for its next call (the object's pickled state should leave ``_kept_walk``
    out)."""
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        with walked(self.module, self):
            return method(self, *args, **kwargs)
    return call  # type: ignore[return-value]
