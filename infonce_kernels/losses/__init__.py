"""The losses, one family per module, each a thin composition over the fused row log-sum-exp
(:func:`infonce_kernels.ops.fused_lse`); what they share is in ``_common.py``.

    nt_xent.py    NT-Xent (SimCLR)              info_nce.py   InfoNCE (in-batch or a bank)
    clip.py       CLIP (symmetric)              supcon.py     SupCon (L_out), multi-view
    decoupled.py  DCL, DCLW, DHEL               debiased.py   hard-negative and debiased NT-Xent
    kcl.py        KCL (Gaussian kernel)         metrics.py    alignment, uniformity
    siglip.py     SigLIP's pairwise sigmoid loss (over the fused sigmoid op, ops/pairwise_sigmoid.py)
    retrieval.py  retrieval InfoNCE: hard negatives, multi-direction, hardness, false-negative filter
"""

from .clip import ClipLoss, clip_loss
from .debiased import DebiasedNTXentLoss, HardNegativeNTXentLoss, debiased_nt_xent, hard_negative_nt_xent
from .decoupled import DCLLoss, DCLWLoss, DHELLoss, dcl, dclw, dhel
from .info_nce import InfoNCELoss, info_nce
from .kcl import KCLLoss, kcl
from .metrics import alignment, uniformity
from .nt_xent import NTXentLoss, nt_xent
from .retrieval import RetrievalInfoNCELoss, SymmetricRetrievalInfoNCELoss, retrieval_info_nce
from .siglip import SigLipLoss, siglip_loss
from .supcon import SupConLoss, supcon

__all__ = [
    "nt_xent", "info_nce", "clip_loss", "NTXentLoss", "InfoNCELoss", "ClipLoss",
    "supcon", "SupConLoss",
    "dcl", "dclw", "dhel", "DCLLoss", "DCLWLoss", "DHELLoss",
    "kcl", "KCLLoss",
    "hard_negative_nt_xent", "debiased_nt_xent", "HardNegativeNTXentLoss", "DebiasedNTXentLoss",
    "alignment", "uniformity",
    "siglip_loss", "SigLipLoss",
    "retrieval_info_nce", "RetrievalInfoNCELoss", "SymmetricRetrievalInfoNCELoss",
]
