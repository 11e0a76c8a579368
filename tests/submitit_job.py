"""The training command as a checkpointable submitit job, as Hydra's submitit launcher submits it: on submitit's
preemption signal the job is requeued with the same arguments, and the rerun resumes from the run's last.ckpt."""

from __future__ import annotations

from pathlib import Path

import submitit


class TrainJob(submitit.helpers.Checkpointable):
    def __call__(self, overrides: list[str], run_dir: str) -> int:
        import torch
        from helpers import compose_train

        from dsr.train import train

        train(compose_train(overrides, Path(run_dir)))
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        return int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])
