"""Encoder-side registers: extra tokens that give a frozen ViT's outlier activations somewhere harmless to go.

`hooks` names a ViT's hook points and reads its residual stream; `neurons` holds register-neuron sets, the
release's lists and their discovery; `ttr` is the intervention (test-time registers, applied once or recursively).
The diffusion transformer's learned registers are a model layer: `dsr.models.registers`.
"""
