"""Drop-in replacements for the contrastive losses of popular libraries.

Each module mirrors one library's class names, constructor arguments, defaults, forward
signatures and values, so switching is one import:

=========================================================  =================================================
you use                                                    import instead
=========================================================  =================================================
``lightly.loss.NTXentLoss`` / ``DCLLoss`` / ``DCLWLoss``   ``infonce_kernels.compat.lightly``
``pytorch_metric_learning.losses.NTXentLoss`` /
``SupConLoss`` / ``SelfSupervisedLoss``                    ``infonce_kernels.compat.pytorch_metric_learning``
``open_clip.loss.ClipLoss`` / ``SigLipLoss``               ``infonce_kernels.compat.open_clip``
``info_nce.InfoNCE`` / ``info_nce.info_nce``               ``infonce_kernels.compat.info_nce_pytorch``
SupContrast's ``losses.SupConLoss``                        ``infonce_kernels.compat.supcontrast``
sentence-transformers' ``MultipleNegativesRankingLoss`` /
``MultipleNegativesSymmetricRankingLoss`` and their
``Cached...`` forms                                        ``infonce_kernels.compat.sentence_transformers``
=========================================================  =================================================

Every adapter takes an extra keyword-only ``backend="auto"`` (see :func:`infonce_kernels.lse`).
The modules do not import the libraries they replace.
"""

__all__ = ["lightly", "pytorch_metric_learning", "open_clip", "info_nce_pytorch", "supcontrast",
           "sentence_transformers"]
