"""SimCLR reference trainer for infonce_kernels: ``python -m infonce_kernels.train`` / ``infonce-train``.

Programmatic use::

    from infonce_kernels.train import TrainConfig, train
    summary = train(TrainConfig(dataset="digits", epochs=5, output_dir="runs/quick"))
"""

from .config import DATASET_DEFAULTS, TrainConfig
from .losses import available_losses, get_loss, register_loss
from .trainer import TrainingInterrupted, train

__all__ = ["TrainConfig", "DATASET_DEFAULTS", "train", "TrainingInterrupted", "get_loss", "register_loss",
           "available_losses"]
