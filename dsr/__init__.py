"""dsr: Dual-Stage Registers for diffusion transformers, on Hydra and PyTorch Lightning."""

from dsr.utils.resolvers import register as _register_resolvers

__version__ = "0.1.0"

_register_resolvers()
