"""Samplers that integrate the learned flow from noise (t = 1) back to data (t ~ 0).

`num_steps` counts grid points, as RAE and the DSR release do: 50 grid points are 49 integration steps.
The grid is linear in t from 1 to `t_end` and then shifted toward noise with the same `time_shift` used
in training, so the sampler spends its steps where the model was trained most.

Where the grid ends is part of how a model was trained, so by default it comes from the transport
(`Transport.sample_t_end`, passed to `integrate`): the DSR release's x-prediction recipe ends at t = 0, where
the last Euler step lands exactly on the model's clean prediction; RAE's velocity recipe ends at t = 0.001
(shift(0.001) = 0.00689 at s = 6.93), where a velocity model is still well behaved. An ODE sampler's own
`t_end` overrides it (`sampler.solver.t_end=...`). The SDE sampler always keeps its own positive `t_end`: its
score term -E[noise | x_t] / t diverges at t = 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dsr.diffusion.transport import score_from_velocity, time_shift

# (x [B, ...], t [B]) -> velocity [B, ...]
VelocityFn = Callable[[Tensor, Tensor], Tensor]

ODE_METHODS = ("euler", "heun")
SDE_LAST_STEPS = ("ode", "mean")
ADAPTIVE_METHODS = ("dopri5", "bosh3", "adaptive_heun", "dopri8", "fehlberg2")  # torchdiffeq's adaptive solvers
# sampler.precision, in Lightning's names: the network's forward under bf16 autocast ("bf16-mixed", for speed) or in
# float32 ("32-true"); the integration state stays float32. 32-true is the default for paper numbers: RAE recommends
# fp32 sampling at low FID (a bf16 reproduction read 1.26 for 1.13).
SAMPLING_PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16}


def sampling_autocast(precision: str, device: torch.device | str) -> AbstractContextManager:
    """The context the sampler's network runs in: nothing for 32-true, bf16 autocast on `device` for bf16-mixed."""
    if precision not in SAMPLING_PRECISIONS:
        raise ValueError(f"sampler.precision={precision!r}: choose one of {tuple(SAMPLING_PRECISIONS)}")
    dtype = SAMPLING_PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def time_grid(num_steps: int, shift: float, t_end: float = 0.001) -> Tensor:
    """Decreasing float64 times [num_steps] from 1 (noise) to time_shift(t_end, shift).

    These are grid points, not steps: `num_steps` points give `num_steps - 1` integration steps.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps counts grid points and must be >= 2, got {num_steps}")
    t = torch.linspace(1.0, t_end, num_steps, dtype=torch.float64)
    return time_shift(t, shift)


def _batch_time(t: float, x: Tensor) -> Tensor:
    """A scalar grid time as a per-sample tensor [B] in x's dtype and device."""
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def _fresh_noise(x: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """Standard normal noise shaped like x [B, ...]: from one generator, or row b from generator b."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    rows = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generator]
    return torch.stack(rows).to(x.device)


class _Sampler:
    """What every sampler shares: where integration ends, its own `t_end` or the one the caller passes, and the count
    of velocity evaluations of its last `integrate` (`last_nfe`, per sample: the whole batch is evaluated together).

    `takes_transport_end`: whether the sampler's end normally comes from the transport, so a `t_end` of its own is an
    override of how the model was trained (the ODE samplers), rather than part of the sampler (the SDE's)."""

    takes_transport_end = True

    def __init__(self, t_end: float | None) -> None:
        if t_end is not None and not 0.0 <= t_end < 1.0:
            raise ValueError(f"t_end must lie in [0, 1), got {t_end}")
        self.t_end = t_end
        self.last_nfe = 0

    def counted(self, velocity_fn: VelocityFn) -> VelocityFn:
        """`velocity_fn` that counts its calls in `last_nfe` (reset here)."""
        self.last_nfe = 0

        def f(x: Tensor, t: Tensor) -> Tensor:
            self.last_nfe += 1
            return velocity_fn(x, t)

        return f

    def end_time(self, t_end: float | None) -> float:
        """The last time (before a grid's shift): this sampler's own `t_end` if set, else the given one (the
        transport's `sample_t_end`)."""
        end = self.t_end if self.t_end is not None else t_end
        if end is None:
            raise ValueError(
                f"{type(self).__name__} has no t_end: set sampler.solver.t_end, or pass the transport's "
                "sample_t_end to integrate(t_end=...)"
            )
        return end


class _GridSampler(_Sampler):
    """The fixed-step samplers: the shifted time grid from t = 1 to t_end, walked step by step."""

    def __init__(self, num_steps: int, t_end: float | None) -> None:
        super().__init__(t_end)
        self.num_steps = num_steps

    def steps(
        self, shift: float, progress: bool, desc: str, t_end: float | None = None
    ) -> Iterator[tuple[int, float, float]]:
        """(i, t_i, t_{i+1}) for the num_steps - 1 steps of the grid, with a tqdm bar if `progress`."""
        grid = time_grid(self.num_steps, shift, self.end_time(t_end)).tolist()
        for i in tqdm(range(len(grid) - 1), disable=not progress, desc=desc):
            yield i, grid[i], grid[i + 1]


class ODESampler(_GridSampler):
    """Euler or Heun integration of the probability-flow ODE dx/dt = v(x, t) from t = 1 to t_end.

    `t_end` None takes the end from the caller (the model's transport); a number overrides it. `euler_last_step`
    (Heun only) takes the last step with Euler, as JiT's sampler does: the grid's end (t = 0 for x-prediction, where
    the velocity's divisor is clamped) is then never evaluated, and a sample costs one evaluation less.
    """

    def __init__(
        self, method: str = "euler", num_steps: int = 50, t_end: float | None = None, euler_last_step: bool = False
    ) -> None:
        if method not in ODE_METHODS:
            raise ValueError(f"method must be one of {ODE_METHODS}, got {method!r}")
        super().__init__(num_steps, t_end)
        self.method = method
        self.euler_last_step = euler_last_step

    def nfe(self) -> int:
        """Velocity evaluations per sample: one per step for Euler, two for Heun (one for a last Euler step)."""
        steps = self.num_steps - 1
        return 2 * steps - self.euler_last_step if self.method == "heun" else steps

    @torch.no_grad()
    def integrate(
        self,
        velocity_fn: VelocityFn,
        noise: Tensor,
        shift: float,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        progress: bool = False,
        t_end: float | None = None,
    ) -> Tensor:
        """Map noise [B, ...] at t = 1 to samples at the last grid time. `t_end` is the transport's grid end,
        used when the sampler has none of its own. `generator` is unused (the ODE is deterministic); it is
        accepted so every sampler shares one signature."""
        velocity_fn = self.counted(velocity_fn)
        x = noise
        last = self.num_steps - 2
        for i, t_cur, t_next in self.steps(shift, progress, f"{self.method} ODE", t_end):
            h = t_next - t_cur  # negative: integrating toward data
            v = velocity_fn(x, _batch_time(t_cur, x)).to(x.dtype)
            if self.method == "euler" or (self.euler_last_step and i == last):
                x = x + h * v
            else:
                # Heun: average the slopes at both ends of an Euler predictor step.
                x_pred = x + h * v
                v_next = velocity_fn(x_pred, _batch_time(t_next, x)).to(x.dtype)
                x = x + 0.5 * h * (v + v_next)
        return x


class SDESampler(_GridSampler):
    """Euler-Maruyama on a reverse-time SDE whose marginals equal the flow's, from t = 1 to t_end.

    For any diffusion g(t), dx = [v - g^2 / 2 * score] dt + g dW run backward in time (dt < 0) has the
    marginals p_t of the probability-flow ODE dx = v dt, by the Fokker-Planck equation. We take
    g(t)^2 = 2 * diffusion_scale * t: non-negative on [0, 1], zero at the data end and, since the score
    is -E[noise | x_t] / t, the drift correction g^2 / 2 * score stays finite as t -> 0. (The reference
    release ported an SDE written for the opposite convention, t = 0 noise; under t = 1 noise its
    diffusion coefficient is negative and its square root yields NaN.)

    The last step is a noise-free Euler step of the ODE, so no fresh noise is left in the output (`last_step="ode"`).
    `last_step="mean"` is SiT's evaluation sampler instead: every grid step is stochastic, and a closing step of
    the SDE's drift without noise goes from the grid's end to t = 0 (SiT: 250 grid points on t in [1, 0.04], then
    a "Mean" step of size 0.04). With g(t)^2 = 2 t this is SiT's SDE with its "sigma" diffusion: SiT's diffusion
    coefficient is its noise level 1 - s = t in dsr's time, and its drift v + (1 - s) * score is, mapped to dsr's
    time and velocity, v - t * score. `t_end` must be positive (the score diverges at t = 0), so this sampler keeps
    its own and ignores the transport's.
    """

    takes_transport_end = False

    def __init__(
        self, num_steps: int = 250, t_end: float = 0.001, diffusion_scale: float = 1.0, last_step: str = "ode"
    ) -> None:
        if t_end is None or t_end <= 0:
            raise ValueError(f"the SDE sampler needs t_end > 0 (its score diverges at t = 0), got {t_end}")
        if diffusion_scale < 0:
            raise ValueError(f"diffusion_scale must be >= 0, got {diffusion_scale}")
        if last_step not in SDE_LAST_STEPS:
            raise ValueError(f"last_step must be one of {SDE_LAST_STEPS}, got {last_step!r}")
        super().__init__(num_steps, t_end)
        self.diffusion_scale = diffusion_scale
        self.last_step = last_step

    def nfe(self) -> int:
        """Velocity evaluations per sample: one per step (and one for SiT's closing "mean" step)."""
        return self.num_steps - 1 + (self.last_step == "mean")

    @torch.no_grad()
    def integrate(
        self,
        velocity_fn: VelocityFn,
        noise: Tensor,
        shift: float,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        progress: bool = False,
        t_end: float | None = None,
    ) -> Tensor:
        """Map noise [B, ...] at t = 1 to samples at the last grid time; fresh noise comes from `generator`.
        `t_end` (the transport's grid end) is accepted for a common signature and not used: see the class.

        `generator` is one generator for the whole batch, or a sequence of B generators, one per batch row:
        row b's fresh noise [...] is then drawn from generator b alone (on that generator's device, in x's
        dtype, then moved to x's device), so a row's trajectory does not depend on the batch it is in.
        """
        if generator is not None and not isinstance(generator, torch.Generator):
            generator = list(generator)
            if len(generator) != noise.shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {noise.shape[0]}: need one per row")
        velocity_fn = self.counted(velocity_fn)
        x = noise
        last = self.num_steps - 2 if self.last_step == "ode" else None
        t_last = 1.0
        for i, t_cur, t_next in self.steps(shift, progress, "SDE"):
            h = t_next - t_cur  # negative: integrating toward data
            t_last = t_next
            if i == last:
                x = x + h * velocity_fn(x, _batch_time(t_cur, x)).to(x.dtype)
                continue
            drift = self._drift(velocity_fn, x, t_cur)
            z = _fresh_noise(x, generator)
            x = x + h * drift + (2.0 * self.diffusion_scale * t_cur * abs(h)) ** 0.5 * z
        if self.last_step == "mean":  # SiT's closing step: the SDE's drift, no noise, from the grid's end to t = 0
            x = x - t_last * self._drift(velocity_fn, x, t_last)
        return x

    def _drift(self, velocity_fn: VelocityFn, x: Tensor, t_cur: float) -> Tensor:
        """v - g(t)^2 / 2 * score, with g(t)^2 = 2 * diffusion_scale * t."""
        t = _batch_time(t_cur, x)
        v = velocity_fn(x, t).to(x.dtype)
        return v - self.diffusion_scale * t_cur * score_from_velocity(v, x, t)


class AdaptiveODESampler(_Sampler):
    """The probability-flow ODE dx/dt = v(x, t) from t = 1 to t_end with an adaptive solver (torchdiffeq's
    `odeint`; dopri5 with atol 1e-6, rtol 1e-3 is SiT's ODE sampler). The solver picks its own steps, so the time
    shift of the fixed grids does not apply; `t_end` None takes the end from the caller (the model's transport).
    Every sample of the batch is integrated together, with one step size: the error norm is over the batch."""

    def __init__(self, method: str = "dopri5", atol: float = 1e-6, rtol: float = 1e-3, t_end: float | None = None):
        if method not in ADAPTIVE_METHODS:
            raise ValueError(f"method must be one of {ADAPTIVE_METHODS}, got {method!r}")
        super().__init__(t_end)
        self.method = method
        self.atol = atol
        self.rtol = rtol

    @torch.no_grad()
    def integrate(
        self,
        velocity_fn: VelocityFn,
        noise: Tensor,
        shift: float,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        progress: bool = False,
        t_end: float | None = None,
    ) -> Tensor:
        """Map noise [B, ...] at t = 1 to samples at t_end. `shift` and `generator` are accepted for a common
        signature and not used (an adaptive solver has no grid; the ODE is deterministic)."""
        from torchdiffeq import odeint  # the only sampler that needs it

        end = self.end_time(t_end)
        velocity_fn = self.counted(velocity_fn)
        bar = tqdm(disable=not progress, desc=f"{self.method} ODE", unit="call")

        def f(t: Tensor, x: Tensor) -> Tensor:
            bar.update(1)
            return velocity_fn(x, _batch_time(float(t), x)).to(x.dtype)

        times = torch.tensor([1.0, end], dtype=noise.dtype, device=noise.device)
        out = odeint(f, noise, times, method=self.method, atol=self.atol, rtol=self.rtol)[-1]
        bar.close()
        return out
