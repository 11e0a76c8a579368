"""The time interval each recipe trains and samples on, as the reference codes have it.

Both references draw training times on one interval [t0, t1] and walk their sampling grid as
shift(1 - linspace(t0, t1, N)). The DSR release zeroes its epsilons for x-prediction ("data"): [0, 1]. RAE's
velocity models keep SiT's cap t1 = 1 - 1/1000: [0, 0.999]. The grids below are those rules written out.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_RUN, compose_train

from dsr.config import build
from dsr.diffusion.samplers import ODESampler, SDESampler
from dsr.lightning.dit_module import DiTModule

S = math.sqrt(48)  # the release's shift for 768 x 16 x 16 latents (shift_dim 196608)
N = 50
FIXTURES = Path(__file__).parent / "fixtures"


def shifted(u: np.ndarray) -> np.ndarray:
    return S * u / (1 + (S - 1) * u)


RELEASE_GRID = shifted(1 - np.linspace(0.0, 1.0, N))  # check_interval for data prediction: t0 = 0, t1 = 1
RAE_GRID = shifted(np.array([1 - i * 0.999 / (N - 1) for i in range(N)]))  # velocity: t1 = 1 - 1/1000


def tiny_module(tmp_path: Path, *overrides: str) -> DiTModule:
    cfg = compose_train(
        [*TINY_RUN, "transport.shift=null", "transport.shift_dim=196608", f"sampler.solver.num_steps={N}", *overrides],
        tmp_path,
    )
    torch.manual_seed(0)
    return build(cfg.module).eval()


def sampled_times(module: DiTModule) -> np.ndarray:
    """Every distinct time the sampler evaluates the model at, largest first."""
    seen: list[float] = []
    forward = module.ema.module.forward

    def recording(x, t, y):
        seen.extend(t.double().tolist())
        return forward(x, t, y)

    module.ema.module.forward = recording
    module.sample(torch.tensor([0, 1]))
    return np.array(sorted(set(seen), reverse=True))


@pytest.mark.parametrize("recipe, t_max, grid", [("dsr_release", 1.0, RELEASE_GRID), ("rae", 0.999, RAE_GRID)])
def test_each_recipe_trains_and_samples_on_its_references_interval(tmp_path, recipe, t_max, grid):
    module = tiny_module(tmp_path, f"recipe={recipe}", "sampler=heun")  # Heun also evaluates at the last point
    assert module.transport.t_max == t_max and module.transport.t_min == 0.0
    np.testing.assert_allclose(sampled_times(module), grid, rtol=1e-6, atol=1e-7)
    times = module.transport.sample_time(20_000, module.latent_shape, generator=torch.Generator().manual_seed(0))
    assert 0.0 < times.min() and times.max() <= shifted(np.array(t_max))


def test_the_release_grid_ends_on_the_clean_prediction(tmp_path):
    module = tiny_module(tmp_path, "recipe=dsr_release")
    outputs, forward = [], module.ema.module.forward
    module.ema.module.forward = lambda x, t, y: outputs.append(forward(x, t, y)) or outputs[-1]
    decoded = []
    decode = module.encoder.decode
    module.encoder.decode = lambda z: decoded.append(z) or decode(z)
    module.sample(torch.tensor([0, 1, 2]))
    torch.testing.assert_close(decoded[-1], outputs[-1], rtol=0, atol=1e-6)  # x_0 = x_hat of the last evaluation


def test_the_command_line_end_overrides_the_transport_and_the_sde_keeps_a_positive_one(tmp_path):
    module = tiny_module(tmp_path, "recipe=dsr_release", "sampler=heun", "sampler.solver.t_end=0.001")
    np.testing.assert_allclose(sampled_times(module), RAE_GRID, rtol=1e-6)
    sde = tiny_module(tmp_path, "recipe=dsr_release", "sampler=sde", "sampler.solver.num_steps=5")
    assert sampled_times(sde)[-1] > 0  # the SDE's last evaluation is at its last grid step before t_end
    assert sde.solver.end_time(sde.transport.sample_t_end) == 0.001
    with pytest.raises(ValueError, match="t_end > 0"):
        SDESampler(t_end=0.0)
    with pytest.raises(ValueError, match="sampler.solver.t_end"):
        ODESampler().integrate(lambda x, t: x, torch.zeros(1, 1), shift=1.0)


def test_a_checkpoint_from_before_the_recipe_interval_keeps_its_grid():
    """Written when every recipe sampled on [0, 0.999]: its stored transport says t_max 0.999, so it still samples
    what it sampled then, through its own stored solver and through a solver that defers to the transport."""
    module = DiTModule.from_checkpoint(FIXTURES / "quickstart_before_interval.ckpt")
    reference = torch.load(FIXTURES / "quickstart_before_interval_samples.pt", weights_only=True)
    assert module.transport.prediction == "x" and module.transport.t_max == 0.999
    images = module.sample(reference["y"], noise=reference["noise"])
    torch.testing.assert_close(images, reference["images"], rtol=0, atol=1e-6)
    module.solver = ODESampler("euler", num_steps=module.solver.num_steps)  # as dsr.sample builds it now
    torch.testing.assert_close(module.sample(reference["y"], noise=reference["noise"]), images, rtol=0, atol=0)
