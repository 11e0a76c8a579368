"""Faults a long run meets, injected: non-finite steps (skipped, counted, and a stop after too many in a row)."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
import torch
from helpers import TINY_RUN

from dsr.lightning.training import NonFiniteError

COMMON = [*TINY_RUN, "callbacks.sample_grid.every_n_steps=0", "trainer.deterministic=true"]


class PlantNaN(L.Callback):
    """A NaN in one gradient of the backbone at the given optimizer steps (after the backward, before the step)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            pl_module.backbone.final_layer.linear.weight.grad[0, 0] = float("nan")


class Snapshot(L.Callback):
    """The weights, optimizer state and EMA before and after one optimizer step."""

    def __init__(self, step):
        self.step, self.before, self.after = step, None, None

    @staticmethod
    def state(trainer, pl_module):
        optimizer = trainer.optimizers[0].state_dict()["state"]
        return ({k: v.clone() for k, v in pl_module.backbone.state_dict().items()},
                {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.items()},
                {k: v.clone() for k, v in pl_module.ema.state_dict().items() if k != "n_averaged"})  # fmt: skip

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.before = self.state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            self.after = self.state(trainer, pl_module)


def fit(overrides, run_dir, callbacks=()):
    from helpers import compose_train

    from dsr import train as train_command

    cfg = compose_train(overrides, run_dir)
    original = train_command.instantiate

    def with_callbacks(node, *args, **kwargs):  # the trainer gets the planted faults beside the configured callbacks
        if kwargs.get("callbacks") is not None:
            kwargs["callbacks"] = [*kwargs["callbacks"], *callbacks]
        return original(node, *args, **kwargs)

    train_command.instantiate = with_callbacks
    try:
        return train_command.train(cfg)
    finally:
        train_command.instantiate = original


@pytest.mark.parametrize("fused", [True, False], ids=["fused-on-device", "unfused-on-host"])
def test_a_nonfinite_step_is_skipped_and_touches_nothing(tmp_path, fused):
    snapshot = Snapshot(3)
    overrides = [*COMMON, f"module.optimizer.fused={str(fused).lower()}", "trainer.max_steps=6"]
    fit(overrides, tmp_path, [PlantNaN({3}), snapshot])
    (w0, opt0, ema0), (w1, opt1, ema1) = snapshot.before, snapshot.after
    for before, after in ((w0, w1), (ema0, ema1)):
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for key in opt0:
        assert all(torch.equal(opt0[key][n], opt1[key][n]) for n in opt0[key]), key  # moments and step count
    rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    skipped = {int(r["step"]): float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")}
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[5] == 1  # logged at step index k for optimizer step k
    assert math.isnan(float(next(r["train/grad_norm"] for r in rows if r.get("train/grad_norm") and r["step"] == "3")))
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 6 and all(torch.isfinite(v).all() for v in final["state_dict"].values()
                                             if v.is_floating_point())  # fmt: skip


def test_consecutive_nonfinite_steps_stop_the_run_with_a_diagnosis(tmp_path):
    from torch.utils.data import DistributedSampler

    overrides = [*COMMON, "module.nonfinite_patience=3", "trainer.max_steps=20",
                 "callbacks.checkpoint.every_n_train_steps=2"]  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"3 consecutive optimizer steps .* from step 2") as stopped:
        fit(overrides, tmp_path, [PlantNaN(range(2, 100))])
    diagnosis_path = tmp_path / "nonfinite_step_00000002.json"
    assert str(diagnosis_path) in str(stopped.value)
    diagnosis = json.loads(diagnosis_path.read_text())
    assert diagnosis["first_step_of_run"] == 2 and diagnosis["longest_run"] == 3 and diagnosis["skipped_steps"] == 3
    norms = diagnosis["block_grad_norms"]
    assert math.isnan(norms["final_layer"]) and all(math.isfinite(v) for k, v in norms.items() if k != "final_layer")
    assert set(norms) >= {"blocks.0", "blocks.1", "x_embedder", "t_embedder", "y_embedder"}
    # The batch of step 2: the seeded sampler's order of epoch 0 (128 images, batches of 16), its third batch.
    from helpers import compose_train
    from hydra.utils import instantiate

    dataset = instantiate(compose_train(COMMON, tmp_path / "x").data.dataset)
    order = list(DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True))
    assert diagnosis["sample_indices"] == order[32:48]
    # The last checkpoint (step 2, before the bad steps could touch anything) is intact and loadable.
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] in (2, 4) and all(torch.isfinite(v).all() for v in last["state_dict"].values()
                                                 if v.is_floating_point())  # fmt: skip
