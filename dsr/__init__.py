"""dsr: Dual-Stage Registers for diffusion transformers, on Hydra and PyTorch Lightning."""

__version__ = "0.1.0"
