"""Frozen-feature evaluation: weighted cosine kNN and a linear probe (scikit-learn)."""

from __future__ import annotations

import warnings
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["extract_features", "knn_accuracy", "linear_probe_accuracy", "evaluate_encoder"]


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, transform: nn.Module, device: torch.device,
                     batch_size: int = 512, autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Encoder outputs (eval mode, fp32, on the CPU) for uint8 ``images``."""
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = transform(images[i:i + batch_size].to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                h = encoder(x)
            out.append(h.float().cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 200, t: float = 0.07, num_classes: Optional[int] = None, chunk: int = 1024) -> float:
    """Weighted k-nearest-neighbour accuracy with cosine similarity (Wu et al. 2018, as in SimCLR
    repos): each of the ``k`` neighbours votes for its class with weight ``exp(sim / t)``."""
    k = max(1, min(k, len(train_f)))
    c = num_classes or int(max(train_y.max(), test_y.max())) + 1
    tr, te = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    correct = 0
    for i in range(0, len(te), chunk):
        sim = te[i:i + chunk] @ tr.T
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(w), c).scatter_add_(1, train_y[idx], (w / t).exp())
        correct += int((votes.argmax(1) == test_y[i:i + chunk]).sum())
    return correct / len(te)


def linear_probe_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                          seed: int = 0, max_train: Optional[int] = None, C: float = 1.0, max_iter: int = 1000) -> float:
    """Logistic regression on standardised frozen features; returns test accuracy."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xtr, ytr = train_f.numpy().astype(np.float64), train_y.numpy()
    if max_train is not None and len(xtr) > max_train:
        idx = np.random.default_rng(seed).permutation(len(xtr))[:max_train]
        xtr, ytr = xtr[idx], ytr[idx]
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(xtr), ytr)
    return float((clf.predict(scaler.transform(test_f.numpy().astype(np.float64))) == test_y.numpy()).mean())


def few_shot_accuracy(train_f, train_y, test_f, test_y, shots: int, seed: int = 0, draws: int = 5) -> float:
    """Linear probe fitted on ``shots`` labelled images per class (mean over ``draws`` fixed draws)."""
    rng = np.random.default_rng(seed + 1234)
    y = train_y.numpy()
    accs = []
    for _ in range(draws):
        idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:shots] for c in np.unique(y)])
        accs.append(linear_probe_accuracy(train_f[idx], train_y[idx], test_f, test_y, seed=seed))
    return float(np.mean(accs))


def evaluate_encoder(encoder, bundle, transform, device, *, k: int, seed: int, probe: bool = True,
                     probe_max_train: Optional[int] = None, few_shot: int = 0,
                     autocast_dtype=None) -> Dict[str, float]:
    ftr = extract_features(encoder, bundle.train_x, transform, device, autocast_dtype=autocast_dtype)
    fte = extract_features(encoder, bundle.test_x, transform, device, autocast_dtype=autocast_dtype)
    res = {"knn": knn_accuracy(ftr, bundle.train_y, fte, bundle.test_y, k=k, num_classes=bundle.num_classes)}
    if probe:
        res["linear"] = linear_probe_accuracy(ftr, bundle.train_y, fte, bundle.test_y, seed=seed,
                                              max_train=probe_max_train)
        if few_shot:
            res[f"linear_{few_shot}shot"] = few_shot_accuracy(ftr, bundle.train_y, fte, bundle.test_y, few_shot, seed)
    return res
