"""What every loss shares: the two-view set-up, the positive logit, the temperature, the module
base class and the docstring pieces of the common arguments.

Only O(N d) work happens in the losses (normalisation, the positive logits); the O(N^2 d) part
is the fused op (:func:`infonce_kernels.ops.fused_lse`), so no N x N tensor exists in any loss.
"""

import string

import torch
import torch.nn.functional as F

from .. import _validation as v
from .. import distributed
from ..ops import Exclusion, accumulation_dtype, fused_lse

__all__ = ["l2_normalize", "row_dot", "inverse_temperature", "check_views", "two_views", "pair_lse",
           "reduce_rows", "rank_rows", "LossModule", "ARGS", "shared_doc"]

# Docstring pieces of the arguments every loss shares, written once and filled into the
# docstrings by :func:`shared_doc` where they say $temperature, $backend, ...
ARGS = {
    "temperature": "tau > 0: a float, a one-element tensor (learnable), or a temperature module "
                   "(``LearnableTemperature``, whose parameter then trains, or a schedule of "
                   ":mod:`infonce_kernels.temperature`, read at its current step).",
    "views": "(B, d) embeddings of two views of the same B samples, B >= 2; float16, bfloat16, "
             "float32 or float64 on one device.",
    "normalize": "L2-normalise the rows first (cosine similarity).",
    "reduction_2b": '"mean" | "sum" over the 2B anchors, or "none" for the (2B,) per-anchor losses '
                    "ordered [anchors of z1; anchors of z2].",
    "backend": "see :func:`infonce_kernels.lse`.",
    "gather": "each rank's rows are anchors against the rows of every rank of ``group`` (default: "
              "the world), with the O(N)-traffic backward and the loss convention of "
              ":mod:`infonce_kernels.distributed`.",
    "returns": "A 0-d tensor (or the per-anchor losses for \"none\"), float32 (float64 for float64 "
               "inputs), in nats.",
}


def shared_doc(fn):
    """Fills the shared argument descriptions of :data:`ARGS` into ``fn``'s docstring."""
    fn.__doc__ = string.Template(fn.__doc__).safe_substitute(ARGS)
    return fn


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, ``x / max(||x||, eps)``; the norm is taken in float32 (or
    float64).

    eps is 1e-12, except for float16 where it is float16's smallest normal number (6.1e-5): it
    stays non-zero in float16, and the gradient at a zero row, 1/eps times the upstream
    gradient, stays below float16's maximum (65504) instead of overflowing to inf.
    """
    eps = torch.finfo(torch.float16).tiny if x.dtype == torch.float16 else 1e-12
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.normalize(x.float(), dim=1, eps=eps).to(x.dtype)
    return F.normalize(x, dim=1, eps=eps)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(rows,) <a_i, b_i> in the accumulation dtype."""
    dtype = accumulation_dtype(a.dtype)
    return (a.to(dtype) * b.to(dtype)).sum(1)


def inverse_temperature(temperature, like: torch.Tensor, name: str = "temperature"):
    """(tau, 1/tau) as 0-d tensors of the accumulation dtype of ``like``; differentiable when
    ``temperature`` is a tensor or a learnable module. Values are checked by the caller's
    :func:`~infonce_kernels._validation.check_values` (``inverse={name: tau}``)."""
    return v.inverse_scalar(name, v.temperature_value(temperature), device=like.device,
                            dtype=accumulation_dtype(like.dtype))


def check_views(name, z1, z2, reduction, gather_distributed=False):
    """z1, z2: two (B, d) views of one batch; B >= 2 unless the batch is gathered over ranks."""
    v.check_features("z1", z1)
    v.check_features("z2", z2)
    v.check_same_kind("z1", z1, "z2", z2, same_rows=True)
    if z1.shape[0] < 2 and not gather_distributed:
        raise ValueError(f"{name} needs a batch of at least 2 pairs (z1 has 1 row): with one pair an "
                         "anchor has no negative and the loss is constant")
    v.check_reduction(reduction)


def two_views(name, z1, z2, temperature, normalize, reduction, gather_distributed=False):
    """Checked ``(z, B, scale)``: z = cat[z1, z2] (2B, d), rows normalised when ``normalize``,
    scale = 1/temperature as a 0-d tensor of the accumulation dtype."""
    check_views(name, z1, z2, reduction, gather_distributed)
    tau, scale = inverse_temperature(temperature, z1)
    v.check_values({"z1": z1, "z2": z2}, inverse={"temperature": tau})
    # Autocast off: under a float16 region, autocast's cat refuses two bfloat16 views (and would
    # recast them); the views keep their dtype, as the op does.
    with torch.autocast(z1.device.type, enabled=False):
        z = torch.cat([z1, z2])
    return (l2_normalize(z) if normalize else z), z1.shape[0], scale


def pair_lse(z, scale, with_partner, backend, where=None):
    """(2B,) row log-sum-exp of the two-view rows z = [view 1; view 2] against all rows, each row
    without itself and, ``with_partner``, without the other view of its sample; against every
    rank's rows when ``where`` (a :class:`~infonce_kernels.distributed.RankRows`) is given."""
    if where is not None:
        return distributed.gathered_lse(z, scale, *distributed.pair_exclusions(where, with_partner), where,
                                        backend=backend)
    build = Exclusion.itself_and_partner if with_partner else Exclusion.itself
    return fused_lse(z, z, scale, build(z.shape[0], z.device), backend)


def reduce_rows(per_row, reduction, where=None):
    """The reduction of per-row losses, under the distributed loss convention when ``where``."""
    if where is not None:
        return distributed.scale_loss(per_row, reduction, where)
    return v.reduce(per_row, reduction)


def rank_rows(rows, device, gather_distributed, group):
    """This rank's place in the gathered batch, or None without ``gather_distributed``."""
    return distributed.rank_rows(rows, device, group) if gather_distributed else None


class LossModule(torch.nn.Module):
    """Base of every loss module: holds the temperature (a temperature module given here is
    registered as a submodule, so a ``LearnableTemperature``'s parameter trains with the
    model's) and the options every loss takes, ``normalize``, ``reduction``, ``backend``,
    ``gather_distributed`` and ``group``, passed to the functional form by :meth:`options`.

    A subclass whose forward is ``loss(z1, z2, temperature, **options)`` only names its
    functional form (``loss = staticmethod(fn)``) and its ``default_temperature``."""

    loss = None
    default_temperature = None

    def __init__(self, temperature=None, *, normalize=True, reduction="mean", backend="auto",
                 gather_distributed=False, group=None):
        super().__init__()
        v.check_reduction(reduction)
        self.temperature = self.default_temperature if temperature is None else temperature
        self.normalize, self.reduction, self.backend = normalize, reduction, backend
        self.gather_distributed, self.group = gather_distributed, group

    def forward(self, z1, z2):
        return type(self).loss(z1, z2, self.temperature, **self.options())

    def options(self) -> dict:
        """The keyword arguments every functional loss takes."""
        return {"normalize": self.normalize, "reduction": self.reduction, "backend": self.backend,
                "gather_distributed": self.gather_distributed, "group": self.group}

    def _settings(self) -> str:
        """Loss-specific settings for :meth:`extra_repr` (empty by default)."""
        return ""

    def extra_repr(self):
        head = "" if self.temperature is None or isinstance(self.temperature, torch.nn.Module) else \
            f"temperature={self.temperature}, "
        extra = self._settings()
        return (head + (extra + ", " if extra else "") +
                f"normalize={self.normalize}, reduction={self.reduction!r}, backend={self.backend!r}")
