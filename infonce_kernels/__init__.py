"""infonce_kernels: fused InfoNCE-family contrastive losses.

Every loss is a thin composition over one primitive, the masked, scaled row log-sum-exp
:func:`lse`, computed tile by tile so the N x N similarity matrix is never materialised; SigLIP's
pairwise sigmoid loss (:func:`siglip_loss`) is a second fused op of the same kind.
"""

from .losses import ClipLoss, InfoNCELoss, NTXentLoss, clip_loss, info_nce, nt_xent
from .losses import SigLipLoss, siglip_loss
from .losses import (DCLLoss, DCLWLoss, DebiasedNTXentLoss, DHELLoss, HardNegativeNTXentLoss, KCLLoss, SupConLoss,
                     alignment, dcl, dclw, debiased_nt_xent, dhel, hard_negative_nt_xent, kcl, supcon, uniformity)
from .losses import RetrievalInfoNCELoss, SymmetricRetrievalInfoNCELoss, retrieval_info_nce
from .grad_cache import CachedStepOutput, cached_step
from .ops import BACKENDS, available_backends, lse, resolve_backend

__version__ = "0.1.0"

__all__ = [
    "lse",
    "nt_xent",
    "info_nce",
    "clip_loss",
    "NTXentLoss",
    "InfoNCELoss",
    "ClipLoss",
    "siglip_loss",
    "SigLipLoss",
    "BACKENDS",
    "available_backends",
    "resolve_backend",
    "cached_step",
    "CachedStepOutput",
]

from .temperature import (
    ConstantTemperature,
    CosineTemperature,
    LearnableTemperature,
    LinearTemperature,
    LogarithmicAnnealing,
    StepTemperature,
    TemperatureSchedule,
)

__all__ += [
    "supcon", "SupConLoss",
    "dcl", "dclw", "dhel", "DCLLoss", "DCLWLoss", "DHELLoss",
    "kcl", "KCLLoss",
    "hard_negative_nt_xent", "debiased_nt_xent", "HardNegativeNTXentLoss", "DebiasedNTXentLoss",
    "alignment", "uniformity",
    "retrieval_info_nce", "RetrievalInfoNCELoss", "SymmetricRetrievalInfoNCELoss",
    "LearnableTemperature", "TemperatureSchedule", "ConstantTemperature", "LinearTemperature",
    "CosineTemperature", "StepTemperature", "LogarithmicAnnealing",
]
