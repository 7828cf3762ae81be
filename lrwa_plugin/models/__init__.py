"""Networks registered with torchdistill's ``register_model``: digits CNNs, MNIST LeNets, generators, the replay VAE
and the ``timm_model`` factory."""
from . import digits, generators, lenet, timm_model, vae  # noqa: F401
from .cifar import MODEL_NAMES as CIFAR_MODEL_NAMES  # noqa: F401  (registers the CIFAR / Tiny-ImageNet networks)
