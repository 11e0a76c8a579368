"""What the stage-1 and stage-2 LightningModules share: EMA copies of the trained network, and the epoch length that
turns schedules given in epochs into optimizer steps."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def ema_copy(model: nn.Module, decay: float) -> AveragedModel:
    """A frozen exponential moving average of `model` (buffers included) with this decay; one per decay for runs that
    keep several. `update_parameters(model)` after each optimizer step; the average lives in `.module`."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.requires_grad_(False)
    return ema


class EMAs(nn.Module):
    """Exponential moving averages of one network with several decays (JiT keeps 0.9999 and 0.9996), updated together.

    `update(model)` after each optimizer step: the first update copies the weights (as `AveragedModel` does), every
    later one sets e <- e + (1 - d) (w - e) for every decay d with one `torch._foreach_lerp_` over all averages'
    floating-point parameters and buffers (other buffers are copied). Average i lives in `averages[i]`; `module` is the
    first, the one sampling uses unless told otherwise. A checkpoint stores the decays beside the state dict
    (`check_decays` compares them on load), so it knows which average is which.
    """

    def __init__(self, model: nn.Module, decays: Sequence[float]) -> None:
        super().__init__()
        decays = tuple(float(d) for d in decays)
        if not decays:
            raise ValueError("module.ema_decays needs at least one decay")
        if any(not 0.0 <= d < 1.0 for d in decays) or len(set(decays)) != len(decays):
            raise ValueError(f"module.ema_decays must be distinct decays in [0, 1), got {list(decays)}")
        self.decays = decays
        self.averages = nn.ModuleList(copy.deepcopy(model).requires_grad_(False) for _ in decays)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))

    @property
    def module(self) -> nn.Module:
        """The first average (`module.ema_decays[0]`)."""
        return self.averages[0]

    def index(self, decay: float) -> int:
        """The position of `decay` among the decays; an error listing them if it is not one."""
        for i, d in enumerate(self.decays):
            if math.isclose(d, float(decay), rel_tol=0.0, abs_tol=1e-12):
                return i
        kept = ", ".join(f"{d:g}" for d in self.decays)
        raise ValueError(f"ema={decay:g}: this model keeps EMAs with decays {kept} (or ema=none for the raw weights)")

    def select(self, decay: float) -> nn.Module:
        return self.averages[self.index(decay)]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        sources = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
        first = int(self.n_averaged) == 0
        lerp_targets, lerp_sources, weights = [], [], []
        for decay, average in zip(self.decays, self.averages, strict=True):
            targets = [t.detach() for t in itertools.chain(average.parameters(), average.buffers())]
            for target, source in zip(targets, sources, strict=True):
                if first or not target.is_floating_point():
                    target.copy_(source)
                else:
                    lerp_targets.append(target)
                    lerp_sources.append(source.to(target.device, target.dtype))
                    weights.append(1.0 - decay)
        if lerp_targets:
            torch._foreach_lerp_(lerp_targets, lerp_sources, weights)
        self.n_averaged += 1

    def check_decays(self, stored: Sequence[float] | None, where: str = "the checkpoint") -> None:
        """Refuse averages stored for other decays (None: a checkpoint from before several EMAs, one average)."""
        stored = [float(d) for d in stored] if stored is not None else None
        if stored is None and len(self.decays) == 1:
            return
        if (
            stored is None
            or len(stored) != len(self.decays)
            or any(not math.isclose(a, b, rel_tol=0.0, abs_tol=1e-12) for a, b in zip(stored, self.decays, strict=True))
        ):
            kept = "one EMA" if stored is None else f"EMAs with decays {stored}"
            raise ValueError(
                f"{where} keeps {kept}, the model is configured with module.ema_decays={list(self.decays)}: set "
                "module.ema_decays to the checkpoint's"
            )

    @staticmethod
    def upgrade_state_dict(state_dict: Mapping[str, Tensor], prefix: str, decays: Sequence[float]) -> dict[str, Tensor]:
        """A state dict of one `AveragedModel` at `prefix` (`ema.module.*`, `ema.n_averaged`: dsr checkpoints before
        several EMAs) in this class's layout, its average taken as the first decay's; other state dicts unchanged."""
        old = f"{prefix}module."
        if not any(k.startswith(old) for k in state_dict):
            return dict(state_dict)
        if len(decays) != 1:
            raise ValueError(
                f"the checkpoint keeps one EMA, the model is configured with module.ema_decays={list(decays)}: "
                "set module.ema_decays to one decay (or module.ema_decay) to load it"
            )
        return {
            f"{prefix}averages.0.{k.removeprefix(old)}" if k.startswith(old) else k: v for k, v in state_dict.items()
        }


def steps_per_epoch(trainer: L.Trainer, setting: str) -> float:
    """Optimizer steps per epoch, from the datamodule; a clear error naming `setting` (what asked for epochs)."""
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "steps_per_epoch"):
        raise ValueError(f"{setting} is given in epochs: it needs a datamodule with steps_per_epoch()")
    return datamodule.steps_per_epoch()
