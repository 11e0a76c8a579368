"""Stage 2: flow-matching training of a diffusion transformer on the latents of a frozen encoder.

The module owns the encoder (images -> latents), the backbone (built for the encoder's latent shape),
its EMA copies (one per decay of `ema_decays`), the transport (noise path, time distribution, loss) and the sampler
(ODE/SDE solver, guidance: classifier-free or AutoGuidance, precision). Sampling uses the first EMA unless asked
otherwise (`ema=<decay>`, or `ema="none"` for the raw weights).

The sampler's time shift and grid end come from the transport the model was trained with; a sampler that sets its own
(`sampler.shift`, `sampler.solver.t_end`) is allowed and warned about, naming both values (`use_sampler`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from dsr.config import rename_keys
from dsr.diffusion.guidance import AutoGuidance, ClassifierFreeGuidance, Guide
from dsr.diffusion.samplers import SDESampler, sampling_autocast
from dsr.diffusion.transport import Transport
from dsr.encoders.base import LatentCodec
from dsr.lightning.training import EMAs, NonFiniteError, NonFiniteGuard, gradient_norms, steps_per_epoch
from dsr.utils.files import load_tensors
from dsr.utils.frozen import drop_frozen, fill_frozen
from dsr.utils.seeding import step_generator

log = logging.getLogger(__name__)


@dataclass
class LRSchedule:
    """Learning-rate multiplier over optimizer steps, given in epochs.

    `warmup_epochs` ramps linearly from 0; then the rate stays constant until `constant_epochs` (None: forever,
    the DSR release's recipe) and decays linearly to `final_lr` at `decay_end_epochs` (RAE: 40 -> 800, to 2e-5).
    """

    warmup_epochs: float = 0.0
    constant_epochs: float | None = None
    decay_end_epochs: float | None = None
    final_lr: float | None = None

    def multiplier(self, step: int, steps_per_epoch: float, base_lr: float) -> float:
        epoch = step / steps_per_epoch
        if self.warmup_epochs and epoch < self.warmup_epochs:
            return epoch / self.warmup_epochs
        if self.constant_epochs is None or epoch < self.constant_epochs:
            return 1.0
        if self.decay_end_epochs is None or self.final_lr is None:
            raise ValueError("module.lr_schedule: a decay needs decay_end_epochs and final_lr")
        final = self.final_lr / base_lr
        progress = min(1.0, (epoch - self.constant_epochs) / (self.decay_end_epochs - self.constant_epochs))
        return 1.0 - (1.0 - final) * progress


class DiTModule(L.LightningModule):
    def __init__(
        self,
        backbone: Callable[..., nn.Module],
        encoder: LatentCodec,
        transport: Transport,
        solver: Any,
        guidance: ClassifierFreeGuidance | AutoGuidance,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        lr_schedule: LRSchedule | dict | None = None,
        ema_decay: float = 0.9999,
        ema_decays: Sequence[float] | None = None,
        seed: int = 0,
        sampling_precision: str = "32-true",
        sampling_shift: float | None = None,
        nonfinite_patience: int = 20,
    ) -> None:
        """`backbone` is a factory taking `in_channels` and `input_size`, so the backbone is sized by the encoder.
        `ema_decays` keeps one EMA per decay (the first is the one sampling uses by default); None keeps one, with
        `ema_decay`. An optimizer step with a NaN or Inf in its loss or gradients is skipped (`NonFiniteGuard`);
        after `nonfinite_patience` consecutive skips the run stops (0 turns the guard off)."""
        super().__init__()
        self.encoder = encoder
        self.latent_shape: tuple[int, int, int] = tuple(encoder.latent_shape)
        channels, height, width = self.latent_shape
        self.backbone = backbone(in_channels=channels, input_size=(height, width))
        self.ema = EMAs(self.backbone, [ema_decay] if ema_decays is None else list(ema_decays))
        self.transport = transport
        self.optimizer_factory = optimizer
        self.lr_schedule = LRSchedule(**lr_schedule) if isinstance(lr_schedule, dict) else lr_schedule or LRSchedule()
        self.seed = seed
        self.solver = solver
        self.guidance = guidance
        self.sampling_precision = sampling_precision
        self.sampling_shift = sampling_shift
        if nonfinite_patience < 0:
            raise ValueError(f"module.nonfinite_patience must be >= 0 (0: no guard), got {nonfinite_patience}")
        self.nonfinite_patience = nonfinite_patience
        self.guard: NonFiniteGuard | None = None  # built at the first step, on the training device
        self._guard_state: dict | None = None  # the guard's counters from a checkpoint being resumed
        self._loss_bad: Tensor | None = None  # any micro-batch of the current step with a non-finite loss
        self._skip: Tensor | None = None  # this step's skip flag, for the EMA
        self._last_loss: Tensor | None = None
        self._last_batch_idx = 0
        self.run_config: dict | None = None  # the resolved Hydra config, stored in every checkpoint
        self.yields_latents = False  # batches hold raw latents, not images (the datamodule says so at setup)

    # ---------------------------------------------------------------------------------------------------
    # training
    # ---------------------------------------------------------------------------------------------------

    def step_randomness(self, batch_idx: int, micro_batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """Noise [b, C, h, w], times [b] and label-drop draws [b] for this micro-batch.

        They are drawn for the device's whole share of the global batch from a generator keyed by
        (seed, optimizer step, rank), and this micro-batch takes its slice. So a resumed run draws exactly
        what an uninterrupted one would have, and k accumulated micro-batches see exactly what one batch
        k times larger would.
        """
        accumulate = self.trainer.accumulate_grad_batches
        generator = step_generator(self.seed, self.global_step, self.global_rank, self.device)
        share = micro_batch_size * accumulate
        noise = torch.randn((share, *self.latent_shape), generator=generator, device=self.device)
        t = self.transport.sample_time(share, self.latent_shape, generator=generator, device=self.device)
        uniform = torch.rand(share, generator=generator, device=self.device)
        part = slice((batch_idx % accumulate) * micro_batch_size, (batch_idx % accumulate + 1) * micro_batch_size)
        return noise[part], t[part], uniform[part]

    def setup(self, stage: str) -> None:
        self.yields_latents = getattr(self.trainer.datamodule, "yields_latents", self.yields_latents)
        # At start-up: a guide that cannot be loaded or does not fit fails here, not at the first evaluation.
        self.use_sampler(self.solver, self.guidance, self.sampling_precision, self.sampling_shift)

    def latents(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Normalised latents [B, C, h, w] and labels [B] of a batch `(x, y)`: x holds images, encoded here, or (with
        `yields_latents`, as with `data=latents`) raw latents from `dsr.data.latents.CachedLatents`, normalised
        here by the same codec."""
        x, y = batch
        with torch.no_grad():
            return (self.encoder.normalize(x.float()) if self.yields_latents else self.encoder.encode(x)), y

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        z, y = self.latents(batch)
        noise, t, uniform = self.step_randomness(batch_idx, len(y))
        y = self.backbone.y_embedder.drop_labels(y, uniform)
        out = self.transport.training_loss(self.backbone, z, y, noise=noise.to(z.dtype), t=t.to(z.dtype))
        if self.nonfinite_patience:
            bad = ~torch.isfinite(out.loss.detach())
            self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad
            self._last_loss, self._last_batch_idx = out.loss.detach(), batch_idx
        self.log("train/loss", out.loss, prog_bar=True)
        if out.masked_fraction is not None:
            self.log("train/masked_fraction", out.masked_fraction)
        return out.loss

    def logs_this_step(self) -> bool:
        """Whether the trainer writes this optimizer step's logged values (Lightning's cadence, `log_every_n_steps`,
        read before the step). Values only the loggers read are logged on these steps alone: each `self.log` costs
        about a millisecond of Python, and a value logged on another step is overwritten unread."""
        trainer = self.trainer
        every = trainer.log_every_n_steps
        return bool(every) and ((trainer.global_step + 1) % every == 0 or trainer.should_stop)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Before clipping: the norm the optimizer would have seen without it (on the device: no host sync).
        if not self.nonfinite_patience:
            if self.logs_this_step():
                norms = gradient_norms(list(self.backbone.parameters()), self.device)
                self.log("train/grad_norm", norms.square().sum().sqrt())
            return
        if self.guard is None:
            trained = [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]
            self.guard = NonFiniteGuard(trained, self.device)
            if self._guard_state is not None:  # resumed: keep counting where the checkpoint stopped
                self.guard.load_state_dict(self._guard_state)
        reduce = None
        if self.trainer.world_size > 1:
            reduce = lambda flag: self.trainer.strategy.reduce(flag, reduce_op="max")  # noqa: E731
        loss_bad = self._loss_bad
        if loss_bad is None:
            loss_bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self._skip, total = self.guard.check(
            optimizer, self._last_loss, loss_bad, self.global_step, self._last_batch_idx, reduce
        )
        self._loss_bad = None
        if self.logs_this_step():
            self.log("train/grad_norm", total)
            self.log("train/skipped_steps", self.guard.skipped)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.backbone, skip=self._skip)
        self._skip = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The guard's counters are read on the host at the logging cadence (and at the last step), not every step.
        guard, trainer = self.guard, self.trainer
        if guard is None or trainer.global_step == getattr(self, "_checked_step", -1):
            return
        last = 0 < trainer.max_steps <= trainer.global_step
        if trainer.global_step % max(1, trainer.log_every_n_steps) and not last:
            return
        self._checked_step = trainer.global_step
        if int(guard.longest) >= self.nonfinite_patience:
            diagnosis = guard.diagnosis()
            path = self.write_nonfinite_diagnosis(diagnosis)
            raise NonFiniteError(
                f"{diagnosis['longest_run']} consecutive optimizer steps had a NaN or Inf in the loss or the "
                f"gradients (module.nonfinite_patience={self.nonfinite_patience}), the latest run from step "
                f"{diagnosis['first_step_of_run']}; they were skipped (weights, optimizer state and EMA untouched), "
                f"so the last checkpoint holds the last good weights. Diagnosis: {path}"
            )

    def write_nonfinite_diagnosis(self, diagnosis: dict) -> Path:
        """`<run dir>/nonfinite_step_<step>.json`: the guard's diagnosis and the sample indices of the first skipped
        step's batch on rank 0 (map-style data; a stream has none)."""
        import json

        from dsr.utils.files import atomic_write

        diagnosis = {**diagnosis, "rank": self.global_rank, "sample_indices": self._batch_indices(diagnosis)}
        path = Path(self.trainer.default_root_dir) / f"nonfinite_step_{diagnosis['first_step_of_run']:08d}.json"
        if self.trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: f.write((json.dumps(diagnosis, indent=2) + "\n").encode()))
        return path

    def _batch_indices(self, diagnosis: dict) -> list[int] | None:
        """The dataset indices of the micro-batches of the first skipped step, recomputed from the seeded sampler."""
        loader = self.trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if sampler is None or not hasattr(sampler, "set_epoch") or getattr(loader, "batch_size", None) is None:
            return None
        accumulate = self.trainer.accumulate_grad_batches
        steps_per_epoch = max(1, len(loader) // accumulate)
        epoch = diagnosis["first_step_of_run"] // steps_per_epoch
        sampler.set_epoch(epoch)
        order = list(sampler)
        sampler.set_epoch(self.trainer.current_epoch)
        last = diagnosis["batch_idx"] + 1
        start = (last - accumulate) * loader.batch_size
        return [int(i) for i in order[max(0, start) : last * loader.batch_size]]

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory([p for p in self.backbone.parameters() if p.requires_grad])
        base_lr = optimizer.param_groups[0]["lr"]
        steps_per_epoch = self.steps_per_epoch()
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.lr_schedule.multiplier(step, steps_per_epoch, base_lr)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def steps_per_epoch(self) -> float:
        return steps_per_epoch(self.trainer, "module.lr_schedule")

    # ---------------------------------------------------------------------------------------------------
    # sampling
    # ---------------------------------------------------------------------------------------------------

    @property
    def ema_decays(self) -> tuple[float, ...]:
        return self.ema.decays

    def sampling_model(self, ema: float | str = "auto") -> nn.Module:
        """The weights sampling uses: "auto" the first EMA, a decay that EMA, "none" the raw training weights."""
        return select_weights(self.backbone, self.ema, ema)

    def use_sampler(
        self,
        solver: Any,
        guidance: ClassifierFreeGuidance | AutoGuidance,
        precision: str = "32-true",
        shift: float | None = None,
    ) -> None:
        """Sample with this solver, guidance, precision ("32-true", "bf16-mixed") and time shift (None: the training
        one).

        A shift or a grid end (`solver.t_end`) that differs from the transport's is used as asked, with a warning
        naming both values. An AutoGuidance guide is loaded here (if not already) and refused if it does not fit.
        """
        sampling_autocast(precision, self.device)  # an unknown precision fails here
        if self.transport.noise_scale != 1.0 and isinstance(solver, SDESampler):
            raise ValueError(
                f"sampler=sde* assumes unit noise and this model was trained with transport.noise_scale="
                f"{self.transport.noise_scale}: use an ODE sampler (sampler=jit, heun, euler or dopri5)"
            )
        trained_shift = self.transport.shift_for(self.latent_shape)
        if shift is not None and not math.isclose(float(shift), trained_shift, rel_tol=1e-9):
            log.warning("sampler.shift=%g differs from the time shift the model was trained with (%g)", shift,
                        trained_shift)  # fmt: skip
        own_end = getattr(solver, "t_end", None)
        if getattr(solver, "takes_transport_end", False) and own_end is not None:
            if not math.isclose(float(own_end), self.transport.sample_t_end, abs_tol=1e-12):
                log.warning(
                    "sampler.solver.t_end=%g differs from the end of the training interval (1 - transport.t_max = %g)",
                    own_end, self.transport.sample_t_end,
                )  # fmt: skip
        if isinstance(guidance, AutoGuidance) and guidance.guide is None:
            guidance.attach(load_guide(guidance.guide_ckpt, guidance.guide_ema, self))
        self.solver, self.guidance = solver, guidance
        self.sampling_precision, self.sampling_shift = precision, shift

    @torch.no_grad()
    def sample(
        self,
        y: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        ema: float | str = "auto",
        progress: bool = False,
    ) -> Tensor:
        """Class labels y [B] -> images [B, 3, H, W] in [0, 1], through the sampler and the encoder's decoder.

        `ema` picks the weights (`sampling_model`). `generator` may be one generator per row (a stochastic sampler
        then draws each row's noise from its own). The network runs under `sampling_precision`; the integration
        state stays float32."""
        if noise is None:
            if not isinstance(generator, torch.Generator | None):
                raise ValueError("pass `noise` explicitly when giving one generator per row")
            noise = torch.randn((len(y), *self.latent_shape), generator=generator, device=self.device)
        noise = noise * self.transport.noise_scale  # standard normal draws; JiT at 512 px samples from 2 N(0, I)
        model = self.sampling_model(ema)
        velocity_fn = self.guidance.velocity_fn(model, y.to(self.device), model.null_class, self.transport)
        shift = self.transport.shift_for(self.latent_shape) if self.sampling_shift is None else self.sampling_shift
        with sampling_autocast(self.sampling_precision, self.device):
            z = self.solver.integrate(
                velocity_fn, noise, shift, generator=generator, progress=progress, t_end=self.transport.sample_t_end
            )
        return self.encoder.decode(z.float()).clamp(0, 1)

    # ---------------------------------------------------------------------------------------------------
    # checkpoints
    # ---------------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen encoder and decoder reload from their own files; the latent statistics stay (buffers).
        checkpoint["state_dict"] = drop_frozen(self, checkpoint["state_dict"])
        checkpoint["dsr"] = {
            "config": self.run_config,
            "latent_shape": list(self.latent_shape),
            "ema_decays": list(self.ema.decays),
        }
        if self.guard is not None:
            checkpoint["dsr"]["nonfinite"] = self.guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Before the weights load (a resume): averages stored for other decays are refused with both lists.
        self.ema.check_decays(checkpoint.get("dsr", {}).get("ema_decays"))
        self._guard_state = checkpoint.get("dsr", {}).get("nonfinite")

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        state_dict = EMAs.upgrade_state_dict(state_dict, "ema.", self.ema.decays)  # a checkpoint with one EMA
        return super().load_state_dict(fill_frozen(self, state_dict), strict=strict, assign=assign)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> DiTModule:
        """Rebuild the module from the config stored in a training checkpoint and load its weights (EMA included)."""
        checkpoint = load_tensors(path, "ckpt", map_location)
        config = checkpoint.get("dsr", {}).get("config")
        if config is None:
            raise ValueError(f"{path} holds no dsr config: it was not written by dsr.train")
        build = rename_keys("train", OmegaConf.create(config), warn=False)  # a checkpoint's older spellings
        if "stats" in build.module.encoder:
            build.module.encoder.stats = None  # the statistics are in the checkpoint; the file may have moved
        module = instantiate(build.module)
        module.ema.check_decays(checkpoint.get("dsr", {}).get("ema_decays"), str(path))
        module.load_state_dict(checkpoint["state_dict"])
        module.run_config = config
        return module.eval()


# -------------------------------------------------------------------------------------------------------
# weights and guides
# -------------------------------------------------------------------------------------------------------


def select_weights(raw: nn.Module, emas: EMAs, ema: float | str = "auto") -> nn.Module:
    """`raw` for ema="none", the first EMA for "auto", else the EMA of that decay (an error listing the decays)."""
    if isinstance(ema, str):
        if ema == "none":
            return raw
        if ema == "auto":
            return emas.module
        try:
            ema = float(ema)
        except ValueError:
            raise ValueError(f"ema={ema!r}: choose auto (the first EMA), none (the raw weights) or a decay") from None
    if isinstance(ema, bool):  # the older use_ema flag
        return emas.module if ema else raw
    return emas.select(float(ema))


def _latent_identity(config: Mapping) -> dict:
    """What in a stored run config fixes the latent space: the encoder's settings, without the paths of files that
    only reload it (statistics, decoder) and the decoder, which does not change the latents."""
    encoder = dict(config["module"]["encoder"])
    for key in ("stats", "decoder", "decoder_weights", "freeze_decoder", "precision", "local_files_only"):
        encoder.pop(key, None)
    return encoder


def load_guide(path: str | Path, ema: float | str, main: DiTModule) -> Guide:
    """The AutoGuidance guide of `main`: the backbone of the dsr checkpoint at `path` (a training checkpoint or a
    `dsr.convert` file) with the weights `ema` selects, and its transport, which turns its output into a velocity.

    Refused with a message naming the difference when its latent space is not `main`'s: the latent shape, the
    encoder, the latent statistics or the time shift. Its prediction type may differ. Only the backbone is built
    (the guide's encoder and decoder would duplicate `main`'s)."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"sampler.guidance.guide_ckpt={path}: no checkpoint there")
    checkpoint = load_tensors(path, "sampler.guidance.guide_ckpt")
    stored = checkpoint.get("dsr", {})
    if stored.get("config") is None:
        raise ValueError(f"sampler.guidance.guide_ckpt={path} holds no dsr config: convert it with dsr.convert stage2")
    config = OmegaConf.to_container(rename_keys("train", OmegaConf.create(stored["config"]), warn=False))
    where = f"sampler.guidance.guide_ckpt={path}"
    shape = tuple(stored.get("latent_shape", ()))
    if shape != tuple(main.latent_shape):
        raise ValueError(
            f"{where}: the guide's latent shape {list(shape)} is not the model's {list(main.latent_shape)}"
        )
    if main.run_config is not None:
        ours, theirs = _latent_identity(main.run_config), _latent_identity(config)
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if differ:
            changes = "; ".join(f"encoder.{k}: guide {theirs.get(k)!r}, model {ours.get(k)!r}" for k in differ)
            raise ValueError(f"{where}: the guide was trained on another encoder ({changes})")
    state = checkpoint["state_dict"]
    for key, value in main.state_dict().items():
        if key.startswith("encoder.") and key.rsplit(".", 1)[-1] in ("latent_mean", "latent_var") and key in state:
            if state[key].shape != value.shape or not torch.allclose(state[key].to(value), value, rtol=1e-6, atol=0):
                raise ValueError(f"{where}: the guide's latent statistics ({key}) are not the model's")
    transport = instantiate(config["module"]["transport"])
    guide_shift, shift = transport.shift_for(shape), main.transport.shift_for(main.latent_shape)
    if not math.isclose(guide_shift, shift, rel_tol=1e-9):
        raise ValueError(f"{where}: the guide was trained with time shift {guide_shift:g}, the model with {shift:g}")
    if transport.noise_scale != main.transport.noise_scale:
        raise ValueError(f"{where}: the guide was trained with transport.noise_scale={transport.noise_scale:g}, "
                         f"the model with {main.transport.noise_scale:g}")  # fmt: skip
    channels, height, width = shape
    backbone = instantiate(config["module"]["backbone"])(in_channels=channels, input_size=(height, width))
    module_config = config["module"]
    decays = module_config.get("ema_decays") or [module_config.get("ema_decay", 0.9999)]
    emas = EMAs(backbone, stored.get("ema_decays") or decays)
    holder = nn.ModuleDict({"backbone": backbone, "ema": emas})
    upgraded = EMAs.upgrade_state_dict(state, "ema.", decays)
    weights = {k: v for k, v in upgraded.items() if k.startswith(("backbone.", "ema."))}
    holder.load_state_dict(weights)
    model = select_weights(backbone, emas, ema).eval().requires_grad_(False)
    log.info("AutoGuidance guide: %s (%s weights, %s-prediction)", path, ema, transport.prediction)
    return Guide(model=model, transport=transport)
