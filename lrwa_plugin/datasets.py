"""Offline datasets: scikit-learn's 8x8 handwritten digits as a torch dataset.

The digits ship inside scikit-learn, so the demo and the tests run with no download. The split is fixed and
stratified: the teacher is trained on ``train``; the data-free student never sees a real image and ``test`` is only
used to evaluate.

.. code-block:: yaml

    datasets:
      digits/train: !import_call {key: 'lrwa_plugin.datasets.SklearnDigits', init: {kwargs: {split: 'train'}}}
      digits/test: !import_call {key: 'lrwa_plugin.datasets.SklearnDigits', init: {kwargs: {split: 'test'}}}
"""
from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

#: Pixel mean and std of the train split after scaling to [0, 1] (measured once; the split is fixed).
DIGITS_MEAN = 0.3054
DIGITS_STD = 0.3761
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0
SPLITS = ('train', 'test')


class SklearnDigits(Dataset):
    """scikit-learn's digits (1,797 images, 10 classes) as normalised ``1x8x8`` float tensors.

    Args:
        split: ``'train'`` (1,437 images) or ``'test'`` (360 images), a stratified split fixed by a seed.
        normalize: standardise pixels with the train split's mean and std (``DIGITS_MEAN``, ``DIGITS_STD``).
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(self, split: str = 'train', normalize: bool = True) -> None:
        if split not in SPLITS:
            raise ValueError(f"SklearnDigits: split '{split}' is not one of {', '.join(SPLITS)}")
        digits = load_digits()
        images = digits.images.astype('float32') / 16.0
        train_x, test_x, train_y, test_y = train_test_split(
            images, digits.target, test_size=DIGITS_TEST_SIZE, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
        )
        x, y = (train_x, train_y) if split == 'train' else (test_x, test_y)
        data = torch.from_numpy(x).unsqueeze(1)
        if normalize:
            data = (data - DIGITS_MEAN) / DIGITS_STD
        self.data = data.contiguous()
        self.targets = torch.from_numpy(y).long()
        self.split = split

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data[index], int(self.targets[index])

    def __repr__(self) -> str:
        return f'SklearnDigits(split={self.split!r}, size={len(self)})'
