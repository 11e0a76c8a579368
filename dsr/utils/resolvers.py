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


def register() -> None:
    OmegaConf.register_new_resolver("dsr.dirname", short_dirname, replace=True)
