"""SGD with momentum plus Adaptive Braking (AB).

Source: A. Venigalla, A. Kosson, V. Chiley, U. Köster, "Adaptive Braking for Mitigating
Gradient Delay", ICML 2020 workshop "Beyond First Order Methods in ML Systems",
arXiv 2007.01397.

Update rule (v in PyTorch's momentum-buffer convention: v accumulates gradients and the
weights move along -v)::

    d   = g + wd * w                       # L2 weight decay folded in, as torch.optim.SGD does
    c   = cos(d, v)   (c := 0 when ||d|| = 0 or ||v|| = 0)
    d~  = (1 - rho * c) * d                # the braking factor lies in [1 - rho, 1 + rho]
    v   = m * v + (1 - dampening) * d~     # first step: v = d~ (torch.optim.SGD convention)
    w   = w - lr * v

``g`` is whatever gradient is handed to the optimizer: under gradient delay it is the *stale*
gradient (computed at the weights of D steps earlier) and ``v`` is the *current* velocity, so
the alignment is measured between the stale gradient and the velocity it is about to be
added to. With ``rho = 0`` the update is torch.optim.SGD(momentum=m, nesterov=False,
dampening, weight_decay) bit for bit (same operations in the same order).

Sign convention: in the buffer convention used here, a gradient pointing against the velocity
(c < 0: the weights overshot a minimum along that direction) is amplified by up to 1 + rho,
which brakes the velocity; a gradient aligned with the velocity is shrunk. With the velocity
kept in the update convention (v' = -v) the same rule reads (1 + rho * cos(g, v')).
The cosine is measured per parameter tensor (``per_tensor=True``, default) or once over all
parameters of a parameter group, flattened and concatenated (``per_tensor=False``).
``rho=1.0`` is the largest value for which the factor never reverses a gradient (factor in
[0, 2]). With noise-free (full-batch) gradients the gradient stays aligned with the velocity,
the factor tends to 1 - rho and training stalls: AB is meant for mini-batch gradients.
Measurements, defaults and tuning advice: docs/algorithms.md §5.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from commlib.errors import ConfigError

__all__ = ["AdaptiveBrakingSGD", "adaptive_braking_sgd_", "braking_cosine", "braking_cosines",
           "braking_factor"]


def _inner_products(grads: Sequence[Tensor], velocities: Sequence[Optional[Tensor]]
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-tensor <g, v>, <g, g>, <v, v> as 1-D tensors (a missing velocity counts as zeros).
    Accumulated in float32, or float64 for float64 inputs."""
    if len(grads) != len(velocities) or not grads:
        raise ConfigError("AB cosine needs equally many (>= 1) gradients and velocities")
    acc = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=acc, device=grads[0].device)
    dots: List[Tensor] = []
    ggs: List[Tensor] = []
    vvs: List[Tensor] = []
    for g, v in zip(grads, velocities):
        gf = g.detach().reshape(-1)
        gf = gf if gf.dtype == acc else gf.to(acc)
        ggs.append(torch.dot(gf, gf))
        if v is None:
            dots.append(zero)
            vvs.append(zero)
        else:
            vf = v.detach().reshape(-1)
            vf = vf if vf.dtype == acc else vf.to(acc)
            dots.append(torch.dot(gf, vf))
            vvs.append(torch.dot(vf, vf))
    return torch.stack(dots), torch.stack(ggs), torch.stack(vvs)


def _cosine(dot: Tensor, gg: Tensor, vv: Tensor) -> Tensor:
    # AB (arXiv 2007.01397): cos(g, v) = <g, v> / (||g|| ||v||). A zero vector makes dot = 0
    # exactly, so dividing by the clamped denominator gives the cos := 0 convention.
    cos = dot / (torch.sqrt(gg) * torch.sqrt(vv)).clamp_min(torch.finfo(dot.dtype).tiny)
    return cos.clamp(-1.0, 1.0)


def braking_cosines(grads: Sequence[Tensor], velocities: Sequence[Optional[Tensor]],
                    per_tensor: bool = True) -> Tensor:
    """cos(g_i, v_i) for every tensor i (``per_tensor=True``), or the one cosine of the
    flattened, concatenated lists repeated for every tensor (``per_tensor=False``).
    Returns a 1-D tensor with one entry per tensor, each in [-1, 1]; an entry is 0 when the
    gradient or the velocity it is measured on is zero (or missing, on the first step)."""
    dot, gg, vv = _inner_products(grads, velocities)
    if per_tensor:
        return _cosine(dot, gg, vv)
    return _cosine(dot.sum(), gg.sum(), vv.sum()).expand(len(grads))


def braking_cosine(grads: Sequence[Tensor], velocities: Sequence[Optional[Tensor]]) -> Tensor:
    """cos(g, v) of the vectors formed by flattening and concatenating ``grads`` and
    ``velocities``, as a 0-dim tensor (one pair gives the per-tensor cosine). 0 when either
    vector is zero (the convention cos := 0 when ||v|| = 0, docs/algorithms.md §5)."""
    return braking_cosines(grads, velocities, per_tensor=False)[0]


def braking_factor(cos: Tensor, rho: float) -> Tensor:
    """The AB gradient scale 1 - rho * cos(g, v) (arXiv 2007.01397; docs/algorithms.md §5.1)."""
    return 1.0 - rho * cos


