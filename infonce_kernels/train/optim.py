"""Optimisers (LARS, SGD, AdamW) and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["LARS", "OPTIMIZERS", "build_optimizer", "warmup_cosine"]

OPTIMIZERS = ("lars", "sgd", "adamw")


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by SimCLR: SGD with momentum whose update of each weight
    tensor is rescaled by the trust ratio ``eta * ||w|| / ||g + wd * w||``.

    Parameter groups with ``lars_exclude=True`` (biases, BatchNorm parameters, the temperature)
    get neither weight decay nor the trust-ratio adaptation, as in SimCLR.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001, nesterov=False):
        if lr < 0:
            raise ValueError(f"--lr must be >= 0, got {lr}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom, eta, exclude = group["weight_decay"], group["momentum"], group["eta"], group["lars_exclude"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not exclude:
                    if wd:
                        d = d.add(p, alpha=wd)
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), eta * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d.mul(trust)
                if mom:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.detach().clone()
                    else:
                        buf.mul_(mom).add_(d)
                    d = d.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(d, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float):
    """Weights (ndim > 1) get weight decay; biases, norm parameters and scalars do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, lars_exclude=False)]
    if no_decay:
        groups.append(dict(params=no_decay, weight_decay=0.0, lars_exclude=True))
    return groups


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9):
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for g in groups:
        g.pop("lars_exclude")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"--optimizer: unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def warmup_cosine(total_steps: int, warmup_steps: int, final_ratio: float = 0.0):
    """lr multiplier: linear warm-up from 1/warmup to 1, then cosine decay to ``final_ratio``."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
