"""Device selection and the process-wide numerics and kernel choices of a run: the TF32 policy, the attention backend
and how the backbone is compiled."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def resolve_device(accelerator: str | torch.device) -> torch.device:
    """One device from Lightning's `accelerator` names: `auto` (the GPU when there is one, else the CPU), `gpu` or
    `cuda`, `cpu`, `mps`; a torch device name (`cuda:1`) picks one GPU."""
    if str(accelerator) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cuda" if str(accelerator) == "gpu" else accelerator)


# `matmul_precision` (torch's names) -> the float32 precision of CUDA matmuls and cuDNN convolutions together: TF32
# for both (an Ampere+ GPU's tensor cores, 10-bit mantissa), or IEEE float32 for both. Under bf16-mixed only the
# layers autocast leaves in float32 see it.
TF32_POLICY = {"highest": "ieee", "high": "tf32", "medium": "tf32"}


def apply_matmul_precision(precision: str) -> str:
    """Set the float32 precision of matmuls (`torch.set_float32_matmul_precision`) and of cuDNN convolutions (JiT's
    patch embedding, the decoders) to the same policy; returns a line saying what was set, for the log."""
    if precision not in TF32_POLICY:
        raise ValueError(f"matmul_precision={precision!r}: choose one of {sorted(TF32_POLICY)}")
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = TF32_POLICY[precision] == "tf32"
    kind = "TF32" if TF32_POLICY[precision] == "tf32" else "IEEE float32"
    return f"float32 matmuls and convolutions on the GPU: {kind} (matmul_precision={precision})"


# `attention_backend` -> the SDPA kernels left enabled (torch.backends.cuda.enable_*_sdp); auto leaves torch's choice.
ATTENTION_BACKENDS = {
    "flash": "flash",
    "cudnn": "cudnn",
    "efficient": "mem_efficient",
    "math": "math",
}


def select_attention_backend(backend: str, device_type: str) -> str:
    """Restrict `F.scaled_dot_product_attention` to one kernel for the whole process (every `Attention` of dsr's
    models goes through it): `auto` (torch picks per call: flash, then cuDNN, memory-efficient, math), `flash`,
    `cudnn`, `efficient` or `math`. A kernel that cannot run a call then fails there with torch's reason rather than
    falling back. Returns a line for the log."""
    if backend == "auto":
        return "attention: SDPA, torch's choice per call (flash, cuDNN, memory-efficient, math)"
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={backend!r}: choose auto or one of {sorted(ATTENTION_BACKENDS)}")
    if backend != "math" and device_type != "cuda":
        raise ValueError(f"attention_backend={backend} is a CUDA kernel: on {device_type} use auto or math")
    for name in ATTENTION_BACKENDS.values():
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(name == ATTENTION_BACKENDS[backend])
    return f"attention: SDPA restricted to the {backend} kernel (attention_backend={backend})"


def compile_backbone(backbone: nn.Module, options: dict[str, Any] | None = None) -> str:
    """`torch.compile` a backbone in place (parameter names, the EMA copy and sampling stay as they are). With
    `regional: true` each transformer block is compiled on its own instead of the whole network: the blocks share
    one forward, so torch compiles it once and reuses it for every block (compile time of one block rather than the
    network's), while the embedders, registers and final layer run eagerly. Other options go to `torch.compile`
    (`mode`, `fullgraph`, ...). Returns a line for the log."""
    options = dict(options or {})
    if not options.pop("regional", False):
        backbone.compile(**options)
        return f"compile: the whole backbone ({options or 'default options'})"
    blocks = [m for name in ("blocks", "head_blocks") for m in getattr(backbone, name, None) or ()]
    if not blocks:
        raise ValueError(f"compile.regional=true compiles transformer blocks; {type(backbone).__name__} has none")
    for block in blocks:
        block.compile(**options)
    return f"compile: each of the {len(blocks)} blocks on its own ({options or 'default options'})"
