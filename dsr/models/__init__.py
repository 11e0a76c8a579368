"""Diffusion transformers and their building blocks."""
