r"""Gradient clipping by norm, declared to the weighter and differentiated in closed form.

``torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type)`` maps the gradients :math:`u`
(all of them, as one vector) to

.. math::
    T(u) = c\,u, \qquad c = \min\Big(1, \frac{M}{\lVert u\rVert_p + 10^{-6}}\Big),

whose Jacobian, when it clips (:math:`c < 1`), is

.. math::
    J_T = c\,\big(I - \rho\, u\, q^\top / \lVert u\rVert_p\big), \qquad
    q = \nabla \lVert u\rVert_p = \mathrm{sign}(u)\,\big(|u| / \lVert u\rVert_p\big)^{p-1}, \qquad
    \rho = \frac{\lVert u\rVert_p}{\lVert u\rVert_p + 10^{-6}} = \frac{\lVert T(u)\rVert_p}{M},

(for :math:`p = \infty`, :math:`q` is :math:`\mathrm{sign}(u)` on the entries of largest magnitude,
shared among ties), and :math:`J_T = I` when it does not. :math:`q` and :math:`u / \lVert u\rVert_p`
do not change when :math:`u` is rescaled, so any positive multiple of :math:`u` (the gradients
before unscaling, or after clipping) gives the same map.

From one observed step a common rescale by a factor below 1 fits some ``max_norm`` of *every*
norm, and a plain ``p.grad.mul_(c)`` too, each with another Jacobian: which one the loop took
cannot be read from the gradients. So the clipping is declared (:class:`ClipGradNorm`) and the
declaration is checked: a step it clipped has :math:`\lVert T(u)\rVert_p = M\rho`, within
:math:`10^{-6}` of :math:`M`; one it did not clip has :math:`\lVert T(u)\rVert_p \le M`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from metaweight._checks import real_option

EPSILON = 1e-6  # torch.nn.utils.clip_grad_norm_ divides by the total norm + 1e-6


def check_max_norm(value: object, name: str) -> float:
    """The one check of a clipping's ``max_norm``, named as the user passed it: ``max_norm`` of
    :class:`ClipGradNorm`, or a weighter's ``clip_grad_norm`` given as a number."""
    return real_option(value, name, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


@dataclasses.dataclass(frozen=True)
class ClipGradNorm:
    r"""Clipping of all gradients by their total norm, as ``torch.nn.utils.clip_grad_norm_`` does it.

    Declares the clipping to :class:`HarmonizedWeighter` (``clip_grad_norm=``) with ``mode="fast"``,
    so that the meta-gradient is that of the clipped step: :meth:`HarmonizedWeighter.step` clips
    the gradients so before its optimizer step, and in your own loop (``loss()``, backward,
    ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)``, ``optimizer.step()``,
    ``meta_step``) the weighter checks that the step it watched was clipped so, and refuses it
    otherwise. The gradients are multiplied by
    :math:`c = \min(1, M / (\lVert g\rVert_p + 10^{-6}))`; where :math:`c < 1` the meta-gradient
    goes through the Jacobian of that map (:mod:`metaweight._clipping`).

    Args:
        max_norm: :math:`M`, the largest total norm of the gradients (PyTorch's ``max_norm``).
        norm_type: :math:`p`, the norm: a number ``>= 1`` or ``float("inf")`` (PyTorch's ``norm_type``).

    Example:
        >>> import torch, metaweight as mw
        >>> clip = mw.ClipGradNorm(1.0, norm_type=float("inf"))
        >>> w = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
        >>> w.grad = torch.tensor([3.0, -4.0])
        >>> float(clip([w]))  # the total norm before clipping, as torch returns it
        4.0
        >>> [round(g, 4) for g in w.grad.tolist()]
        [0.75, -1.0]
    """

    max_norm: float
    norm_type: float = 2.0

    def __post_init__(self) -> None:
        max_norm, norm_type = self.max_norm, self.norm_type
        max_norm = check_max_norm(max_norm, "max_norm")
        if isinstance(norm_type, str) and norm_type.lower() in ("inf", "+inf"):
            norm_type = math.inf
        norm_type = real_option(norm_type, "norm_type", "a number >= 1 or float('inf') (the norms whose clipping "
                                "the weighter differentiates)", lambda v: v >= 1)
        object.__setattr__(self, "max_norm", max_norm)
        object.__setattr__(self, "norm_type", norm_type)

    def __call__(self, parameters: Iterable[Tensor]) -> Tensor:
        """Clip the gradients of ``parameters`` in place; returns their total norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(parameters, self.max_norm, self.norm_type)

    def describe(self) -> str:
        norm = "float('inf')" if math.isinf(self.norm_type) else f"{self.norm_type:g}"
        return f"clip_grad_norm_(max_norm={self.max_norm:g}, norm_type={norm})"


@dataclasses.dataclass(frozen=True)
class ClippingHints:
    """What ``mode="fast"``'s refusals of a step clipped otherwise than declared tell the user to change, by how the
    weighter was built: a loop of one's own (the defaults), or an integration that declares the clipping it
    configures (:mod:`metaweight.lightning`: the Trainer's ``gradient_clip_val``)."""

    not_clipped: str = "Clip them so after backward, or build the weighter with the clipping your loop does."
    other: str = ("Build the weighter with the max_norm and norm_type your loop clips by, and clip nothing else; with "
                  "gradient accumulation, divide each micro-batch's loss by their number (undivided or multiplied "
                  "losses under a declared clipping are not read).")
    undeclared: str = ("If it is torch.nn.utils.clip_grad_norm_, declare it: build the weighter with "
                       "clip_grad_norm=mw.ClipGradNorm(max_norm, norm_type); for a rescale of your own, scale the loss "
                       "before backward (or the learning rate) instead.")


def total_norm(tensors: Sequence[Tensor | None], norm_type: float) -> Tensor:
    """The norm of all ``tensors`` as one vector, in float64, on their device (no host read): each tensor's norm
    summed in float64, as float32 squares overflow past about 1e19 (a GradScaler's scaled gradients) and
    underflow below about 1e-19."""
    present = [t for t in tensors if t is not None]
    if not present:
        return torch.zeros((), dtype=torch.float64)
    norms = torch.stack([n.to(present[0].device) for n in torch._foreach_norm(present, norm_type,
                                                                               dtype=torch.float64)])
    return torch.linalg.vector_norm(norms, norm_type)


def clip_transpose(direction: dict[str, Tensor], names: Sequence[str], seen: Sequence[Tensor | None],
                   s: Tensor | float, rho: Tensor | float, norm_type: float) -> dict[str, Tensor]:
    r""":math:`J_T^\top w = s\,(w - \rho\, q\, \langle u, w\rangle / \lVert u\rVert_p)`, the transpose of
    norm clipping's Jacobian applied to ``direction`` (:math:`w`): ``seen`` is :math:`u` (any positive
    multiple of it) by parameter name, ``s`` the rescale the step used, ``rho`` as in the module's
    docstring (0 where the clipping was inactive)."""
    pairs = [(n, g.double()) for n, g in zip(names, seen) if g is not None and n in direction]
    vs = [g for _, g in pairs]
    norm = total_norm(vs, norm_type)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    if math.isinf(norm_type):
        top = [(g.abs() == norm).double() for g in vs]
        count = sum((t.sum() for t in top), torch.zeros((), dtype=torch.float64, device=norm.device))
        qs = [torch.sign(g) * t / torch.where(count > 0, count, 1.0) for g, t in zip(vs, top)]
    else:
        qs = [torch.sign(g) * (g.abs() / safe) ** (norm_type - 1) for g in vs]
    dot = sum(((direction[n].double() * g).sum() for n, g in pairs), torch.zeros((), dtype=torch.float64,
                                                                                    device=norm.device))
    along = torch.where(norm > 0, rho * dot / safe, torch.zeros_like(norm))
    q_of = {n: q for (n, _), q in zip(pairs, qs)}
    out = {}
    for n, w in direction.items():
        moved = w.double() - along * q_of[n] if n in q_of else w.double()
        out[n] = (s * moved).to(w.dtype)
    return out
