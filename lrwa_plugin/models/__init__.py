"""Networks registered with torchdistill's ``register_model``: digits CNNs, generators and the ``timm_model``
factory."""
from . import digits, generators, timm_model  # noqa: F401
