"""Test-time registers (TTR; Jiang et al. 2025) for frozen ViT encoders, through forward hooks.

A few MLP neurons in the middle layers of a ViT fire hugely at a few patch positions and write the high-norm
"outlier" tokens that later layers use as attention sinks. Test-time registers move that activity onto extra
tokens appended to the sequence: at every register neuron the extra token receives the (signed) maximum activation
over the patches and the patches' activation is set to zero. The extra tokens are dropped at the final norm, so
the encoder's output keeps its shape. The neurons come from `dsr.registers.neurons` (release lists or discovery).

Token layout with test-time registers: [prefix (CLS, trained registers) | patches | R test-time registers].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dsr.registers.hooks import ViTAdapter, first_tensor, replace_first

__all__ = ["LayerDict", "TestTimeRegisters", "signed_max"]

LayerDict = dict[int, list[int]]


def signed_max(x: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """The entry of largest magnitude along `dim`, with its sign (the negative one on a tie, as the release)."""
    pos, neg = x.amax(dim=dim), x.amin(dim=dim)
    return torch.where(pos.abs() > neg.abs(), pos, neg)


class TestTimeRegisters:
    """Test-time registers on a frozen ViT, as forward hooks; a context manager or installed permanently.

    With the hooks on, the encoder runs on [prefix | patches | R registers], the registers starting as zero vectors
    appended after the position embeddings (so they carry none). In every listed layer l, the MLP activation
    A [B, T, H] is edited at the register neurons J_l:

    - m_b = signed_max over the patch tokens i and, with `reduce="joint"`, jointly over all j in J_l: one scalar per
      image and layer, as in the release; with `reduce="per_neuron"`, one value per neuron [B, J_l];
    - A[b, r, j] = scale * m_b for every register r and j in J_l;
    - A[b, i, j] = 0 for every patch token i and j in J_l.

    The registers are removed from the output of the final norm, so `last_hidden_state` (and a pooling head after
    the norm) keeps its [B, T_prefix + N, C] shape. Per-layer `hidden_states` returned by Hugging Face models
    (`output_hidden_states=True`) still hold the registers.

    Differences from the released code (a-little-hoof/DSR, `siglip2_tt_reg/shared/hook_fn.py`), which computes the
    signed max over ALL tokens (token 0, the patches and the registers themselves) and zeroes rows 1 .. T-R-1,
    i.e. it skips token 0 as if it were a CLS token:
    - here the max and the zeroing cover the patch tokens only. CLS and trained registers (DINOv2) are left
      untouched and do not feed the max; on SigLIP, which has no CLS, patch 0 is edited like every other patch.
      `release_compatible=True` restores the release's token ranges for comparison.
    - every image of the batch is edited. The release's current hook does so too; its earlier version (kept
      commented out there) and the original TTR code edited batch element 0 only, so batched encoding differed.

    Several instances may be stacked on one model: each appends its own registers after the existing ones and
    strips them again. An empty `neurons` makes the object a no-op (nothing appended).
    """

    def __init__(
        self,
        model: nn.Module,
        neurons: Mapping[int, Sequence[int]],
        num_registers: int = 1,
        *,
        scale: float = 1.0,
        reduce: Literal["joint", "per_neuron"] = "joint",
        release_compatible: bool = False,
    ) -> None:
        self.adapter = ViTAdapter.from_model(model)
        if num_registers < 1:
            raise ValueError(f"num_registers must be >= 1, got {num_registers}")
        if reduce not in ("joint", "per_neuron"):
            raise ValueError(f"reduce must be 'joint' or 'per_neuron', got {reduce!r}")
        hidden = self.adapter.mlp_hidden_size
        self.neurons: LayerDict = {}
        for layer, js in neurons.items():
            index = self.adapter.layer_index(int(layer), "register neuron layer")
            js = [int(j) for j in js]
            bad = [j for j in js if not 0 <= j < hidden]
            if bad:
                raise ValueError(f"register neurons {bad} of layer {layer} are out of range for MLP width {hidden}")
            if js:
                self.neurons.setdefault(index, []).extend(j for j in js if j not in self.neurons.get(index, []))
        self.num_registers = num_registers
        self.scale = scale
        self.reduce = reduce
        self.release_compatible = release_compatible
        self._handles: list[RemovableHandle] = []
        # Per forward pass: tokens before any test-time register, and where ours start.
        self._num_patch_end: int | None = None
        self._register_start: int | None = None

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> TestTimeRegisters:
        """Register the hooks (looking the final norm up now); returns self. A no-op without neurons."""
        if self.installed:
            raise RuntimeError("these test-time registers are already installed")
        if not self.neurons:
            return self
        embed = self.adapter.embed_module
        self._handles.append(embed.register_forward_hook(self._record_tokens, prepend=True))
        self._handles.append(embed.register_forward_hook(self._append_registers))
        for layer in self.neurons:
            hook = self._redirect_hook(layer)
            self._handles.append(self.adapter.activation(layer).register_forward_hook(hook))
        # Prepended, so stacked instances strip in reverse order of appending and indices stay valid.
        self._handles.append(self.adapter.final_norm().register_forward_hook(self._strip_registers, prepend=True))
        return self

    def remove(self) -> None:
        """Remove every hook; the model is exactly the original again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> TestTimeRegisters:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # hooks -------------------------------------------------------------------------------------------------

    def _record_tokens(self, module: nn.Module, args: Any, output: Any) -> None:
        self._num_patch_end = first_tensor(output).shape[1]

    def _append_registers(self, module: nn.Module, args: Any, output: Any) -> Any:
        x = first_tensor(output)  # [B, T, C]
        self._register_start = x.shape[1]
        registers = x.new_zeros(x.shape[0], self.num_registers, x.shape[2])
        return replace_first(output, torch.cat([x, registers], dim=1))

    def _strip_registers(self, module: nn.Module, args: Any, output: Any) -> Any:
        x = first_tensor(output)
        start, end = self._register_start, self._register_start + self.num_registers
        return replace_first(output, torch.cat([x[:, :start], x[:, end:]], dim=1))

    def _redirect_hook(self, layer: int) -> Callable[..., Tensor]:
        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            if self._register_start is None:
                raise RuntimeError("test-time registers were not appended; call the full encoder, not its blocks")
            return self._redirect(output, self.neurons[layer])

        return hook

    def _redirect(self, a: Tensor, neurons: list[int]) -> Tensor:
        """Edit the activation a [B, T, H] at `neurons`; out of place, so autograd stays valid."""
        index = torch.tensor(neurons, device=a.device)
        start, end = self._register_start, self._register_start + self.num_registers
        if self.release_compatible:
            source, patches = slice(0, a.shape[1]), slice(1, start)
        else:
            source = patches = slice(self.adapter.num_prefix_tokens, self._num_patch_end)
        values = a[:, source][:, :, index]  # [B, N, J]
        if self.reduce == "joint":
            m = signed_max(values, dim=(1, 2))[:, None, None]  # [B, 1, 1]
        else:
            m = signed_max(values, dim=1)[:, None, :]  # [B, 1, J]
        a = a.clone()
        a[:, start:end, index] = (self.scale * m).expand(-1, self.num_registers, len(neurons))
        a[:, patches, index] = 0
        return a
