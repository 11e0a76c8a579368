"""Image sources: a built-in synthetic class-conditional set, ImageNet as an ImageFolder, and transforms.

Every dataset yields (image float32 [3, H, W] in [0, 1], integer label); the encoder does the normalisation.
"""