def _check(lr: float, momentum: float, rho: float, weight_decay: float, dampening: float) -> None:
    if not lr >= 0.0:
        raise ConfigError(f"lr must be >= 0, got {lr}")
    if not momentum > 0.0:
        raise ConfigError(f"Adaptive Braking brakes a velocity: momentum must be > 0, got {momentum}")
    if not rho >= 0.0:
        raise ConfigError(f"rho must be >= 0 (0 is plain SGD with momentum), got {rho}")
    if not weight_decay >= 0.0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    if not 0.0 <= dampening < 1.0:
        raise ConfigError(f"dampening must be in [0, 1), got {dampening}")


@torch.no_grad()
def adaptive_braking_sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    velocities: List[Optional[Tensor]],
    *,
    lr: float,
    momentum: float,
    rho: float,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
    per_tensor: bool = True,
) -> List[Tensor]:
    """One AB step on plain tensors, in place: updates ``params`` and ``velocities``
    (``None`` entries are created). Returns the braking factor used for every tensor.

    This is the functional core shared by :class:`AdaptiveBrakingSGD` and the parameter
    server, which holds its model as plain tensors.
    """
    _check(lr, momentum, rho, weight_decay, dampening)
    if not (len(params) == len(grads) == len(velocities)):
        raise ConfigError("params, grads and velocities must have the same length")
    # torch.optim.SGD: d = g + wd * w (L2 term inside the gradient, before momentum).
    d_list = [g if weight_decay == 0 else g.add(p, alpha=weight_decay)
              for p, g in zip(params, grads)]
    if rho == 0.0 or not d_list:
        factors: List[Optional[Tensor]] = [None] * len(d_list)
    else:
        cos = braking_cosines(d_list, velocities, per_tensor)
        factors = list(braking_factor(cos, rho).unbind())
    used: List[Tensor] = []
    one: Optional[Tensor] = None
    for i, (p, d, f) in enumerate(zip(params, d_list, factors)):
        if f is not None:
            # AB (arXiv 2007.01397): g~ = (1 - rho cos(g, v)) g
            d = d.mul(f if f.dtype == d.dtype else f.to(d.dtype))
        else:
            one = torch.ones((), device=p.device) if one is None else one
            f = one
        buf = velocities[i]
        if buf is None:
            buf = d.detach().clone()  # torch.optim.SGD: first step v = d, no dampening
            velocities[i] = buf
        else:
            buf.mul_(momentum).add_(d, alpha=1 - dampening)  # v <- m v + (1 - dampening) g~
        p.add_(buf, alpha=-lr)  # w <- w - lr v
        used.append(f)
    return used


class AdaptiveBrakingSGD(torch.optim.Optimizer):
    """SGD with (heavy-ball) momentum plus Adaptive Braking (arXiv 2007.01397).

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: learning rate.
        momentum: momentum factor m (> 0).
        rho: braking strength; 0 gives ``torch.optim.SGD`` exactly. Default 1.0, the largest
            value that never reverses a gradient (docs/algorithms.md §5.3).
        weight_decay: L2 penalty folded into the gradient before braking, as in torch's SGD.
        dampening: as in ``torch.optim.SGD``.
        per_tensor: cosine per parameter tensor (True) or one cosine over the whole group.

    State per parameter: ``momentum_buffer`` (same name and meaning as torch's SGD, so a
    state dict of either optimizer loads into the other) and ``braking_factor`` (the last
    factor 1 - rho cos, a 0-dim tensor, for diagnostics).

    Example::

        opt = AdaptiveBrakingSGD(model.parameters(), lr=0.05, momentum=0.9, rho=1.0)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        rho: float = 1.0,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        per_tensor: bool = True,
    ) -> None:
        _check(lr, momentum, rho, weight_decay, dampening)
        defaults = dict(lr=lr, momentum=momentum, rho=rho, weight_decay=weight_decay,
                        dampening=dampening, per_tensor=bool(per_tensor))
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        """Also runs on ``load_state_dict``: a torch.optim.SGD state dict lacks ``rho`` and
        ``per_tensor`` (taken from this optimizer's defaults); SGD options AB does not
        implement are refused rather than silently ignored."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key in ("rho", "per_tensor", "dampening", "weight_decay"):
                group.setdefault(key, self.defaults[key])
            if group.get("nesterov") or group.get("maximize"):
                raise ConfigError("AdaptiveBrakingSGD implements neither nesterov nor maximize")
            _check(group["lr"], group["momentum"], group["rho"], group["weight_decay"],
                   group["dampening"])

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One AB update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: List[Tensor] = []
            grads: List[Tensor] = []
            bufs: List[Optional[Tensor]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ConfigError("AdaptiveBrakingSGD does not support sparse gradients")
                params.append(p)
                grads.append(p.grad)
                bufs.append(self.state[p].get("momentum_buffer"))
            if not params:
                continue
            factors = adaptive_braking_sgd_(
                params, grads, bufs, lr=group["lr"], momentum=group["momentum"],
                rho=group["rho"], weight_decay=group["weight_decay"],
                dampening=group["dampening"], per_tensor=group["per_tensor"],
            )
            for p, buf, f in zip(params, bufs, factors):
                self.state[p]["momentum_buffer"] = buf
                self.state[p]["braking_factor"] = f
        return loss
