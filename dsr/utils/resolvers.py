"""OmegaConf resolvers the config tree uses (registered when `dsr` is imported)."""

from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

MAX_DIRNAME = 120


def short_dirname(name: str) -> str:
    """`name` as a directory name that fits a filesystem's 255-byte limit: unchanged up to `MAX_DIRNAME` characters,
    else its start plus a hash of the whole, so long override lists still give one stable directory per job."""
    if len(name) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    return f"{name[: MAX_DIRNAME - 13]}-{digest}"


def reference_t_max(prediction: str) -> float:
    """`${dsr.reference_t_max:${transport.prediction}}`: the references' interval end for a prediction type."""
    from dsr.diffusion.transport import REFERENCE_T_MAX

    if prediction not in REFERENCE_T_MAX:
        raise ValueError(f"transport.prediction must be one of {sorted(REFERENCE_T_MAX)}, got {prediction!r}")
    return REFERENCE_T_MAX[prediction]


def register() -> None:
    OmegaConf.register_new_resolver("dsr.dirname", short_dirname, replace=True)
    OmegaConf.register_new_resolver("dsr.reference_t_max", reference_t_max, replace=True)
