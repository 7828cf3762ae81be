"""SklearnDigits: fixed stratified split, no overlap, normalised tensors."""
from __future__ import annotations

import pytest
import torch

from lrwa_plugin.datasets import SklearnDigits


def test_split_sizes_classes_and_shapes():
    train, test = SklearnDigits('train'), SklearnDigits('test')
    assert (len(train), len(test)) == (1437, 360)
    x, y = test[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.bincount(test.targets).tolist() == torch.bincount(SklearnDigits('test').targets).tolist()
    assert torch.bincount(test.targets).min() >= 35  # stratified: every class ~36 times


def test_train_and_test_do_not_overlap():
    train = {tuple(x.flatten().tolist()) for x in SklearnDigits('train', normalize=False).data}
    test = [tuple(x.flatten().tolist()) for x in SklearnDigits('test', normalize=False).data]
    assert sum(t in train for t in test) <= 5  # the raw data has a few exact duplicates across digits


def test_train_split_is_standardised():
    data = SklearnDigits('train').data
    assert abs(data.mean().item()) < 0.01 and abs(data.std().item() - 1.0) < 0.01


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split 'val'"):
        SklearnDigits('val')
