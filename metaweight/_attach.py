"""Exits attached to an unmodified model by module name, with forward hooks."""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from metaweight._checks import check_flag, integer_value
from metaweight._multiexit import head_logits
from metaweight._modes import eval_mode, mha_fastpath_off
from metaweight._protocols import ModelCall, note_mapping_misread, wrapper_call

HeadFactory = Callable[[str, Tensor], nn.Module]


def _features(output: Any) -> Tensor:
    """The tensor a module's output carries: itself, or the first tensor of a tuple/list (a
    transformer layer's ``(hidden_states, ...)``), or ``.last_hidden_state``/``.hidden_states``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    for name in ("last_hidden_state", "hidden_states", "logits"):
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"Cannot find the features in a module output of type `{type(output).__name__}`; "
                    f"attach the exit to a module that returns a tensor (or a tuple starting with one).")


def declared_exits(model: nn.Module) -> int | None:
    """How many exits ``model`` says it returns (its ``num_exits``: a :class:`MultiExit`, attached
    exits, or any model given that attribute), or None when it does not say."""
    known = integer_value(getattr(model, "num_exits", None))  # np.int64(2) as well as 2
    return known if known is not None and known > 0 else None


def _logits(output: Any, declared: int | None = None, model_name: str = "model") -> list[Tensor]:
    """The model's own exits: a tensor, ``.logits`` (Hugging Face outputs), a mapping's ``"logits"``; for a list or tuple of
    tensors, the first ``declared`` of them when the model declares its ``num_exits`` (a
    multi-exit model's exits, kept in order; ``num_exits = 1``: ``(logits, extras...)``), else
    its first tensor when the others are of other shapes (``(logits, hidden_states, ...)``). An
    undeclared tuple of several equally shaped tensors (exits? ``(logits, probabilities)``?) is
    refused with a ``ValueError`` saying how to declare it: never guessed."""
    if isinstance(output, Tensor):
        return [output]
    value = getattr(output, "logits", None)
    if isinstance(value, Tensor):
        return [value]
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):  # {"logits": ..., "aux": ...}
        return [output["logits"]]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        tensors = [t for t in output if isinstance(t, Tensor)]
        if declared is not None:
            if len(output) >= declared and all(isinstance(t, Tensor) for t in output[:declared]):
                return list(output[:declared])
            return tensors  # fewer than declared: the caller names the mismatch
        same = [t for t in tensors if t.shape == output[0].shape]
        if len(same) > 1:
            raise ValueError(
                f"`{model_name}` returns a {type(output).__name__} of {len(output)} values, {len(same)} of them "
                f"tensors of one shape {tuple(output[0].shape)}: they could be its exits (shallow to deep) or its "
                f"logits followed by tensors of the same shape (probabilities, hidden states), and metaweight does "
                f"not guess. Declare what it returns: set `model.num_exits = {len(same)}` if they are all exits, "
                f"or `model.num_exits = 1` if only the first is the logits (or make its forward return the logits "
                f"alone, or pass include_output=False and attach the last exit by name).")
        return [output[0]]
    keys = f" (keys {list(output)[:8]}, none of them 'logits')" if isinstance(output, Mapping) else ""
    raise TypeError(f"Cannot find logits in the model's output of type `{type(output).__name__}`{keys}: metaweight "
                    f"reads a tensor, a `.logits` attribute or 'logits' key, or a tuple starting with the logits. "
                    f"Make the forward return one of those, or pass include_output=False and attach the last exit "
                    f"by name.")


def _autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type; False for a type autocast has no mode for (the
    meta device, on which exit_costs counts: ``torch.is_autocast_enabled('meta')`` raises)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


def _head_dtype(model: nn.Module, name: str, features: Tensor) -> torch.dtype | None:
    """The dtype of a head the library builds for the exit after ``name`` where the example forward cannot
    run outside autocast (see :meth:`AttachedExits._plain_dtypes`, the rule otherwise): the features' own,
    which :meth:`AttachedExits._head` requires of a head (a model may hold parameters of several dtypes: a
    float32 input norm before a bfloat16 body). Under autocast the features are of autocast's dtype for
    that call only: then the dtype of the last floating-point parameter the features have passed, as the
    modules are ordered: the module ``name``'s own, else those of the modules before it in each enclosing
    module, nearest first (a ``ReLU`` after a bfloat16 block takes bfloat16, not the dtype of a float32
    input norm at the model's start); the model's first, or the default dtype, where none comes before."""
    if not features.is_floating_point():
        return None
    if not _autocast_on(features.device):
        return features.dtype

    def last(modules: list[nn.Module]) -> torch.dtype | None:
        floats = [p for m in modules for p in m.parameters() if p.is_floating_point()]
        return floats[-1].dtype if floats else None

    parts = name.split(".")
    found = last([model.get_submodule(name)])
    for depth in range(len(parts) - 1, -1, -1):
        if found is not None:
            return found
        parent = model.get_submodule(".".join(parts[:depth]))
        names = [n for n, _ in parent.named_children()]
        before = names[:names.index(parts[depth])] if parts[depth] in names else []
        found = last([getattr(parent, n) for n in before])
    if found is not None:
        return found
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    return first.dtype if first is not None else torch.get_default_dtype()


def _holds_encoder(modules: Mapping[str, nn.Module]) -> bool:
    """Whether the model holds an ``nn.TransformerEncoder``: in eval mode without gradients (early exit,
    ``collect_logits``), torch's fast path turns a batch with a padding mask into a nested tensor for the
    encoder's layers, so their outputs are nested there (padded in training), and the encoder's own has zeros
    at the padded positions (values computed in training). Exits after the encoder or its layers, after a
    module holding it, or after any module its output reaches all read them: which modules run after it is
    not known before the forward, so any exit of such a model runs with the fast path off."""
    return any(isinstance(m, nn.TransformerEncoder) for m in modules.values())


@contextmanager
def _padded_layers(needed: bool) -> Iterator[None]:
    """Turn torch's fast path of ``nn.TransformerEncoder`` (and its layers) off while ``needed``: its
    layers then give the padded outputs training gives, which the heads read. Put back afterwards."""
    if not needed or torch.compiler.is_compiling():
        yield
        return
    with mha_fastpath_off():
        yield


class _StopForward(Exception):
    """Raised from a hook to stop the wrapped model's forward once every sample has left."""


class AttachedExits(nn.Module):
    """A model with exit heads after named modules, its own code unchanged.

    ``forward`` runs the model once; a forward hook on each named module hands that module's
    output (a tensor, or the first tensor of a tuple such as a transformer layer's
    ``(hidden_states, ...)``) to its head. An output changed in place later in the forward
    (``nn.ReLU(inplace=True)`` after the module, ``out += identity``), and a head that changes
    its input in place, are refused with a ``ValueError``: early exit runs the heads as the
    modules return, so the heads would read other values there than in training (seen by version
    counters: not for tensors made under ``torch.inference_mode()``, nor inside a compiled
    forward). The exits of a model holding an ``nn.TransformerEncoder`` run with torch's fast path off
    (put back after): without gradients it would hand the layers a padded batch as a nested tensor and
    put zeros at the padded positions of the encoder's output, which exits after it (or after a module
    holding it, or reading its output) would read where training read the values computed there.
    It returns the heads' logits, shallow to deep,
    followed by the model's own logits when ``include_output`` (a tensor, a Hugging Face
    output's ``.logits``, or the first tensor of a tuple whose other tensors have other shapes,
    such as ``(logits, hidden_states)``). What a model returns is never guessed: a tuple of
    several tensors of one shape (its exits? ``(logits, probabilities)``?) is refused with a
    ``ValueError`` unless the model declares ``num_exits`` (its first ``num_exits`` tensors are
    its exits; ``model.num_exits = 1`` for ``(logits, probabilities)``). A model that returns a list
    of exits and says so (a :class:`MultiExit`, or ``attach_exits`` applied twice) keeps all of them, in its
    order, after the attached ones, which must therefore all run before its first exit (for
    attached exits, the module the first is attached after; for a :class:`MultiExit` or any model
    with ``exit_stages()``, its first head; else the first of a ``heads`` list): a deeper one is
    refused with a ``ValueError``, as it would be numbered before
    shallower exits. Pass ``example_input`` (or give the model a ``num_exits``)
    so that :attr:`num_exits` is known before the first forward. The hooks live only during a
    forward of this wrapper, so ``model`` alone still runs as before, and they work under
    ``torch.func.functional_call`` (the look-ahead). They act for the thread of the call that
    registered them alone: ``model`` alone, or this wrapper, may run in other threads meanwhile
    (threads serving one model), neither firing the other's hooks nor stopped by its early exit;
    a forward that runs a named module in a worker thread of its own is refused, saying so.

    A named module must run once per forward, in the order of ``after``: an exit after a module
    applied twice (a weight-shared block) is refused with a ``ValueError`` naming it and its
    number of calls; modules that run in another order than ``after`` with one naming the order
    they ran in (pass that order); a module the forward skips (a conditional forward) with a
    ``RuntimeError``; exits giving logits of different shapes (another number of classes) with a
    ``ValueError``. With ``example_input`` these are seen when attaching, else at the first forward.
    Heads built by a factory are moved to the device and dtype of the features they read outside
    ``torch.autocast``: under it (whose dtype holds for that call only, and where a head of any floating-point
    dtype runs), the example forward runs again with autocast off, in eval mode without gradients, to see
    that dtype (a bfloat16 model's LayerNorm kept in float32 returns bfloat16 there, so heads after it are
    bfloat16); only for a model that cannot run outside autocast (that forward raises), the dtype of the last
    parameter the features passed: of the module they are attached after, else of the modules before it. Heads
    you pass are used as given, and one whose parameters are of another dtype or device than
    its features (a float32 head on a float64 model) is refused with a ``ValueError`` naming it;
    
    building them, and the shape check on ``example_input``, run in eval mode and give every
    module its own train/eval mode back.

    Real early exit (:class:`EarlyExit`) on such a model stops the forward at the first exit
    after which no sample is left: a batch pays for the deepest exit any of its samples needs.
    Its first call runs the whole forward once to check the structure above, unless
    ``example_input`` was given or the wrapper's own forward already ran.
    Per-sample savings inside a batch need the stages as separate modules
    (:class:`MultiExit`, or a model defining ``exit_stages()``), which a model whose forward
    you do not own cannot give.

    Args:
        model: any ``nn.Module``.
        after: names of submodules (as in ``model.named_modules()``), shallow to deep.
        heads: one module per name, or a factory ``heads(name, features) -> nn.Module`` called
            with an example of that module's output (needs ``example_input``).
        include_output: whether the model's own logits are the last exit (a bool).
        example_input: one batch of inputs, to build heads from a factory and check shapes.

    Raises:
        TypeError: ``include_output`` not a bool; a factory returning something else than a module.
        ValueError: a ``torch.compile``'d model (attach first, then compile); names not in the model,
            heads not one per name, or any of the structural
            faults above (with ``example_input`` when attaching, else at the first forward).

    Example:
        >>> import torch, metaweight as mw
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> model = mw.attach_exits(net, ["1", "3"], lambda name, f: nn.Linear(f.shape[-1], 3),
        ...                         example_input=torch.randn(2, 4))
        >>> [tuple(z.shape) for z in model(torch.randn(5, 4))]
        [(5, 3), (5, 3), (5, 3)]
    """

    def __init__(self, model: nn.Module, after: Sequence[str], heads: Sequence[nn.Module] | HeadFactory, *,
                 include_output: bool = True, example_input: Any = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` should be an nn.Module. Found `{type(model).__name__}`.")
        if isinstance(after, str) or not isinstance(after, Sequence) or not after:
            raise ValueError(f"`after` should be a non-empty list of module names. Found {after!r}.")
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            raise ValueError("`model` is compiled (torch.compile): its compiled forward does not run the forward "
                             "hooks the exits are attached with. Attach the exits first, then compile the result: "
                             "torch.compile(mw.attach_exits(model, after, heads)).")
        modules = dict(model.named_modules())
        for name in after:
            if not isinstance(name, str) or name not in modules or name == "":
                # a wrapper (attach_exits again, DDP, torch.compile) puts the model's names under a prefix
                nested = [n for n in modules if isinstance(name, str) and name and n.endswith("." + name)]
                close = nested or difflib.get_close_matches(str(name), [n for n in modules if n], n=3)
                why = (f" (the names of a wrapped model carry the wrapper's prefix: "
                       f"`{nested[0][: -len(name) - 1]}.`)") if nested else ""
                raise ValueError(f"`{type(model).__name__}` has no submodule named {name!r}"
                                 f"{f'; did you mean {close}?' if close else '.'}{why} Names are those of "
                                 f"model.named_modules().")
        if len(set(after)) != len(after):
            raise ValueError(f"Each module may carry one exit; {list(after)} names one twice.")
        self.model = model
        self.after = list(after)
        self.include_output = check_flag(include_output, "include_output")
        # a multi-exit model (MultiExit, attach_exits again) says how many exits it returns, and so may any model
        self._declared = declared_exits(model)
        self._output_exits = int(self.include_output) * (self._declared or 1)
        self._checked = False  # whether one whole forward showed the structure (order, each module once, classes)
        if callable(heads) and not isinstance(heads, nn.Module):
            if example_input is None:
                raise ValueError("A head factory needs `example_input` to see each module's output.")
            call = wrapper_call(model, (example_input,), {}, "attach_exits(example_input=...)")
            with torch.no_grad(), eval_mode(model):
                captured = self._capture(call)
            plain = self._plain_dtypes(call, captured)
            built = []
            for name in self.after:
                features = captured[name]
                head = heads(name, features)
                if not isinstance(head, nn.Module):
                    raise TypeError(f"The head factory should return an nn.Module; for {name!r} it returned "
                                    f"`{type(head).__name__}`.")
                # a head the factory built on the CPU in float32 goes where the features are, in their dtype
                # outside autocast (see _plain_dtypes; _head_dtype where the model cannot run outside it)
                dtype = plain[name] if plain is not None else _head_dtype(model, name, features)
                built.append(head.to(device=features.device, dtype=dtype))
            heads = built
        heads = list(heads)  # type: ignore[arg-type]
        if len(heads) != len(self.after) or not all(isinstance(h, nn.Module) for h in heads):
            raise ValueError(f"Give one head module per name in `after` ({len(self.after)}). Found {len(heads)}.")
        self.heads = nn.ModuleList(heads)
        if example_input is not None:
            with torch.no_grad(), eval_mode(self):
                self._output_exits = 0 if not self.include_output else None  # type: ignore[assignment]
                self(example_input)  # (the first forward checks the exits and their order)

    def _plain_dtypes(self, call: ModelCall, captured: dict[str, Any]) -> dict[str, torch.dtype | None] | None:
        """The dtype of each exit's features outside autocast, which a head must take: autocast's dtype holds
        for the call under it only, and inside autocast a head of any floating-point dtype runs (autocast
        casts). Without autocast on the features' devices, the features' own (None: not floating point).
        Under it, the example forward runs again with autocast off there (no gradients, eval mode, every
        module's own mode given back, as the first), and each exit's features give the dtype: a float32
        LayerNorm of a bfloat16 model returns bfloat16 there. None where that forward raises (a model that
        runs under autocast only): the caller then falls back on :func:`_head_dtype`."""
        def dtype(features: Tensor) -> torch.dtype | None:
            return features.dtype if features.is_floating_point() else None

        devices = {captured[name].device.type for name in self.after
                   if captured[name].is_floating_point() and _autocast_on(captured[name].device)}
        if not devices:
            return {name: dtype(captured[name]) for name in self.after}
        try:
            with ExitStack() as stack:
                for device_type in sorted(devices):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
                stack.enter_context(torch.no_grad())
                stack.enter_context(eval_mode(self.model))
                cuda = sorted({captured[name].device.index or 0 for name in self.after
                               if captured[name].device.type == "cuda"})
                stack.enter_context(torch.random.fork_rng(devices=cuda))  # (the random numbers as they were)
                outside = self._capture(call)
        except Exception:  # (the model runs under autocast only: the parameters' rule of _head_dtype instead)
            return None
        return {name: dtype(outside[name]) for name in self.after}

    @property
    def num_exits(self) -> int:
        """The attached exits, then the model's own (one, or as many as a multi-exit model returns)."""
        return len(self.after) + self._output_exits

    def _inputs_target(self) -> nn.Module:
        """The model this wrapper passes its inputs to (how a dict of inputs is passed is decided on it)."""
        return self.model

    def _capture(self, call: ModelCall, on_exit: Callable[[int, Tensor], None] | None = None) -> dict[str, Any]:
        """Run the model once with the hooks; ``on_exit(k, features)`` at each attached exit (early exit).

        The hooks see the order the modules run in: ``on_exit`` is called only while it is the
        order of ``after`` with none missing. Once it is not, the forward runs to its end and the
        structure is refused (:meth:`_check_structure`), never answered from the wrong exit."""
        captured: dict[str, Any] = {}
        versions: dict[str, int] = {}  # each named module's output's version as the module returned it
        calls = dict.fromkeys(self.after, 0)
        order: list[str] = []
        modules = dict(self.model.named_modules())
        handles = []
        # the hooks stay on the model's modules while this call runs: they act for this call's thread alone (the
        # model called alone in another thread meanwhile, or this wrapper there, neither fires nor is stopped)
        thread = threading.get_ident()
        elsewhere: set[str] = set()  # the named modules that ran in another thread meanwhile

        def other_thread() -> bool:
            return not torch.compiler.is_compiling() and threading.get_ident() != thread

        def hook_for(index: int, name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if other_thread():
                    elsewhere.add(name)
                    return
                calls[name] += 1
                if calls[name] > 1:  # a module applied twice: which call's features? refused below
                    if on_exit is not None:  # early exit cannot run the rest of the forward to count
                        self._refuse_repeats({name: calls[name]}, at_least=True)
                    return
                captured[name] = _features(output)
                if not torch.compiler.is_compiling() and not captured[name].is_inference():
                    versions[name] = captured[name]._version  # (checked in eager forwards, where a hook runs eagerly)
                order.append(name)
                if on_exit is not None and order == self.after[:len(order)]:
                    on_exit(index, captured[name])
            return hook

        gone = [name for name in self.after if name not in modules]
        if gone:  # (before any hook is registered: nothing to undo)
            self._refuse_gone(gone, modules)
        for index, name in enumerate(self.after):
            handles.append(modules[name].register_forward_hook(hook_for(index, name)))
        # a model that returns several exits of its own, or attached exits (one is an exit too): the attached ones
        # must all run before them (a model of one exit may hold a `heads` list for other uses, an auxiliary head
        # of deep supervision)
        several = self.include_output and ((self._declared or 1) > 1 or isinstance(self.model, AttachedExits))
        first = _first_exit_module(self.model) if several else None
        if first is not None:
            def own_first(module: nn.Module, args: Any, output: Any) -> None:
                if "__own_first__" not in captured and not other_thread():
                    captured["__own_first__"] = len(order)  # attached modules that ran before its first exit
            handles.append(first.register_forward_hook(own_first))
        try:
            with _padded_layers(_holds_encoder(modules)):
                captured["__output__"] = self.model(*call.args, **call.kwargs)
        except (TypeError, AttributeError) as exc:
            note_mapping_misread(self.model, call, exc, "AttachedExits")
            raise
        finally:
            for handle in handles:
                handle.remove()
        self._check_structure(calls, order, elsewhere)
        changed = [name for name, version in versions.items() if captured[name]._version != version]
        if changed:
            raise ValueError(
                f"The output of {changed[0]!r} was changed in place later in the forward of "
                f"`{type(self.model).__name__}` (by an in-place op on it: nn.ReLU(inplace=True) after it, "
                f"`out += identity`, ...), so the head attached after it would read other values in training than in "
                f"early exit, which runs the head as soon as {changed[0]!r} returns. Attach the exit after the module "
                f"that makes the change (the activation, or the whole block), or make that op out of place.")
        before = captured.pop("__own_first__", None)
        if before is not None and before < len(self.after):
            late = self.after[before:]
            fix = ("attach all the exits in one call to the model they wrap: attach_exits(exits.model, after=[every "
                   "name, in the order they run], heads=[...])" if isinstance(self.model, AttachedExits) else
                   "make the new exit one of its stages and heads")
            raise ValueError(f"The modules {late} run after `{type(self.model).__name__}`'s own first exit, so "
                             f"their exits would be numbered before exits shallower than they are (exits go "
                             f"shallow to deep, the attached ones first). Attach only modules that run before its "
                             f"first exit, or {fix}.")
        return captured

    def _refuse_gone(self, gone: list[str], modules: dict[str, nn.Module]) -> None:
        """Refuse a forward after a module an exit is attached after was removed from the model (or
        replaced by one without that submodule) since the exits were attached."""
        exits = ", ".join(f"exit {self.after.index(name) + 1} after {name!r}" for name in gone)
        close = sorted({c for name in gone for c in difflib.get_close_matches(name, [n for n in modules if n], n=3)})
        raise ValueError(f"`{type(self.model).__name__}` has no submodule named {gone[0]!r} any more"
                         f"{f' (nor {gone[1:]})' if len(gone) > 1 else ''}: it was removed or replaced since the "
                         f"exits were attached ({exits}), so those exits have no features. Attach the exits again "
                         f"to the model as it is now, naming modules of model.named_modules()"
                         f"{f' (such as {close})' if close else ''}: mw.attach_exits(model, after=[...], heads=...).")

    def _check_structure(self, calls: dict[str, int], order: list[str], elsewhere: set[str] = frozenset()) -> None:
        """Refuse a forward in which a named module ran twice, not at all, or out of ``after``'s order; one that ran
        only in another thread (``elsewhere``) is said to have."""
        repeated = {name: n for name, n in calls.items() if n > 1}
        if repeated:
            self._refuse_repeats(repeated)
        missing = [n for n in self.after if calls[n] == 0]
        threaded = [n for n in missing if n in elsewhere]
        if threaded:
            raise RuntimeError(f"The modules {threaded} ran in another thread than this forward of "
                               f"`{type(self.model).__name__}` was called in (a thread pool in its forward, "
                               f"nn.DataParallel over several GPUs), or another thread ran the model meanwhile and "
                               f"they did not run in this one. The exits' hooks take the modules run in the thread "
                               f"of the call alone (so that the model can serve other threads at the same time): "
                               f"run the modules exits are attached after in the thread that calls the model (for "
                               f"several GPUs, wrap the AttachedExits in DistributedDataParallel, or in "
                               f"nn.DataParallel, not the model inside it).")
        if missing:
            raise RuntimeError(f"The modules {missing} did not run in this forward of `{type(self.model).__name__}` "
                               f"(a conditional forward?), so their exits have no features; attach exits to modules "
                               f"the forward calls on every input.")
        if order != self.after:
            raise ValueError(f"The attached modules run in the order {order}, but `after` lists them as "
                             f"{self.after}. Exits are numbered in `after`'s order and early exit needs that to be "
                             f"the order they run in: pass after={order} (and the heads in that order).")

    def _refuse_repeats(self, repeated: dict[str, int], at_least: bool = False) -> None:
        calls = ", ".join(f"`{name}` {'at least ' if at_least else ''}{n} times" for name, n in repeated.items())
        raise ValueError(f"An exit is attached after a module that runs more than once in one forward of "
                         f"`{type(self.model).__name__}` ({calls}; e.g. a weight-shared block applied twice), so "
                         f"which call's features it should take is ambiguous. Attach the exit to a module that "
                         f"runs once per forward (wrap each application in its own module).")

    def _check_classes(self, logits: Sequence[Tensor]) -> None:
        shapes = [tuple(z.shape) for z in logits]
        if len(set(shapes)) > 1:
            names = self.after + [f"(model output {k + 1})" for k in range(len(shapes) - len(self.after))]
            raise ValueError(f"The exits give logits of different shapes: "
                             f"{dict(zip(names, shapes))}. Make every head output the model's classes.")

    def _head(self, index: int, features: Tensor) -> Tensor:
        """Head ``index`` on its features, once it is seen to hold parameters of their dtype and device
        (a user's float32 head on a float64 model, a CPU head on a GPU model): refused naming both."""
        head = self.heads[index]
        param = next((p for p in head.parameters() if p.is_floating_point()), None)
        if param is not None and features.is_floating_point():
            autocast = _autocast_on(features.device)
            wrong_dtype = param.dtype != features.dtype and not autocast
            if wrong_dtype or param.device != features.device:
                name = self.after[index]
                raise ValueError(
                    f"The head of exit {index + 1} (after {name!r}) holds {param.dtype} parameters on "
                    f"'{param.device}', but the features of {name!r} are {features.dtype} on '{features.device}'. "
                    f"Heads you pass are used as given: move it, e.g. heads[{index}].to(dtype={features.dtype}, "
                    f"device='{features.device}') (or pass a factory, whose heads follow the features' dtype and "
                    f"device).")
        where = f"AttachedExits (after {self.after[index]!r})"
        if torch.compiler.is_compiling() or features.is_inference():  # (no version to compare)
            return head_logits(head(features), index, head, where)
        version = features._version
        logits = head_logits(head(features), index, head, where)
        if features._version != version:  # early exit runs it inside the forward, whose next layers read them
            raise ValueError(f"The head of exit {index + 1} (after {self.after[index]!r}) changes its input in place "
                             f"(its first layer an nn.ReLU(inplace=True)? an in-place op in its forward?): early exit "
                             f"runs the head inside the model's forward, whose next layers read those features. Make "
                             f"the head's ops out of place (nn.ReLU() rather than nn.ReLU(inplace=True)).")
        return logits

    def _own_exits(self, output: Any) -> list[Tensor]:
        exits = _logits(output, self._declared, type(self.model).__name__)
        if self._declared is not None and len(exits) != self._declared:
            raise ValueError(f"`{type(self.model).__name__}` declares num_exits={self._declared}, but its forward "
                             f"returned {len(exits)} exit(s) (logits tensors) of its own. Set its num_exits to the "
                             f"number of exits its forward returns ({len(exits)}), or make the forward return "
                             f"{self._declared}.")
        if self._output_exits is None:  # the check forward in __init__ learns how many the model gives
            self._output_exits = len(exits)
        elif len(exits) != self._output_exits:
            raise ValueError(f"`{type(self.model).__name__}` returned {len(exits)} exits of its own, but "
                             f"{self._output_exits} were expected when the exits were attached (its num_exits changed since?). "
                             f"Attach the exits again (with example_input=... so attach_exits sees the model's "
                             f"output).")
        return exits

    def forward(self, *args: Any, **kwargs: Any) -> list[Tensor]:
        """The exits' logits: the attached ones in the order of ``after``, then (with ``include_output``)
        the model's own, in the model's order.

        Takes what the model takes: ``model(x)``, ``model(x=x, mask=m)``, ``model(a, b)``, or one
        dict of the forward's keyword arguments (passed as keywords, as the weighter passes a
        batch). A call the model's ``forward`` cannot take is refused with a ``TypeError``
        before it runs.
        """
        captured = self._capture(wrapper_call(self.model, args, kwargs, "AttachedExits"))
        logits = [self._head(k, captured[name]) for k, name in enumerate(self.after)]
        if self.include_output:
            logits.extend(self._own_exits(captured["__output__"]))
        self._check_classes(logits)
        self._checked = True
        return logits

    def run_until(self, inputs: Any, leave: Callable[[int, Tensor], bool]) -> list[Tensor]:
        """Run the forward, calling ``leave(k, logits_k)`` at each attached exit; stop the forward as soon
        as it returns ``True`` (every sample has left). Returns the logits computed so far, the model's
        own exits included when the forward ran to the end (``leave`` is not called for those).

        ``inputs`` is one batch's inputs, passed to the model as :meth:`forward` passes one argument.
        The first call of this wrapper that is not a :meth:`forward` (or the check forward of
        ``example_input``) runs the whole forward, to see that every named module runs once, in
        the order of ``after``, and that the heads give the model's classes; later calls stop
        early, and still refuse a named module that runs out of order or not at all before the stop.
        """
        call = inputs if isinstance(inputs, ModelCall) else wrapper_call(self.model, (inputs,), {},
                                                                         "AttachedExits.run_until")
        if not self._checked:
            # The first call runs the whole forward: a module that runs twice or not at all, exits out of
            # order and heads of other classes are seen only then (an early stop would hide them).
            computed = self.forward(*call.args, **call.kwargs)
            for k in range(len(self.after)):
                if leave(k, computed[k]):
                    return computed[:k + 1]
            return computed
        computed: list[Tensor] = []

        def on_exit(index: int, features: Tensor) -> None:
            computed.append(self._head(index, features))
            self._check_classes(computed)
            if leave(index, computed[-1]):
                raise _StopForward

        try:
            captured = self._capture(call, on_exit)
        except _StopForward:
            return computed
        if self.include_output:
            computed.extend(self._own_exits(captured["__output__"]))
        self._check_classes(computed)
        return computed


def _first_exit_module(model: nn.Module) -> nn.Module | None:
    """The module whose output makes a multi-exit model's first exit: for attached exits, the module
    the first is attached after; for a model with ``exit_stages()`` (``MultiExit``, the examples'
    MSDNet and its ``classifiers``), its first head; else for a model with a ``heads`` list, its first;
    None for other models (their exits' depths are not known)."""
    if isinstance(model, AttachedExits) and model.after:
        try:
            return model.model.get_submodule(model.after[0])
        except AttributeError:  # removed since: the inner forward refuses it, naming it
            return None
    parts = getattr(model, "exit_stages", None)
    if callable(parts):
        try:
            heads = list(parts()[1])
        except Exception:  # (not metaweight's protocol after all: EarlyExit names what it expects)
            heads = []
        if heads and isinstance(heads[0], nn.Module):
            return heads[0]
    heads = getattr(model, "heads", None)
    return heads[0] if isinstance(heads, nn.ModuleList) and len(heads) > 0 else None


def attach_exits(model: nn.Module, after: Sequence[str], heads: Sequence[nn.Module] | HeadFactory, *,
                 include_output: bool = True, example_input: Any = None) -> AttachedExits:
    """Attach exit heads after the named modules of ``model``; see :class:`AttachedExits`.

    Args:
        model: any ``nn.Module``.
        after: names of submodules (as in ``model.named_modules()``), shallow to deep.
        heads: one module per name, or a factory ``heads(name, features) -> nn.Module``.
        include_output: whether the model's own logits are the last exit.
        example_input: one batch of inputs (needed with a factory; checks the shapes).
    """
    return AttachedExits(model, after, heads, include_output=include_output, example_input=example_input)
