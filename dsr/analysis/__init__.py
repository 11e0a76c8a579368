"""Outlier-token analysis: metrics over token norms, statistics accumulated over many images, capture of a ViT's
residual stream or a diffusion transformer's block outputs, and the figures (used by `dsr.analyze` and the
training-time outlier monitor)."""
