"""In-memory datasets for the reference trainer (no downloads).

Every loader returns a :class:`DataBundle` of ``uint8`` image tensors ``(N, C, H, W)`` and ``int64``
labels (``-1`` for unlabelled images).  Images stay on the host as one tensor; the trainer moves a
batch to the device and augments it there (kornia), so no CPU worker pipeline is needed.

Supported sources:

* ``digits``      scikit-learn's bundled 8x8 handwritten digits (1797 images, real data shipped with
                  scikit-learn); split into train/test by the seed.
* ``cifar10``     the python-pickle directory ``cifar-10-batches-py``: ``data_batch_1`` .. ``data_batch_5``
                  and ``test_batch``, each a pickled dict with ``b"data"`` (N x 3072 uint8) and ``b"labels"``.
* ``cifar100``    the python-pickle directory ``cifar-100-python``: ``train`` and ``test``, each with
                  ``b"data"`` and ``b"fine_labels"``.
* ``stl10``       the binary directory ``stl10_binary``: ``train_X.bin``/``train_y.bin``,
                  ``test_X.bin``/``test_y.bin`` and (optional) ``unlabeled_X.bin``; images are 3x96x96
                  uint8 stored column-major, labels are uint8 1..10.
* ``imagefolder`` ``root/<class>/<image>`` (split by the seed) or ``root/train/<class>/<image>`` with
                  ``root/test`` (or ``root/val``); images are loaded with PIL, converted to RGB,
                  centre-cropped to a square and resized to ``image_size``.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["DataBundle", "DatasetError", "load_dataset", "DATASETS"]

DATASETS = ("digits", "cifar10", "cifar100", "stl10", "imagefolder")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

CIFAR10_LAYOUT = (
    "a CIFAR-10 python directory (cifar-10-batches-py) holding data_batch_1 .. data_batch_5 and "
    "test_batch, each a pickled dict with b'data' (N x 3072 uint8) and b'labels' (N ints)"
)
CIFAR100_LAYOUT = (
    "a CIFAR-100 python directory (cifar-100-python) holding 'train' and 'test', each a pickled dict "
    "with b'data' (N x 3072 uint8) and b'fine_labels' (N ints)"
)
STL10_LAYOUT = (
    "an STL-10 binary directory (stl10_binary) holding train_X.bin, train_y.bin, test_X.bin, test_y.bin "
    "and optionally unlabeled_X.bin (uint8 images 3x96x96 stored column-major, labels uint8 in 1..10)"
)
IMAGEFOLDER_LAYOUT = (
    "an image directory laid out as ROOT/<class>/<image> (split into train/test by the seed) or "
    "ROOT/train/<class>/<image> with ROOT/test/<class>/<image> (or ROOT/val); image files ending in "
    + ", ".join(IMAGE_EXTENSIONS)
)


class DatasetError(ValueError):
    """A dataset path is missing or its files do not have the expected layout."""


@dataclass
class DataBundle:
    name: str
    ssl_x: torch.Tensor  # images used for self-supervised training (uint8, N x C x H x W)
    ssl_y: torch.Tensor  # their labels (int64, -1 = unlabelled), used only by label-aware losses
    train_x: torch.Tensor  # labelled images the evaluation (kNN bank / probe) is fitted on
    train_y: torch.Tensor
    test_x: torch.Tensor  # labelled images the evaluation is scored on
    test_y: torch.Tensor
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    @property
    def channels(self) -> int:
        return int(self.ssl_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.ssl_x.shape[-1])

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.ssl_x)} training images {tuple(self.ssl_x.shape[1:])}, "
            f"evaluation {len(self.train_y)} train / {len(self.test_y)} test, {self.num_classes} classes"
        )

    def subset(self, n: Optional[int], seed: int) -> "DataBundle":
        """Keep at most ``n`` images of each split (a fixed random subset), for quick runs."""
        if n is None:
            return self
        g = torch.Generator().manual_seed(seed + 17)

        def take(x, y):
            if len(x) <= n:
                return x, y
            idx = torch.randperm(len(x), generator=g)[:n].sort().values
            return x[idx], y[idx]

        ssl_x, ssl_y = take(self.ssl_x, self.ssl_y)
        train_x, train_y = take(self.train_x, self.train_y)
        test_x, test_y = take(self.test_x, self.test_y)
        return DataBundle(self.name, ssl_x, ssl_y, train_x, train_y, test_x, test_y,
                          self.num_classes, self.mean, self.std)


# ----------------------------------------------------------------------------------------------
# helpers


def _require_dir(path, layout: str) -> str:
    if path is None:
        raise DatasetError(f"--data-dir is required for this dataset; expected {layout}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DatasetError(f"dataset path {path!r} does not exist or is not a directory; expected {layout}")
    return path


def _require_file(directory: str, name: str, layout: str) -> str:
    p = os.path.join(directory, name)
    if not os.path.isfile(p):
        raise DatasetError(f"missing file {p!r}; expected {layout}")
    return p


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    strat = y.numpy()
    counts = np.bincount(strat - strat.min()) if len(strat) else np.array([])
    n_classes = int((counts > 0).sum())
    n_test = int(round(test_fraction * len(y)))
    # stratify when every class has >= 2 images and the test split can hold one of each
    use_strat = len(counts) and counts[counts > 0].min() >= 2 and n_classes <= n_test <= len(y) - n_classes
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed,
                              stratify=strat if use_strat else None)
    tr, te = np.sort(tr), np.sort(te)
    return x[tr], y[tr], x[te], y[te]


# ----------------------------------------------------------------------------------------------
# loaders


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> DataBundle:
    from sklearn.datasets import load_digits as _load

    d = _load()
    # pixel values are 0..16
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    tr_x, tr_y, te_x, te_y = _split(x, y, test_fraction, seed)
    mean = float(tr_x.float().mean() / 255.0)
    std = float(tr_x.float().std() / 255.0)
    return DataBundle("digits", tr_x, tr_y, tr_x, tr_y, te_x, te_y, 10, (mean,), (std,))


def _unpickle(path: str, layout: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unreadable file is a layout error
        raise DatasetError(f"cannot read {path!r} as a python pickle ({type(e).__name__}: {e}); expected {layout}") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path!r} does not hold a dict; expected {layout}")
    return obj


def _cifar_arrays(path: str, label_key: bytes, layout: str):
    obj = _unpickle(path, layout)
    if b"data" not in obj or label_key not in obj:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in obj)
        raise DatasetError(f"{path!r} lacks b'data' or {label_key!r} (keys: {keys}); expected {layout}")
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{path!r}: b'data' has shape {data.shape} for {labels.shape[0]} labels, "
            f"expected (N, 3072); expected {layout}")
    x = torch.from_numpy(data.astype(np.uint8).reshape(-1, 3, 32, 32).copy())
    return x, torch.from_numpy(labels)


CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def load_cifar10(root) -> DataBundle:
    root = _require_dir(root, CIFAR10_LAYOUT)
    xs, ys = [], []
    for i in range(1, 6):
        x, y = _cifar_arrays(_require_file(root, f"data_batch_{i}", CIFAR10_LAYOUT), b"labels", CIFAR10_LAYOUT)
        xs.append(x)
        ys.append(y)
    tx, ty = _cifar_arrays(_require_file(root, "test_batch", CIFAR10_LAYOUT), b"labels", CIFAR10_LAYOUT)
    x, y = torch.cat(xs), torch.cat(ys)
    return DataBundle("cifar10", x, y, x, y, tx, ty, 10, CIFAR10_MEAN, CIFAR10_STD)


def load_cifar100(root) -> DataBundle:
    root = _require_dir(root, CIFAR100_LAYOUT)
    x, y = _cifar_arrays(_require_file(root, "train", CIFAR100_LAYOUT), b"fine_labels", CIFAR100_LAYOUT)
    tx, ty = _cifar_arrays(_require_file(root, "test", CIFAR100_LAYOUT), b"fine_labels", CIFAR100_LAYOUT)
    return DataBundle("cifar100", x, y, x, y, tx, ty, 100, CIFAR100_MEAN, CIFAR100_STD)


def _stl_images(path: str) -> torch.Tensor:
    raw = np.fromfile(path, dtype=np.uint8)
    per = 3 * 96 * 96
    if raw.size == 0 or raw.size % per:
        raise DatasetError(f"{path!r} has {raw.size} bytes, not a positive multiple of 3*96*96={per}; expected {STL10_LAYOUT}")
    # STL-10 stores each image column-major: (C, W, H) in C order -> transpose to (C, H, W)
    x = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    return torch.from_numpy(np.ascontiguousarray(x))


def _stl_labels(path: str, n: int) -> torch.Tensor:
    y = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if y.size != n:
        raise DatasetError(f"{path!r} has {y.size} labels for {n} images; expected {STL10_LAYOUT}")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DatasetError(f"{path!r} has labels outside 1..10; expected {STL10_LAYOUT}")
    return torch.from_numpy(y - 1)


STL10_MEAN, STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)


def load_stl10(root, use_unlabeled: bool = True) -> DataBundle:
    root = _require_dir(root, STL10_LAYOUT)
    x = _stl_images(_require_file(root, "train_X.bin", STL10_LAYOUT))
    y = _stl_labels(_require_file(root, "train_y.bin", STL10_LAYOUT), len(x))
    tx = _stl_images(_require_file(root, "test_X.bin", STL10_LAYOUT))
    ty = _stl_labels(_require_file(root, "test_y.bin", STL10_LAYOUT), len(tx))
    ssl_x, ssl_y = x, y
    unl = os.path.join(root, "unlabeled_X.bin")
    if use_unlabeled and os.path.isfile(unl):
        ux = _stl_images(unl)
        ssl_x = torch.cat([x, ux])
        ssl_y = torch.cat([y, torch.full((len(ux),), -1, dtype=torch.int64)])
    return DataBundle("stl10", ssl_x, ssl_y, x, y, tx, ty, 10, STL10_MEAN, STL10_STD)


def _load_image(path: str, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"cannot read image {path!r} ({type(e).__name__}: {e}); expected {IMAGEFOLDER_LAYOUT}") from e


def _scan_classes(root: str):
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files = []
    for ci, c in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(root, c))):
            for n in sorted(names):
                if n.lower().endswith(IMAGE_EXTENSIONS):
                    files.append((os.path.join(dirpath, n), ci))
    return classes, files


def _load_folder(root: str, size: int, classes=None):
    found, files = _scan_classes(root)
    if classes is not None and found != classes:
        raise DatasetError(f"{root!r} has classes {found} but the training split has {classes}; expected {IMAGEFOLDER_LAYOUT}")
    if not files:
        raise DatasetError(f"no images found under {root!r}; expected {IMAGEFOLDER_LAYOUT}")
    x = torch.from_numpy(np.stack([_load_image(p, size) for p, _ in files]))
    y = torch.tensor([c for _, c in files], dtype=torch.int64)
    return found, x, y


def load_imagefolder(root, image_size: int = 64, seed: int = 0, test_fraction: float = 0.2) -> DataBundle:
    root = _require_dir(root, IMAGEFOLDER_LAYOUT)
    train_dir = os.path.join(root, "train")
    test_dir = next((os.path.join(root, d) for d in ("test", "val") if os.path.isdir(os.path.join(root, d))), None)
    if os.path.isdir(train_dir) and test_dir is not None:
        classes, x, y = _load_folder(train_dir, image_size)
        _, tx, ty = _load_folder(test_dir, image_size, classes)
    else:
        classes, x_all, y_all = _load_folder(root, image_size)
        if len(y_all) < 2:
            raise DatasetError(f"{root!r} has {len(y_all)} image(s), need at least 2 to split train/test; expected {IMAGEFOLDER_LAYOUT}")
        x, y, tx, ty = _split(x_all, y_all, test_fraction, seed)
    xf = x.float() / 255.0
    mean = tuple(float(v) for v in xf.mean(dim=(0, 2, 3)))
    std = tuple(max(float(v), 1e-3) for v in xf.std(dim=(0, 2, 3)))
    return DataBundle("imagefolder", x, y, x, y, tx, ty, len(classes), mean, std)


def load_dataset(name: str, data_dir=None, *, seed: int = 0, image_size: Optional[int] = None) -> DataBundle:
    if name == "digits":
        if data_dir is not None:
            raise DatasetError("--data-dir is not used by --dataset digits (bundled with scikit-learn)")
        return load_digits(seed)
    if name == "cifar10":
        return load_cifar10(data_dir)
    if name == "cifar100":
        return load_cifar100(data_dir)
    if name == "stl10":
        return load_stl10(data_dir)
    if name == "imagefolder":
        return load_imagefolder(data_dir, image_size or 64, seed)
    raise DatasetError(f"--dataset: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
