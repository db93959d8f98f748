"""The embedded data: scikit-learn's bundled handwritten digits (1797 8x8 images).

No download happens: the images ship inside scikit-learn. Splits are
deterministic (stratified by class, fixed seed), so every workflow and test
sees the same train / validation / test sets.
"""

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import TensorDataset


class DigitsSplits(NamedTuple):
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset


def load_digits_tensors() -> tuple:
    """All 1797 digits as ``(images float32 (N, 1, 8, 8) in [0, 1], labels int64 (N,))``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return images, labels


def digits_splits(val_fraction: float = 0.15, test_fraction: float = 0.2, seed: int = 0) -> DigitsSplits:
    """Stratified train / validation / test splits of the digits, fixed by ``seed``."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) "
                         "and sum to less than 1")
    images, labels = load_digits_tensors()
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels.numpy() == c))
        n_test, n_val = round(len(idx) * test_fraction), round(len(idx) * val_fraction)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    sets = {k: torch.from_numpy(np.sort(np.concatenate(v))) for k, v in parts.items()}
    return DigitsSplits(**{k: TensorDataset(images[i], labels[i]) for k, i in sets.items()})


def stratified_subset(data: TensorDataset, fraction: float, seed: int = 0) -> TensorDataset:
    """``fraction`` of every class of an ``(x, y)`` TensorDataset (at least one example each), drawn with ``seed``.

    The low-data regime of the distillation experiments and of ``pycompress demo``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    x, y = data.tensors
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(y.numpy() == c), max(1, round(int((y == c).sum()) * fraction)), replace=False)
            for c in torch.unique(y).tolist()]
    keep = torch.from_numpy(np.sort(np.concatenate(keep)))
    return TensorDataset(x[keep], y[keep])
