"""Frozen pretrained networks (encoders, LPIPS, discriminator backbones) stay out of checkpoints.

They are loaded from their own files at start-up, so a checkpoint that stored them would only grow by their
size (1.6 GB for So400M). A LightningModule drops their keys when saving (`drop_frozen`) and refills them from
the freshly loaded weights before a strict load (`fill_frozen`), so a strict load still catches every genuine
mismatch in the trained weights.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

_FROZEN = "_dsr_frozen"


def mark_frozen(module: nn.Module) -> nn.Module:
    """No gradients, eval mode, and flagged so its weights are left out of checkpoints."""
    module.requires_grad_(False)
    module.eval()
    setattr(module, _FROZEN, True)
    return module


def is_frozen(module: nn.Module) -> bool:
    return getattr(module, _FROZEN, False)


def frozen_prefixes(root: nn.Module) -> list[str]:
    """State-dict prefixes ("encoder.model.", ...) of the outermost frozen modules under `root`."""
    prefixes: list[str] = []
    for name, module in root.named_modules():
        if is_frozen(module) and not any(name.startswith(p) for p in prefixes):
            prefixes.append(f"{name}." if name else "")
    return prefixes


def drop_frozen(root: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    prefixes = frozen_prefixes(root)
    return {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in prefixes)}


def fill_frozen(root: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state_dict` plus the current values of the frozen keys it lacks."""
    prefixes = frozen_prefixes(root)
    filled = dict(state_dict)
    for key, value in root.state_dict().items():
        if key not in filled and any(key.startswith(p) for p in prefixes):
            filled[key] = value
    return filled


def keep_frozen_in_eval(root: nn.Module) -> None:
    """Put every frozen module back in eval mode (after `root.train()` switched the whole tree)."""
    for module in root.modules():
        if is_frozen(module):
            module.eval()
