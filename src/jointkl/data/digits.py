"""scikit-learn's 8x8 handwritten digits, with one fixed train/test split.

The 1,797 images (UCI "optdigits", 0..16 grey levels per pixel, 64 pixels in row-major order)
ship inside scikit-learn (``sklearn.datasets.load_digits``); nothing is downloaded.

The split is fixed and independent of every library's random stream: the legacy NumPy
generator ``RandomState(0)`` (whose stream NumPy guarantees never to change) permutes the
indices 0..1796 once; the first 360 positions of that permutation are the test set, the other
1,437 the training set, each kept in the permutation's order. Every class keeps a fair share
(test: 27..44 images per digit).

Two forms of the pixels:

* ``binarize=False`` — grey levels scaled to [0, 1] (value / 16), for Gaussian decoders;
* ``binarize=True`` — a fixed threshold, 1 where value / 16 >= 0.5, for Bernoulli decoders.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from jointkl.errors import InputError

__all__ = ["digits", "DIGITS_SPLIT_SEED", "DIGITS_TEST_SIZE", "DIGITS_IMAGE_SHAPE"]

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_SIZE = 360
DIGITS_IMAGE_SHAPE = (8, 8)
_SPLITS = ("train", "test", "all")


@lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.data.astype(np.float64) / 16.0  # 0..16 grey levels -> [0, 1]
    labels = bunch.target.astype(np.int64)
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
    return images, labels, perm


def digits(
    split: str = "train", binarize: bool = False, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as ``(images, labels)``: images ``(N, 64)`` in [0, 1], labels ``(N,)`` int64.

    :param split: ``"train"`` (1,437 images), ``"test"`` (360) or ``"all"`` (1,797, file order).
    :param binarize: threshold the scaled pixels at 0.5 (values in {0, 1}) for a Bernoulli
        likelihood; otherwise keep the grey levels scaled to [0, 1].
    :param dtype: floating dtype of the images (default: torch's default dtype).
    """
    if split not in _SPLITS:
        raise InputError(f"digits: split must be one of {_SPLITS}, got {split!r}")
    images, labels, perm = _arrays()
    if split == "test":
        idx = perm[:DIGITS_TEST_SIZE]
    elif split == "train":
        idx = perm[DIGITS_TEST_SIZE:]
    else:
        idx = np.arange(len(labels))
    x = images[idx]
    if binarize:
        x = (x >= 0.5).astype(np.float64)
    return (
        torch.as_tensor(x, dtype=dtype or torch.get_default_dtype()),
        torch.as_tensor(labels[idx]),
    )
