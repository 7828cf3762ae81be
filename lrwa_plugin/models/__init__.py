"""Networks registered with torchdistill's ``register_model``: digits CNNs, MNIST LeNets, generators, the replay VAE,
the ``timm_model`` factory, and the CIFAR / Tiny-ImageNet families (also registered with timm, see
:mod:`~lrwa_plugin.models.timm_compat`)."""
from . import digits, generators, lenet, timm_model, vae  # noqa: F401

# Importing a family registers its networks; this order is the order of CIFAR_MODEL_NAMES.
# isort: off
from . import resnet_cifar  # noqa: F401
from . import wide_resnet  # noqa: F401
from . import mobilenet_cifar  # noqa: F401
from . import resnet_tinyimagenet  # noqa: F401
# isort: on
from .timm_compat import MODEL_NAMES as CIFAR_MODEL_NAMES  # noqa: F401
