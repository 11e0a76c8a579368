"""What the stage-1 and stage-2 LightningModules share: EMA copies of the trained network, and the epoch length that
turns schedules given in epochs into optimizer steps."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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
        self._updates: int | None = None  # n_averaged, mirrored on the host

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
    def update(self, model: nn.Module, skip: Tensor | None = None) -> None:
        """Average `model`'s current weights in. `skip` (a 0-dim device flag, 1 = skip): leave every average as it is,
        decided on the device (a skipped optimizer step left the weights unchanged; so does the EMA)."""
        if self._updates is None:  # read once, then counted here: no host sync per step
            self._updates = int(self.n_averaged)
        sources = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
        first = self._updates == 0
        keep = None if skip is None else 1.0 - skip.float()
        lerp_targets, lerp_sources, weights = [], [], []
        for decay, average in zip(self.decays, self.averages, strict=True):
            targets = [t.detach() for t in itertools.chain(average.parameters(), average.buffers())]
            weight = 1.0 - decay if keep is None else keep * (1.0 - decay)
            for target, source in zip(targets, sources, strict=True):
                if first or not target.is_floating_point():
                    target.copy_(source)  # the first update copies (skipped or not, the weights are the initial ones)
                else:
                    lerp_targets.append(target)
                    lerp_sources.append(source.to(target.device, target.dtype))
                    weights.append(weight)
        if lerp_targets:
            torch._foreach_lerp_(lerp_targets, lerp_sources, weights)
        self.n_averaged += 1
        self._updates += 1

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._updates = None  # the loaded n_averaged is read at the next update

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


def gradient_norms(params: Sequence[nn.Parameter], device: torch.device) -> Tensor:
    """The 2-norms [n] of the gradients of `params` that have one, float32, computed on the device (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads)).float() if grads else torch.zeros(0, device=device)


def block_of(name: str) -> str:
    """The block a parameter belongs to, for per-block gradient norms: `blocks.3`, `head_blocks.0`, else its top-level
    module (`x_embedder`, `final_layer`, ...)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


class NonFiniteError(RuntimeError):
    """Training stopped after too many consecutive optimizer steps with a NaN or Inf in the loss or the gradients."""


class NonFiniteGuard:
    """Skips every optimizer step whose loss or gradients hold a NaN or Inf, decided on the device (no host sync).

    `check(...)` after the backward pass returns a 0-dim flag (1 = skip) and hands it to a fused Adam / AdamW as its
    `found_inf` (the mechanism PyTorch's GradScaler uses), which then leaves the weights and the optimizer state
    untouched; `EMAs.update(skip=flag)` leaves the averages untouched too. An optimizer without `found_inf` (not fused)
    gets the decision on the host instead (one sync per step): its gradients are set to None, which every PyTorch
    optimizer skips. Under several ranks the flag is reduced with max, so every rank skips the same steps (under FSDP
    each rank holds only a shard of the gradients).

    The learning-rate schedule and `global_step` still advance over a skipped step: the step counts batches drawn, and
    the data position, the seeded per-step randomness and the checkpoint cadence are keyed by it, so a skipped step is
    a lost batch rather than a paused clock (and a resume stays exact).

    On the device it keeps the number of skipped steps, the current and the longest run of consecutive skips, and, for
    the first step of the latest run, its step, loss, batch index and per-block gradient norms (`diagnosis()` reads
    them on the host, at the logging cadence)."""

    def __init__(self, named_parameters: list[tuple[str, nn.Parameter]], device: torch.device) -> None:
        self.params = [p for _, p in named_parameters]
        blocks = list(dict.fromkeys(block_of(n) for n, _ in named_parameters))
        self.blocks = blocks
        self.block_index = torch.tensor([blocks.index(block_of(n)) for n, _ in named_parameters], device=device)
        zero = torch.zeros((), device=device)
        self.skipped = zero.clone()
        self.streak = zero.clone()
        self.longest = zero.clone()
        self.first_step = zero.clone()
        self.first_loss = zero.clone()
        self.first_batch = zero.clone()
        self.first_block_norms = torch.zeros(len(blocks), device=device)

    def check(
        self,
        optimizer: torch.optim.Optimizer,
        loss: Tensor,
        loss_bad: Tensor,
        step: int,
        batch_idx: int,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The skip flag (0-dim float, 1 = skip) and the total gradient norm (before any clipping) of this step.
        `loss`: the last micro-batch's loss; `loss_bad`: whether any micro-batch's loss was non-finite;
        `reduce(flag)` makes the flag the same on every rank (max)."""
        norms = gradient_norms(self.params, loss_bad.device)
        index = self.block_index
        if len(norms) != len(self.params):  # some parameters took no part in this step (rare): their rows go
            index = index[torch.tensor([p.grad is not None for p in self.params], device=index.device)]
        total = norms.square().sum().sqrt()
        bad = (loss_bad | ~torch.isfinite(total)).float()
        if reduce is not None:
            bad = reduce(bad)
        self.skipped += bad
        self.streak = (self.streak + 1) * bad
        self.longest = torch.maximum(self.longest, self.streak)
        start = self.streak == 1
        block_norms = torch.zeros_like(self.first_block_norms).index_add_(0, index, norms.square()).sqrt()
        self.first_block_norms = torch.where(start, block_norms, self.first_block_norms)
        self.first_step.masked_fill_(start, step)
        self.first_batch.masked_fill_(start, batch_idx)
        self.first_loss = torch.where(start, loss.detach().float(), self.first_loss)
        inner = getattr(optimizer, "optimizer", optimizer)
        if isinstance(inner, torch.optim.Adam) and inner.defaults.get("fused"):
            inner.found_inf = bad
        elif bool(bad):  # host decision: every optimizer skips parameters without gradients
            for p in self.params:
                p.grad = None
        return bad, total

    COUNTERS = ("skipped", "streak", "longest", "first_step", "first_loss", "first_batch", "first_block_norms")

    def state_dict(self) -> dict[str, list[float] | float]:
        """The counters as plain numbers, for the checkpoint (read on the host: at checkpoint time only)."""
        return {name: getattr(self, name).tolist() for name in self.COUNTERS}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Counters from `state_dict`, so a resumed run keeps counting skips (and a run of them) where it stopped."""
        for name in self.COUNTERS:
            current = getattr(self, name)
            value = torch.tensor(state[name], dtype=current.dtype, device=current.device)
            if value.shape != current.shape:  # another block layout: the diagnosis part starts afresh
                continue
            setattr(self, name, value)

    def diagnosis(self) -> dict:
        """What the host reports about the latest run of skipped steps."""
        return {
            "skipped_steps": int(self.skipped),
            "longest_run": int(self.longest),
            "first_step_of_run": int(self.first_step),
            "loss": float(self.first_loss),
            "batch_idx": int(self.first_batch),
            "block_grad_norms": dict(zip(self.blocks, self.first_block_norms.tolist(), strict=True)),
        }
