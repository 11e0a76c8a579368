"""Crash-safe file writes, content hashes, folder manifests and settings, and where a checkpoint's run lives."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO


def load_tensors(path: str | Path, setting: str, map_location: str | object = "cpu", mmap: bool = False) -> object:
    """`torch.load` of a file a user may have been handed (a checkpoint, statistics, weights) without running code:
    `weights_only=True` accepts tensors, numbers, strings, None and lists / tuples / dicts of them, which is all
    that dsr's own files and Lightning's checkpoints hold. A file with anything else fails with one line naming
    `setting`, the file and the reason, before any of it is unpickled into objects. `mmap` maps the tensors instead of
    reading them (to look at a large checkpoint's metadata)."""
    import pickle

    import torch

    if Path(path).is_dir():
        raise ValueError(f"{setting}={path} is a folder, not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 (torch reports a damaged file in many ways; each becomes one line)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        refused = next((line for line in lines if "Unsupported global" in line), None)
        if isinstance(error, pickle.UnpicklingError) and refused is not None:
            raise ValueError(
                f"{setting}={path} holds Python objects other than tensors and plain containers; it is not loaded, "
                f"since unpickling them could run code ({refused.split('. ')[0]})"
            ) from None
        reason = next((line for line in reversed(lines) if "error" in line.lower() or "operand" in line), None)
        reason = f"{type(error).__name__}: {reason or (lines[0] if lines else '')}".rstrip(": ")
        raise ValueError(
            f"{setting}={path} is not a readable torch file: truncated, damaged or another format ({reason[:200]})"
        ) from None
        raise ValueError(
            f"{setting}={path} holds Python objects other than tensors and plain containers; it is not loaded, since "
            f"unpickling them could run code ({reason})"
        ) from None
    except (RuntimeError, EOFError) as error:  # a zip archive cut short, an empty file, another format
        reason = str(error).split("\n")[0]
        raise ValueError(f"{setting}={path} is not a readable torch file (truncated or damaged: {reason})") from None


def sha256_file(path: str | Path, digest: hashlib._Hash | None = None) -> hashlib._Hash:
    """`digest` (a new sha256 by default) updated with the file's bytes, read in 1 MiB chunks."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest


TEMP_SUFFIX = ".tmp-"  # atomic_write writes `<name>.tmp-<pid>`, then renames it to `<name>`


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through `write(file)` to `<name>.tmp-<pid>` next to `path`, fsync, then rename it over `path`.

    A crash mid-write leaves the previous file (or none) under the final name, never a truncated one; the
    rename is atomic on POSIX filesystems. The temp file is removed if `write` fails.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TEMP_SUFFIX}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(paths: Iterable[str | Path]) -> None:
    """Delete the `<name>.tmp-<pid>` files `atomic_write` left next to each of `paths` when a run was killed
    mid-write. Callers pass only the paths they will write themselves: another rank's temp file may be live. Each
    folder is listed once (a resumed cache or sample run passes thousands of paths in one folder)."""
    wanted: dict[Path, set[str]] = {}
    for path in map(Path, paths):
        wanted.setdefault(path.parent, set()).add(path.name)
    for folder, names in wanted.items():
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            stale = [entry.path for entry in entries if entry.name.rpartition(TEMP_SUFFIX)[0] in names]
        for path in stale:
            Path(path).unlink(missing_ok=True)


SETTINGS = "settings.json"


def guard_settings(folder: Path, settings: dict, setting: str) -> None:
    """Record `settings` in `<folder>/settings.json` on first use; afterwards refuse other settings (ValueError
    naming `setting`, the option that chose `folder`), so work resumed in a folder never mixes in outputs that
    were made differently."""
    path = Path(folder) / SETTINGS
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != settings:
            changed = sorted(k for k in set(existing) | set(settings) if existing.get(k) != settings.get(k))
            raise ValueError(
                f"{setting}={folder} holds outputs made with other settings (differ in: {', '.join(changed)}); "
                f"use another {setting} or delete it"
            )
    else:
        atomic_write(path, lambda f: f.write(json.dumps(settings, indent=1).encode()))


MANIFEST = "manifest.json"  # written last into a folder of shards: its presence means the folder is complete


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write `<folder>/manifest.json` atomically (last, once every shard is on disk)."""
    path = Path(folder) / MANIFEST
    atomic_write(path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return path


def read_manifest(folder: str | Path, setting: str, hint: str) -> dict:
    """The manifest of a complete folder; FileNotFoundError naming `setting` (the option that chose the folder) and
    `hint` (how to make one) when it has none."""
    path = Path(folder).expanduser() / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{setting}={str(folder)!r} has no {MANIFEST} (missing, or still being written): {hint}"
        )
    return json.loads(path.read_text())


def run_dir_of(checkpoint: str | Path) -> Path:
    """`outputs/<run>` for `outputs/<run>/checkpoints/<name>.ckpt`, else the checkpoint's own folder."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
