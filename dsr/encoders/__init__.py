"""Frozen encoders that map images to the [B, C, h, w] latents stage 2 trains on (and decode them back)."""
