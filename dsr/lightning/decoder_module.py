"""Stage 1: train the pixel decoder of a frozen-encoder codec with L1 + LPIPS + a GAN loss, as RAE does.

Each optimizer step (one global batch):
  generator   z = encoder(x) + sigma * eps (sigma ~ U(0, tau) per sample), x_hat = decoder(z)
              loss = |x_hat - x|_1 + w_p * LPIPS(x_hat, x)                          (LPIPS from `lpips_start`)
                     + w_d * lambda * (-mean D(DiffAug(x_hat)))                     (from `disc_start`)
              lambda = ||grad_W rec|| / (||grad_W gan|| + 1e-6), clamped to [0, max_d_weight], W the last layer
  EMA         of the decoder (decay 0.9978 per step)
  D           hinge loss on DiffAug(x) against DiffAug(fakes): fakes are the *updated* decoder's reconstructions
              without noise, clamped and quantised to 8 bits; independent augmentations for real and fake
              (from `disc_update_start`)

Starts and schedules are given in epochs and converted to optimizer steps with the datamodule's `steps_per_epoch()`.
The generator and the discriminator use two optimizers stepped by hand; `trainer.global_step` counts generator steps
only (the discriminator's optimizer is stepped through the strategy, not through its Lightning wrapper), so
`max_steps`, checkpoint intervals and the schedules all mean generator steps. Gradient accumulation
(`accumulate_grad_batches`, set by `dsr.train`) sums k micro-batches per step: the generator steps after the k-th, then
the discriminator takes its step over the same k micro-batches against the updated decoder.

At every checkpoint and at the end of training the EMA decoder's state dict is written to `export_path`: the file
stage 2 loads as `encoder.decoder_weights`. With a validation set, the EMA decoder is scored by PSNR, SSIM and rFID.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision.utils import make_grid, save_image

from dsr.encoders.rae import RepresentationAutoencoder
from dsr.lightning.training import ema_copy, steps_per_epoch
from dsr.models.discriminator import NUM_AUGMENT_DRAWS, diff_augment, generator_loss, hinge_d_loss
from dsr.utils.files import atomic_write
from dsr.utils.frozen import drop_frozen, fill_frozen, keep_frozen_in_eval, mark_frozen
from dsr.utils.images import quantize
from dsr.utils.seeding import step_generator

ADAPTIVE_WEIGHT_EPS = 1e-6
# PSNR of identical images would be infinite; the mean squared error is clamped here (as RAE's evaluation), which caps
# the PSNR at -10 * log10(1e-10) = 100 dB.
PSNR_MSE_FLOOR = 1e-10


@dataclass
class CosineSchedule:
    """Learning-rate multiplier over optimizer steps, given in epochs: a linear warm-up from 0 over `warmup_epochs`
    ((step + 1) / warmup_steps, as RAE), then a cosine from the base rate to `final_lr` at `decay_end_epochs`, constant
    after that."""

    warmup_epochs: float = 1.0
    decay_end_epochs: float = 16.0
    final_lr: float = 2.0e-5

    def multiplier(self, step: int, steps_per_epoch: float, base_lr: float) -> float:
        warmup = int(self.warmup_epochs * steps_per_epoch)
        decay_end = max(int(self.decay_end_epochs * steps_per_epoch), warmup)
        if step < warmup:
            return (step + 1) / warmup
        final = self.final_lr / base_lr
        if step >= decay_end:
            return final
        progress = (step - warmup) / max(decay_end - warmup, 1)
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class StepDraws:
    """The random draws of one micro-batch of b images: noise-augmentation levels u [b] and noise [b, C, h, w], and
    DiffAug draws [b, 7] for the generator's fakes, the discriminator's fakes and its reals."""

    noise_level: Tensor
    noise: Tensor
    augment_generator: Tensor
    augment_fake: Tensor
    augment_real: Tensor


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR [B] of images [B, C, H, W] in [0, 1]: 20 * log10(1 / sqrt(mse)), mse clamped at 1e-10 (100 dB)."""
    mse = (x.float() - y.float()).square().flatten(1).mean(dim=1).clamp_min(PSNR_MSE_FLOOR)
    return -10.0 * torch.log10(mse)


