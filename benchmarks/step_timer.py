"""A callback for `benchmarks.overhead`: the time at the end of every optimizer step of a `python -m dsr.train` run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightning.pytorch import Callback


class StepTimer(Callback):
    """Records `time.perf_counter()` after every optimizer step, and the wall-clock time of the first; writes both to
    `path` (JSON) when training ends. On a GPU it synchronises first, so a time is when the step's work finished
    rather than when it was queued."""

    def __init__(self, path: str) -> None:
        self.path, self.times, self.first_step_wall = Path(path), [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:  # a micro-batch inside an accumulated step
            return
        if pl_module.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if self.first_step_wall is None:
            self.first_step_wall = time.time()

    def on_train_end(self, trainer, pl_module) -> None:
        self.path.write_text(json.dumps({"times": self.times, "first_step_wall": self.first_step_wall}))
