"""Registers: extra tokens that give outlier activations somewhere harmless to go.

`diffusion` holds the learned tokens of the diffusion transformer (stage 2).
"""