class DecoderModule(L.LightningModule):
    """Trains `encoder.decoder`; everything else (encoder, LPIPS, discriminator backbone) is frozen.

    Args:
        encoder: the representation autoencoder (the `encoder` group), built with `freeze_decoder=False` and its noise
            augmentation `noise_tau`.
        lpips: factory of the perceptual loss, `lpips()(x_hat, x)` on images in [0, 1].
        discriminator: factory of the discriminator, `discriminator()(images in [-1, 1]) -> logits [B, N]`.
        optimizer, disc_optimizer: factories `optimizer(params)` of the decoder's and the discriminator's optimizers.
        lr_schedule: the cosine schedule, shared by both optimizers (each on its own base rate).
        perceptual_weight, disc_weight, max_d_weight: the loss weights (LPIPS, GAN, cap of the adaptive weight).
        lpips_start, disc_start, disc_update_start: epochs at which LPIPS, the generator's GAN term and the
            discriminator's updates start.
        ema_decay: per-step decay of the decoder's EMA (the exported and evaluated weights).
        augment: DiffAug settings (`translation`, `color`, `cutout`; see `dsr.models.discriminator.diff_augment`).
        export_path: where the EMA decoder's state dict is written (None: not written).
        fid_reference, inception_weights: rFID on the validation set against this reference (None: no rFID).
        grid_dir: reconstruction grids (originals over reconstructions) are saved here (None: not saved).
        num_grid_images: images per grid.
        seed: keys the noise and augmentation draws (with the step and the rank).
    """

    def __init__(
        self,
        encoder: RepresentationAutoencoder,
        lpips: Callable[[], nn.Module],
        discriminator: Callable[[], nn.Module],
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        disc_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
        lr_schedule: CosineSchedule | dict | None = None,
        perceptual_weight: float = 1.0,
        disc_weight: float = 0.75,
        max_d_weight: float = 1e4,
        lpips_start: float = 0.0,
        disc_start: float = 8.0,
        disc_update_start: float = 6.0,
        ema_decay: float = 0.9978,
        augment: Mapping[str, Any] | None = None,
        export_path: str | None = None,
        fid_reference: str | None = None,
        inception_weights: str | None = None,
        grid_dir: str | None = None,
        num_grid_images: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if encoder.decoder is None:
            raise ValueError("stage=decoder needs a decoder: set `decoder` (e.g. decoder=vit_xl)")
        if not any(p.requires_grad for p in encoder.decoder.parameters()):
            raise ValueError("the decoder is frozen: stage=decoder trains it, set encoder.freeze_decoder=false")
        self.automatic_optimization = False
        self.accumulate_grad_batches = 1  # micro-batches per optimizer step; dsr.train sets it from the batch plan
        self.codec = encoder  # `codec`: the prefix of the state-dict keys in decoder checkpoints
        self.latent_shape: tuple[int, int, int] = tuple(encoder.latent_shape)
        self.lpips = lpips()
        self.discriminator = discriminator()
        self.ema = ema_copy(encoder.decoder, ema_decay)
        self.optimizer_factory = optimizer
        self.disc_optimizer_factory = disc_optimizer or optimizer
        self.lr_schedule = (
            CosineSchedule(**lr_schedule) if isinstance(lr_schedule, Mapping) else lr_schedule or CosineSchedule()
        )
        self.perceptual_weight = perceptual_weight
        self.disc_weight = disc_weight
        self.max_d_weight = max_d_weight
        self.start_epochs = {"lpips": lpips_start, "gan": disc_start, "disc_update": disc_update_start}
        self.ema_decay = ema_decay
        self.augment = dict(augment or {})
        self.export_path = Path(export_path) if export_path else None
        self.grid_dir = Path(grid_dir) if grid_dir else None
        self.num_grid_images = num_grid_images
        self.seed = seed
        self.fid_reference = fid_reference
        self.inception = None
        if fid_reference:
            from dsr.metrics.inception import InceptionFeatures, resolve_inception_weights

            if not Path(fid_reference).exists():
                raise FileNotFoundError(f"evaluation.reference={fid_reference} not found (null turns rFID off)")
            self.inception = mark_frozen(InceptionFeatures(resolve_inception_weights(inception_weights)))
        self.run_config: dict | None = None  # the resolved Hydra config, stored in every checkpoint
        self._pending: list[tuple[Tensor, Tensor, StepDraws]] = []  # micro-batches awaiting the discriminator step
        self._last_images: Tensor | None = None  # for the final reconstruction grid
        self._val: dict[str, Any] = {}

    def train(self, mode: bool = True) -> DecoderModule:
        super().train(mode)
        keep_frozen_in_eval(self)  # encoder, LPIPS (its dropout) and the discriminator backbone stay in eval mode
        return self

    # ---------------------------------------------------------------------------------------------------
    # schedules and randomness
    # ---------------------------------------------------------------------------------------------------

    def steps_per_epoch(self) -> float:
        return steps_per_epoch(self.trainer, "stage=decoder's schedule")

    def start_step(self, name: str) -> int:
        """The optimizer step at which `lpips`, `gan` or `disc_update` starts."""
        return round(self.start_epochs[name] * self.steps_per_epoch())

    def active(self, step: int) -> dict[str, bool]:
        return {
            "lpips": self.perceptual_weight > 0 and step >= self.start_step("lpips"),
            "gan": self.disc_weight > 0 and step >= self.start_step("gan"),
            "disc_update": self.disc_weight > 0 and step >= self.start_step("disc_update"),
        }

    def step_draws(self, micro_batch_size: int, micro_index: int) -> StepDraws:
        """This micro-batch's slice of draws made for the device's whole share of the global batch, from a generator
        keyed by (seed, optimizer step, rank): a resumed run draws what an uninterrupted one would, and k accumulated
        micro-batches see what one k times larger batch would."""
        share = micro_batch_size * self.accumulate_grad_batches
        generator = step_generator(self.seed, self.global_step, self.global_rank, self.device)
        draw = dict(generator=generator, device=self.device)
        level = torch.rand(share, **draw)
        noise = torch.randn((share, *self.latent_shape), **draw)
        augments = [torch.rand(share, NUM_AUGMENT_DRAWS, **draw) for _ in range(3)]
        part = slice(micro_index * micro_batch_size, (micro_index + 1) * micro_batch_size)
        return StepDraws(level[part], noise[part], *(a[part] for a in augments))

    # ---------------------------------------------------------------------------------------------------
    # losses
    # ---------------------------------------------------------------------------------------------------

    def adaptive_weight(self, rec_loss: Tensor, gan_loss: Tensor) -> Tensor:
        """VQGAN's balance: ||grad_W rec_loss|| / (||grad_W gan_loss|| + 1e-6) on the decoder's last layer W, clamped
        to [0, max_d_weight], detached. Computed on this device's micro-batch, as RAE computes it per device."""
        last_layer = self.codec.decoder.last_layer
        (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
        (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
        weight = rec_grad.norm() / (gan_grad.norm() + ADAPTIVE_WEIGHT_EPS)
        return weight.clamp(0.0, self.max_d_weight).detach()

    def set_heads_training(self, mode: bool) -> None:
        """Train mode makes each discriminator forward run one spectral-norm power iteration; the backbone stays
        in eval mode either way."""
        self.discriminator.train(mode)
        keep_frozen_in_eval(self.discriminator)

    def generator_losses(
        self, images: Tensor, z: Tensor, draws: StepDraws, lpips: bool, gan: bool
    ) -> dict[str, Tensor]:
        """The decoder's objective on images [b, 3, H, W] in [0, 1], from their raw latents z = codec.tokens(images)
        [b, C, h, w]: a dict with `loss` (to minimise) and its terms."""
        z = self.codec.augment(z, draws.noise_level, draws.noise)  # with this step's draws
        recon = self.codec.decode_raw(z)
        l1 = (recon - images).abs().mean()
        perceptual = self.lpips(recon, images) if lpips else torch.zeros_like(l1)
        rec_loss = l1 + self.perceptual_weight * perceptual
        terms = {"l1": l1, "lpips": perceptual, "rec_loss": rec_loss}
        if gan:
            self.set_heads_training(False)  # no power iteration in the generator's pass, as RAE
            logits_fake = self.discriminator(diff_augment(recon * 2 - 1, draws.augment_generator, **self.augment))
            gan_loss = generator_loss(logits_fake)
            weight = self.adaptive_weight(rec_loss, gan_loss)
            terms.update(g_loss=gan_loss, adaptive_weight=weight, loss=rec_loss + self.disc_weight * weight * gan_loss)
        else:
            zero = torch.zeros_like(l1)
            terms.update(g_loss=zero, adaptive_weight=zero, loss=rec_loss)
        return terms

    def discriminator_losses(self, images: Tensor, z: Tensor, draws: StepDraws) -> dict[str, Tensor]:
        """The discriminator's hinge loss: reals [b, 3, H, W] in [0, 1] against the decoder's fakes from latents z."""
        decoder_mode = self.codec.decoder.training
        self.codec.decoder.eval()
        with torch.no_grad():  # fakes from the updated decoder, without noise, as 8-bit images in [-1, 1]
            fake = quantize(self.codec.decode_raw(z)).to(images.dtype) / 127.5 - 1
        self.codec.decoder.train(decoder_mode)
        real = images * 2 - 1
        # One pass over [fakes; reals]: the heads normalise per sample, so batching them together changes nothing.
        inputs = torch.cat(
            [
                diff_augment(fake, draws.augment_fake, **self.augment),
                diff_augment(real, draws.augment_real, **self.augment),
            ]
        )
        logits_fake, logits_real = self.discriminator(inputs).chunk(2)
        return {
            "d_loss": hinge_d_loss(logits_real, logits_fake),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }

    # ---------------------------------------------------------------------------------------------------
    # training
    # ---------------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        # Lightning keeps the DDP constructor's arguments only in this attribute.
        if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
            raise ValueError(
                "stage=decoder runs separate backward passes for the decoder and the discriminator heads, so each "
                "leaves the other's parameters without gradients: set trainer.strategy=ddp_find_unused_parameters_true"
            )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, _ = batch
        accumulate = self.accumulate_grad_batches
        # An epoch's last micro-batches that cannot fill a whole step are dropped, as incomplete global batches are.
        if batch_idx >= self.trainer.num_training_batches // accumulate * accumulate:
            return
        micro_index = batch_idx % accumulate
        opt_g, opt_d = self.optimizers()
        if micro_index == 0:
            opt_g.zero_grad(set_to_none=True)
            self._pending = []
        step = self.global_step
        active = self.active(step)
        draws = self.step_draws(len(images), micro_index)

        z = self.codec.tokens(images)
        terms = self.generator_losses(images, z, draws, lpips=active["lpips"], gan=active["gan"])
        self.manual_backward(terms["loss"] / accumulate)
        self._pending.append((images, z, draws))
        self._last_images = images[: self.num_grid_images].detach()
        loss = terms.pop("loss").detach()
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()})
        self.log("train/loss", loss, prog_bar=True)
        if micro_index < accumulate - 1:
            return

        opt_g.step()  # the Lightning wrapper: counts this step in trainer.global_step
        self.ema.update_parameters(self.codec.decoder)
        if active["disc_update"]:
            self.discriminator_step(opt_d.optimizer)
        with warnings.catch_warnings():
            # Before disc_update_start the discriminator's schedule advances without its optimizer having stepped.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            for scheduler in self.lr_schedulers():  # both schedules follow generator steps, from step 0
                scheduler.step()
        self._pending = []

    def discriminator_step(self, optimizer: torch.optim.Optimizer) -> None:
        """One discriminator update over the pending micro-batches (their gradients summed)."""
        optimizer.zero_grad(set_to_none=True)  # also drops what the generator's pass left in the heads
        metrics: dict[str, Tensor] = {}
        for index, (images, z, draws) in enumerate(self._pending):
            # One spectral-norm power iteration per update (train mode on the first micro-batch only), so the update
            # does not depend on how the batch is split.
            self.set_heads_training(index == 0)
            out = self.discriminator_losses(images, z, draws)
            self.manual_backward(out["d_loss"] / len(self._pending))
            for key, value in out.items():
                metrics[key] = metrics.get(key, 0) + value.detach() / len(self._pending)
        self.set_heads_training(False)
        # Through the strategy (precision plugin included) but not the LightningOptimizer wrapper, which would count
        # this as another step of trainer.global_step.
        self.trainer.strategy.optimizer_step(optimizer, closure=lambda: None)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()})

    def configure_optimizers(self) -> list[dict]:
        steps_per_epoch = self.steps_per_epoch()
        configs = []
        for name, factory, module in (
            ("decoder", self.optimizer_factory, self.codec.decoder),
            ("discriminator", self.disc_optimizer_factory, self.discriminator),
        ):
            optimizer = factory([p for p in module.parameters() if p.requires_grad])
            base_lr = optimizer.param_groups[0]["lr"]
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda step, base_lr=base_lr: self.lr_schedule.multiplier(step, steps_per_epoch, base_lr),
            )
            configs.append(
                {
                    "optimizer": optimizer,
                    "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": f"lr/{name}"},
                }
            )
        return configs

    # ---------------------------------------------------------------------------------------------------
    # reconstruction and evaluation
    # ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(self, images: Tensor, use_ema: bool = True) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] -> reconstructions [B, 3, H, W] (not clamped), without noise augmentation."""
        decoder = self.ema.module if use_ema else self.codec.decoder
        # As codec.decode_raw, with the chosen decoder.
        return decoder(self.codec.tokens(images)) * self.codec.pixel_std + self.codec.pixel_mean

    def on_validation_epoch_start(self) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val = {"psnr": zero.clone(), "ssim": zero.clone(), "count": zero.clone(), "pool": [], "grid": None}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, _ = batch
        recon = quantize(self.reconstruct(images))
        # Scored as the 8-bit images they would be saved as; the data's images are 8-bit already.
        target = quantize(images).float() / 255
        predicted = recon.float() / 255
        self._val["psnr"] += psnr(predicted, target).double().sum()
        ssim = structural_similarity_index_measure(predicted, target, data_range=1.0, reduction="none")
        self._val["ssim"] += ssim.double().sum()
        self._val["count"] += len(images)
        if self.inception is not None:
            self._val["pool"].append(self.inception(recon)[0])
        if self._val["grid"] is None:
            self._val["grid"] = (images[: self.num_grid_images], predicted[: self.num_grid_images])

    def on_validation_epoch_end(self) -> None:
        strategy = self.trainer.strategy
        totals = {k: strategy.reduce(self._val[k], reduce_op="sum") for k in ("psnr", "ssim", "count")}
        count = max(float(totals["count"]), 1.0)
        metrics = {"val/psnr": float(totals["psnr"]) / count, "val/ssim": float(totals["ssim"]) / count}
        if self.inception is not None:
            metrics["val/rfid"] = self.rfid()
        self.log_dict(metrics, sync_dist=False)
        if self._val["grid"] is not None:
            self.save_grid(*self._val["grid"], f"step_{self.global_step:07d}")
        self._val = {}

    def rfid(self) -> float:
        """FID of the gathered reconstructions' Inception features against `fid_reference` (computed on rank 0)."""
        from dsr.metrics.reference import default_cache_dir, reference_statistics
        from dsr.metrics.scores import FeatureStats, frechet_distance

        pool = self._val["pool"]
        local = torch.cat(pool) if pool else torch.empty(0, 2048, device=self.device)
        features = gather_rows(self, local)
        value = torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        if self.trainer.is_global_zero and len(features) >= 2:
            reference, _ = reference_statistics(
                self.fid_reference, self.inception, default_cache_dir(), device=self.device, need_features=False
            )
            value.fill_(frechet_distance(FeatureStats.from_features(features.cpu()), reference))
        return float(self.trainer.strategy.broadcast(value, src=0))

    def save_grid(self, originals: Tensor, reconstructions: Tensor, name: str) -> Path | None:
        """Originals over reconstructions (rank 0): `<grid_dir>/<name>.png`."""
        if self.grid_dir is None or not self.trainer.is_global_zero:
            return None
        self.grid_dir.mkdir(parents=True, exist_ok=True)
        rows = torch.cat([originals.float().cpu(), reconstructions.float().clamp(0, 1).cpu()])
        path = self.grid_dir / f"{name}.png"
        save_image(make_grid(rows, nrow=len(originals), padding=1, pad_value=1.0), path)
        return path

    def on_train_end(self) -> None:
        self.export_decoder()
        if self._last_images is not None:
            self.save_grid(self._last_images, self.reconstruct(self._last_images), "final")

    # ---------------------------------------------------------------------------------------------------
    # checkpoints and export
    # ---------------------------------------------------------------------------------------------------

    def export_decoder(self) -> None:
        """Write the EMA decoder's state dict to `export_path` (rank 0, atomically)."""
        if self.export_path is None or (self._trainer is not None and not self.trainer.is_global_zero):
            return
        state = {k: v.detach().cpu().clone() for k, v in self.ema.module.state_dict().items()}
        self.export_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.export_path, lambda f: torch.save(state, f))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen encoder, LPIPS and discriminator backbone reload from their own files.
        checkpoint["state_dict"] = drop_frozen(self, checkpoint["state_dict"])
        checkpoint["dsr"] = {"config": self.run_config, "latent_shape": list(self.latent_shape)}
        self.export_decoder()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        return super().load_state_dict(fill_frozen(self, state_dict), strict=strict, assign=assign)


def gather_rows(module: L.LightningModule, rows: Tensor) -> Tensor:
    """Concatenate every rank's rows [n_r, D] (n_r may differ between ranks) -> [sum n_r, D] on every rank."""
    if module.trainer.world_size == 1:
        return rows
    counts = module.all_gather(torch.tensor(len(rows), device=rows.device)).flatten().tolist()
    padded = rows.new_zeros(max(counts), rows.shape[1])
    padded[: len(rows)] = rows
    gathered = module.all_gather(padded)  # [world, max_n, D]
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])
