"""Hook points of frozen ViT encoders, and the residual stream read through forward hooks.

Works on Hugging Face `SiglipVisionModel` (FixRes SigLIP / SigLIP2), `Dinov2Model`, `Dinov2WithRegistersModel`
and timm `VisionTransformer` without touching their code: `ViTAdapter` names the modules to hook (blocks, MLP
activations, final norm), and `capture_residual_stream` only registers forward hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["TokenCounter", "ViTAdapter", "capture_residual_stream", "first_tensor", "replace_first"]


def first_tensor(output: Any) -> Tensor:
    """A block's residual stream: the tensor itself, or the first element of a tuple/list output."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find a token tensor in a module output of type {type(output).__name__}")


def replace_first(output: Any, new: Tensor) -> Any:
    """The same output structure with its token tensor replaced."""
    if isinstance(output, Tensor):
        return new
    return type(output)([new, *output[1:]]) if isinstance(output, list) else (new, *output[1:])


@dataclass
class ViTAdapter:
    """Where to hook a ViT: the module whose output gets tokens appended, the blocks, the MLP activations, the norm.

    Build it with `ViTAdapter.from_model(model)`. Modules are looked up by name when asked for, so a final norm that
    a wrapper swapped in (e.g. a LayerNorm without affine under the same attribute) is the one that gets hooked, as
    long as the swap happens before hooks are installed.
    """

    family: Literal["hf_siglip", "hf_dinov2", "timm_vit"]
    root: nn.Module  # the vision model: owns embeddings, blocks and final norm; the module `forward` calls
    embed_name: str  # attribute of `root` after which test-time registers are appended
    blocks: nn.ModuleList
    activation_name: str  # attribute of `block.mlp` whose output is the MLP hidden activation [B, T, H]
    norm_name: str  # attribute of `root`: the final norm
    num_prefix_tokens: int

    @classmethod
    def from_model(cls, model: nn.Module) -> ViTAdapter:
        """Recognise a Hugging Face SigLIP / DINOv2 vision model or a timm VisionTransformer."""
        root = model
        while hasattr(root, "vision_model"):  # SiglipModel -> SiglipVisionModel (-> SiglipVisionTransformer)
            root = root.vision_model
        name = type(root).__name__
        if name.startswith("Siglip2"):
            raise ValueError(
                f"{name} (NaFlex, with a pixel attention mask) is not supported; use a FixRes SigLIP2 checkpoint "
                "loaded as SiglipVisionModel, as RAE does"
            )
        encoder = getattr(root, "encoder", None)
        if hasattr(root, "embeddings") and hasattr(encoder, "layers") and hasattr(root, "post_layernorm"):
            adapter = cls("hf_siglip", root, "embeddings", encoder.layers, "", "post_layernorm", 0)
        elif hasattr(root, "embeddings") and hasattr(encoder, "layer") and hasattr(root, "layernorm"):
            num_registers = getattr(getattr(root, "config", None), "num_register_tokens", 0) or 0
            adapter = cls("hf_dinov2", root, "embeddings", encoder.layer, "", "layernorm", 1 + num_registers)
        elif all(hasattr(root, a) for a in ("blocks", "norm", "norm_pre", "num_prefix_tokens")):
            adapter = cls("timm_vit", root, "norm_pre", root.blocks, "", "norm", root.num_prefix_tokens)
        else:
            raise TypeError(
                f"unsupported encoder {name}: expected a Hugging Face SiglipVisionModel / Dinov2Model / "
                "Dinov2WithRegistersModel or a timm VisionTransformer"
            )
        # GELU MLPs: fc1 -> nonlinearity -> fc2. The attribute name differs by library and version.
        mlp = adapter.blocks[0].mlp
        names = [a for a in ("activation_fn", "activation", "act") if isinstance(getattr(mlp, a, None), nn.Module)]
        if not names or not hasattr(mlp, "fc1") or hasattr(mlp, "fc1_g"):
            raise TypeError(
                f"{name}: its MLP {type(mlp).__name__} is not fc1 -> activation module -> fc2; "
                "gated (SwiGLU) MLPs are not supported"
            )
        adapter.activation_name = names[0]
        return adapter

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def mlp_hidden_size(self) -> int:
        """H, the number of MLP neurons per layer."""
        return self.blocks[0].mlp.fc1.out_features

    @property
    def embed_module(self) -> nn.Module:
        return getattr(self.root, self.embed_name)

    def activation(self, layer: int) -> nn.Module:
        """The MLP nonlinearity of block `layer`; its output [B, T, H] feeds the second linear layer."""
        return getattr(self.blocks[layer].mlp, self.activation_name)

    def final_norm(self) -> nn.Module:
        return getattr(self.root, self.norm_name)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Run the encoder up to and including its final norm; returns its tokens [B, T, C]."""
        if self.family == "timm_vit":
            return self.root.forward_features(pixel_values)
        if self.family == "hf_siglip":  # SigLIP resizes its position table only when asked to
            resize = tuple(pixel_values.shape[-2:]) != (self.root.config.image_size,) * 2
            return self.root(pixel_values=pixel_values, interpolate_pos_encoding=resize).last_hidden_state
        return self.root(pixel_values=pixel_values).last_hidden_state

    def model_id(self) -> str:
        """The checkpoint name when known, else the class name."""
        config = getattr(self.root, "config", None)
        name = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
        if not name and self.family == "timm_vit":
            cfg = getattr(self.root, "pretrained_cfg", None) or {}
            name = cfg.get("hf_hub_id") or cfg.get("architecture") or ""
        return name or type(self.root).__name__

    def layer_index(self, layer: int, setting: str) -> int:
        """A Python-style layer index made non-negative; errors name `setting`."""
        if not -self.num_layers <= layer < self.num_layers:
            raise ValueError(f"{setting}={layer} is out of range for a {self.num_layers}-layer encoder")
        return layer % self.num_layers


class TokenCounter:
    """Records how many tokens the embeddings produce, before any test-time register is appended.

    Its hook is prepended to the embedding module's hooks, so it runs before every appending hook.
    """

    def __init__(self, adapter: ViTAdapter) -> None:
        self.num_tokens: int | None = None
        self.handle = adapter.embed_module.register_forward_hook(self._record, prepend=True)

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        self.num_tokens = first_tensor(output).shape[1]

    def patch_slice(self, num_prefix_tokens: int) -> slice:
        if self.num_tokens is None:
            raise RuntimeError("the embeddings did not run; call the full encoder, not its blocks")
        return slice(num_prefix_tokens, self.num_tokens)


@torch.no_grad()
def capture_residual_stream(
    model: nn.Module,
    pixel_values: Tensor,
    *,
    patches_only: bool = True,
    layers: Sequence[int] | None = None,
) -> list[Tensor]:
    """The residual stream after each block (before the final norm), captured with forward hooks.

    Args:
        model: a Hugging Face SigLIP / DINOv2 vision model or a timm VisionTransformer (any installed
            `TestTimeRegisters` stay active).
        pixel_values: [B, 3, H, W] in the model's input normalisation.
        patches_only: keep patch tokens only, dropping CLS / trained registers and any test-time registers.
        layers: which blocks to return (default all), Python-style indices.

    Returns:
        One tensor per requested layer: [B, N, C] patch tokens, or [B, T, C] with every token if not patches_only.
    """
    adapter = ViTAdapter.from_model(model)
    indices = range(adapter.num_layers) if layers is None else [adapter.layer_index(i, "layers") for i in layers]
    captured: dict[int, Tensor] = {}
    counter = TokenCounter(adapter)
    handles = [counter.handle]
    try:
        for i in indices:
            hook = _capture_hook(captured, i)
            handles.append(adapter.blocks[i].register_forward_hook(hook))
        adapter.forward(pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    patches = counter.patch_slice(adapter.num_prefix_tokens)
    return [captured[i][:, patches] if patches_only else captured[i] for i in indices]


def _capture_hook(store: dict[int, Tensor], layer: int) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store[layer] = first_tensor(output).detach()

    return hook
