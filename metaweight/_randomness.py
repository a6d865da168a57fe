"""The random numbers of a forward: read, compared and replayed, from every generator it can draw from.

A forward draws from the global generators (the CPU one and, on a CUDA device, that device's) and
from any ``torch.Generator`` a module of the model holds (``torch.rand(..., generator=self.g)``).
The look-ahead's extra forwards must draw what the training forward drew, so each of these is
read before it, and rewound to that state for each replay. The modules' generators are found once
per model, by scanning their attributes (directly, or inside a list, tuple or dict).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

_FOUND: weakref.WeakKeyDictionary[nn.Module, tuple[torch.Generator, ...]] = weakref.WeakKeyDictionary()


def model_generators(model: nn.Module) -> tuple[torch.Generator, ...]:
    """The ``torch.Generator`` objects the modules of ``model`` hold, found at the first call."""
    found = _FOUND.get(model)
    if found is None:
        seen: dict[int, torch.Generator] = {}
        for module in model.modules():
            for value in vars(module).values():
                items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) \
                    else (value,)
                for item in items:
                    if isinstance(item, torch.Generator):
                        seen.setdefault(id(item), item)
        found = tuple(seen.values())
        _FOUND[model] = found
    return found


@dataclasses.dataclass(frozen=True)
class RngState:
    """The CPU generator's state, the CUDA device's (host tensors: no synchronisation) and each of the
    model's own generators'."""

    cpu: Tensor
    cuda: Tensor | None
    own: tuple[tuple[torch.Generator, Tensor], ...] = ()


def rng_state(device: torch.device, generators: tuple[torch.Generator, ...] = ()) -> RngState:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return RngState(torch.get_rng_state(), cuda, tuple((g, g.get_state()) for g in generators))


def same_rng_state(a: RngState, b: RngState) -> bool:
    return torch.equal(a.cpu, b.cpu) and (a.cuda is None or b.cuda is None or torch.equal(a.cuda, b.cuda)) and \
        len(a.own) == len(b.own) and all(g is h and torch.equal(s, t) for (g, s), (h, t) in zip(a.own, b.own))


def _set(state: RngState, device: torch.device) -> None:
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda, device)
    for generator, saved in state.own:
        generator.set_state(saved)


@contextmanager
def rewound_to(state: RngState, device: torch.device) -> Iterator[None]:
    """Run the block from the generators' ``state``, then put them back where they were."""
    now = rng_state(device, tuple(g for g, _ in state.own))
    _set(state, device)
    try:
        yield
    finally:
        _set(now, device)


@contextmanager
def replay_randomness(device: torch.device, generators: tuple[torch.Generator, ...] = ()
                      ) -> Iterator[Callable[[], Any]]:
    """Lets later forwards draw the same random numbers (dropout masks) as the first one.

    Yields ``replay``: a context manager that rewinds the generators (the global ones and
    ``generators``) to where they were on entry and, on exit, puts them back where they were. So
    the look-ahead's extra forwards use the very masks of the forward whose gradients they
    differentiate.
    """
    start = rng_state(device, generators)
    yield lambda: rewound_to(start, device)
