"""Randomness keyed by where it is used, so a resumed or re-batched run draws exactly what an uninterrupted one
would."""

from __future__ import annotations

import torch


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded from (seed, optimizer step, rank) alone."""
    key = (seed * 1_000_003 + step) * 65_537 + rank
    return torch.Generator(device=device).manual_seed(key % (2**63))
