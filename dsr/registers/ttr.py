"""Register neurons and test-time registers (TTR; Jiang et al. 2025) for frozen ViT encoders, through forward hooks.

A few MLP neurons in the middle layers of a ViT fire hugely at a few patch positions and write the high-norm
"outlier" tokens that later layers use as attention sinks. Test-time registers move that activity onto extra
tokens appended to the sequence: at every register neuron the extra token receives the (signed) maximum activation
over the patches and the patches' activation is set to zero. The extra tokens are dropped at the final norm, so
the encoder's output keeps its shape.

Works on Hugging Face `SiglipVisionModel` (FixRes SigLIP / SigLIP2), `Dinov2Model`, `Dinov2WithRegistersModel`
and timm `VisionTransformer` without touching their code: `ViTAdapter` names the hook points, and
`TestTimeRegisters`, `capture_residual_stream` and `discover_register_neurons` only register forward hooks.

Token layout with test-time registers: [prefix (CLS, trained registers) | patches | R test-time registers].
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "RELEASE_NEURON_FILES",
    "NoOutliersError",
    "RegisterNeuron",
    "RegisterNeuronSet",
    "TestTimeRegisters",
    "ViTAdapter",
    "capture_residual_stream",
    "discover_recursive",
    "discover_register_neurons",
    "load_register_neurons",
    "merge_layer_dicts",
    "signed_max",
]

LayerDict = dict[int, list[int]]

# The register-neuron lists of the DSR release, shipped as package data ({layer: [neuron, ...]}).
RELEASE_NEURON_FILES = {
    "siglip2_b": "siglip2_b_register_neurons.json",  # google/siglip2-base-patch16-256
    "siglip2_so400m": "siglip2_so400m_register_neurons_recursive.json",  # both rounds merged
}


# --------------------------------------------------------------------------------------------------------
# Hook points
# --------------------------------------------------------------------------------------------------------


def _first_tensor(output: Any) -> Tensor:
    """A block's residual stream: the tensor itself, or the first element of a tuple/list output."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find a token tensor in a module output of type {type(output).__name__}")


def _replace_first(output: Any, new: Tensor) -> Any:
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


class _TokenCounter:
    """Records how many tokens the embeddings produce, before any test-time register is appended.

    Its hook is prepended to the embedding module's hooks, so it runs before every appending hook.
    """

    def __init__(self, adapter: ViTAdapter) -> None:
        self.num_tokens: int | None = None
        self.handle = adapter.embed_module.register_forward_hook(self._record, prepend=True)

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        self.num_tokens = _first_tensor(output).shape[1]

    def patch_slice(self, num_prefix_tokens: int) -> slice:
        if self.num_tokens is None:
            raise RuntimeError("the embeddings did not run; call the full encoder, not its blocks")
        return slice(num_prefix_tokens, self.num_tokens)


# --------------------------------------------------------------------------------------------------------
# Residual stream
# --------------------------------------------------------------------------------------------------------


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
    counter = _TokenCounter(adapter)
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
        store[layer] = _first_tensor(output).detach()

    return hook


# --------------------------------------------------------------------------------------------------------
# Register neurons: records, JSON, release lists
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterNeuron:
    """One MLP neuron: its block index, its index in the MLP hidden layer, its discovery score and round."""

    layer: int
    neuron: int
    score: float = math.nan
    round: int = 1


@dataclass
class RegisterNeuronSet(Sequence[RegisterNeuron]):
    """A ranked list of register neurons plus how they were found (threshold, detect_layer, n_images, model id...).

    Saves to JSON as {"metadata": {...}, "neurons": [{"layer", "neuron", "score", "round"}, ...]}; `load` also
    reads the release's {layer: [neuron, ...]} lists.
    """

    neurons: list[RegisterNeuron]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, index):  # type: ignore[override]
        return self.neurons[index]

    def __len__(self) -> int:
        return len(self.neurons)

    def layer_dict(self) -> LayerDict:
        """{layer: [neuron, ...]} in rank order, the format `TestTimeRegisters` and the release use."""
        out: LayerDict = {}
        for n in self.neurons:
            out.setdefault(n.layer, []).append(n.neuron)
        return dict(sorted(out.items()))

    @classmethod
    def from_layer_dict(cls, neurons: Mapping[int | str, Sequence[int]], **metadata: Any) -> RegisterNeuronSet:
        """From {layer: [neuron, ...]} (string keys from JSON allowed); scores are unknown (NaN)."""
        items = [RegisterNeuron(int(layer), int(j)) for layer, js in neurons.items() for j in js]
        return cls(items, dict(metadata))

    def to_json(self) -> dict[str, Any]:
        def score(s: float) -> float | None:
            return None if math.isnan(s) else s

        rows = [{"layer": n.layer, "neuron": n.neuron, "score": score(n.score), "round": n.round} for n in self]
        return {"metadata": self.metadata, "neurons": rows}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> RegisterNeuronSet:
        """Read our JSON format or the release's {layer: [neuron, ...]}."""
        data = json.loads(Path(path).read_text())
        if "neurons" in data and isinstance(data["neurons"], list):
            items = [
                RegisterNeuron(
                    int(r["layer"]),
                    int(r["neuron"]),
                    math.nan if r.get("score") is None else float(r["score"]),
                    int(r.get("round", 1)),
                )
                for r in data["neurons"]
            ]
            return cls(items, dict(data.get("metadata", {})))
        return cls.from_layer_dict(data, source=str(path))


def load_register_neurons(source: str | Path) -> LayerDict:
    """{layer: [neuron, ...]} from a release name (`siglip2_b`, `siglip2_so400m`) or a JSON file of either format."""
    if str(source) in RELEASE_NEURON_FILES:
        text = resources.files("dsr.registers").joinpath("data", RELEASE_NEURON_FILES[str(source)]).read_text()
        return {int(layer): [int(j) for j in js] for layer, js in json.loads(text).items()}
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"register neurons '{source}' is neither a release list ({', '.join(RELEASE_NEURON_FILES)}) nor a file"
        )
    return RegisterNeuronSet.load(path).layer_dict()


def merge_layer_dicts(*dicts: Mapping[int, Sequence[int]]) -> LayerDict:
    """Union of {layer: [neuron, ...]} dicts, keeping first-seen order within a layer and dropping repeats."""
    out: LayerDict = {}
    for d in dicts:
        for layer, neurons in d.items():
            kept = out.setdefault(int(layer), [])
            kept.extend(int(j) for j in neurons if int(j) not in kept)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------------------
# Test-time registers
# --------------------------------------------------------------------------------------------------------


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
        self._num_patch_end = _first_tensor(output).shape[1]

    def _append_registers(self, module: nn.Module, args: Any, output: Any) -> Any:
        x = _first_tensor(output)  # [B, T, C]
        self._register_start = x.shape[1]
        registers = x.new_zeros(x.shape[0], self.num_registers, x.shape[2])
        return _replace_first(output, torch.cat([x, registers], dim=1))

    def _strip_registers(self, module: nn.Module, args: Any, output: Any) -> Any:
        x = _first_tensor(output)
        start, end = self._register_start, self._register_start + self.num_registers
        return _replace_first(output, torch.cat([x[:, :start], x[:, end:]], dim=1))

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


# --------------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------------


class NoOutliersError(RuntimeError):
    """No image had a patch token above the norm threshold at the detection layer."""


def _batches(images: Tensor | Iterable[Any], batch_size: int) -> Iterator[Tensor]:
    """Tensor [n, 3, H, W] in chunks, or the tensors of an iterable (first element of (x, y) pairs)."""
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
        return
    for batch in images:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def discover_register_neurons(
    model: nn.Module,
    images: Tensor | Iterable[Any],
    *,
    detect_layer: int = -1,
    threshold: float = 30.0,
    top_k: int | None = 10,
    layer_range: tuple[int, int] | None = None,
    exclude: Mapping[int, Sequence[int]] | None = None,
    batch_size: int = 32,
    sparsity_filter: bool = False,
    sparsity_fraction: float = 0.5,
    sparsity_activation: float = 0.5,
    model_id: str | None = None,
) -> RegisterNeuronSet:
    """Rank MLP neurons by their mean |activation| at the high-norm patch positions (the TTR discovery rule).

    For every image b: the outlier set O_b holds the patch tokens whose residual-stream norm after block
    `detect_layer` (pre final norm) is strictly above `threshold`; images with an empty O_b are skipped. Every
    neuron j of every layer l gets s_b(l, j) = mean_{i in O_b} |A_l[b, i, j]|, A the post-nonlinearity MLP
    activation. With `sparsity_filter`, s_b(l, j) is zeroed unless at least `sparsity_fraction` of the patch
    tokens have a signed activation below `sparsity_activation`. The score S(l, j) is the mean of s_b over the
    images with outliers. Neurons are ranked globally over the layers in `layer_range` (inclusive; register
    neurons must sit before the layers where outliers appear), `exclude` removed, and the first `top_k` kept.

    Defaults follow the reference function (tau = 30 on the last block, sparsity filter off) and the OpenCLIP
    config (top_k = 10). tau is an absolute norm: calibrate it per model and layer (the valley of the patch-norm
    histogram at `detect_layer`). Unlike the reference, CLS, trained and test-time registers never enter O_b, and
    images are processed in batches: one pass finds O_b, a second pass (only images with outliers) accumulates
    the scores as a running sum, so memory is O(L * H) beyond one batch.

    Args:
        model: a Hugging Face SigLIP / DINOv2 vision model or a timm VisionTransformer, in eval mode.
        images: [n, 3, H, W] (split into `batch_size` chunks) or an iterable of such batches (or (x, y) pairs), in
            the model's input normalisation; moved to the model's device and dtype batch by batch.

    Raises:
        NoOutliersError: no image had an outlier ("lower the threshold or use more images").
    """
    adapter = ViTAdapter.from_model(model)
    detect = adapter.layer_index(detect_layer, "detect_layer")
    lo, hi = (0, adapter.num_layers - 1) if layer_range is None else layer_range
    lo, hi = adapter.layer_index(lo, "layer_range[0]"), adapter.layer_index(hi, "layer_range[1]")
    if lo > hi:
        raise ValueError(f"layer_range=({lo}, {hi}) is empty")
    layers = list(range(lo, hi + 1))

    param = next(adapter.root.parameters())
    score_sum = {layer: torch.zeros(adapter.mlp_hidden_size, dtype=torch.float64) for layer in layers}
    num_images = num_with_outliers = 0
    for pixel_values in _batches(images, batch_size):
        pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
        num_images += pixel_values.shape[0]
        (h,) = capture_residual_stream(model, pixel_values, layers=[detect])
        outlier = h.float().norm(dim=-1) > threshold  # [B, N]
        has = outlier.any(dim=1)
        if not has.any():
            continue
        outlier = outlier[has]
        weights = outlier.float() / outlier.sum(dim=1, keepdim=True)  # [B', N]: mean over O_b
        num_with_outliers += int(has.sum())
        sparsity = (sparsity_fraction, sparsity_activation) if sparsity_filter else None
        _accumulate_scores(adapter, pixel_values[has], weights, score_sum, sparsity)

    if num_with_outliers == 0:
        raise NoOutliersError(
            f"no image had a patch token with norm > threshold={threshold} at detect_layer={detect_layer} "
            f"({num_images} images); lower the threshold or use more images"
        )
    excluded = {(int(layer), int(j)) for layer, js in (exclude or {}).items() for j in js}
    excluded = {(adapter.layer_index(layer, "exclude"), j) for layer, j in excluded}
    scores = torch.stack([score_sum[layer] / num_with_outliers for layer in layers])  # [L', H]
    order = scores.flatten().argsort(descending=True, stable=True).tolist()
    ranking = []
    for flat in order:
        row, j = divmod(flat, adapter.mlp_hidden_size)
        if (layers[row], j) in excluded:
            continue
        ranking.append(RegisterNeuron(layers[row], j, scores[row, j].item()))
        if top_k is not None and len(ranking) == top_k:
            break
    metadata = {
        "model_id": model_id or adapter.model_id(),
        "threshold": float(threshold),
        "detect_layer": detect_layer,
        "layer_range": [lo, hi],
        "top_k": top_k,
        "n_images": num_images,
        "n_images_with_outliers": num_with_outliers,
        "sparsity_filter": sparsity_filter,
        "num_layers": adapter.num_layers,
        "mlp_hidden_size": adapter.mlp_hidden_size,
    }
    if sparsity_filter:
        metadata.update(sparsity_fraction=sparsity_fraction, sparsity_activation=sparsity_activation)
    return RegisterNeuronSet(ranking, metadata)


def _accumulate_scores(
    adapter: ViTAdapter,
    pixel_values: Tensor,
    weights: Tensor,
    score_sum: dict[int, Tensor],
    sparsity: tuple[float, float] | None,
) -> None:
    """One forward pass adding sum_b s_b(l, j) to score_sum[l] [H]; weights [B, N] average over each O_b.

    `sparsity` = (fraction, activation) keeps a neuron's score only where it is sparse in that image.
    """
    counter = _TokenCounter(adapter)
    handles = [counter.handle]

    def hook_for(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            a = output[:, counter.patch_slice(adapter.num_prefix_tokens)].float()  # [B, N, H]
            s = torch.einsum("bn,bnh->bh", weights.to(a.device), a.abs())
            if sparsity is not None:
                fraction, activation = sparsity
                sparse = (a < activation).sum(dim=1) >= fraction * a.shape[1]
                s = s * sparse
            score_sum[layer] += s.sum(dim=0).double().cpu()

        return hook

    try:
        for layer in score_sum:
            handles.append(adapter.activation(layer).register_forward_hook(hook_for(layer)))
        adapter.forward(pixel_values)
    finally:
        for handle in handles:
            handle.remove()


def discover_recursive(
    model: nn.Module,
    images: Tensor | Iterable[Any],
    rounds: int = 2,
    *,
    top_k: int | list[int | None] | None = 10,
    threshold: float | list[float] = 30.0,
    detect_layer: int | list[int] = -1,
    layer_range: tuple[int, int] | list[tuple[int, int] | None] | None = None,
    num_registers: int = 1,
    initial: Mapping[int, Sequence[int]] | None = None,
    **discover_kwargs: Any,
) -> RegisterNeuronSet:
    """Recursive TTR: discover, apply, and discover again on the stabilised model.

    Round k runs `discover_register_neurons` with test-time registers on for every neuron found so far (plus
    `initial`), excluding those neurons, so it finds the outliers that survive the earlier rounds (test-time
    registers themselves never count as outliers). A setting given as a list holds one value per round
    (e.g. `top_k=[10, 20]`); any other value applies to every round. Rounds after the first stop early when no
    outlier is left (NoOutliersError).

    Returns the merged set, each neuron tagged with its `round`; apply it with
    `TestTimeRegisters(model, result.layer_dict(), num_registers)`: one set of registers receives every round's
    neurons, as the release does for SigLIP2-So400M. `metadata["rounds"]` holds each round's metadata.
    `images` must be re-iterable (a tensor, list or DataLoader), since every round reads it again.
    """

    def per_round(value: Any, k: int) -> Any:
        if not isinstance(value, list):
            return value
        if len(value) != rounds:
            raise ValueError(f"per-round settings are lists of {rounds} entries (one per round), got {value}")
        return value[k]

    found: list[RegisterNeuron] = []
    chosen = merge_layer_dicts(initial or {})
    round_meta = []
    for k in range(rounds):
        registers = TestTimeRegisters(model, chosen, num_registers)
        try:
            with registers:
                result = discover_register_neurons(
                    model,
                    images,
                    detect_layer=per_round(detect_layer, k),
                    threshold=per_round(threshold, k),
                    top_k=per_round(top_k, k),
                    layer_range=per_round(layer_range, k),
                    exclude=chosen,
                    **discover_kwargs,
                )
        except NoOutliersError:
            if not chosen:  # nothing found at all: the threshold is wrong, not converged
                raise
            round_meta.append({"round": k + 1, "converged": True})
            break
        found.extend(RegisterNeuron(n.layer, n.neuron, n.score, k + 1) for n in result)
        chosen = merge_layer_dicts(chosen, result.layer_dict())
        round_meta.append({"round": k + 1, **result.metadata})
    metadata = {"rounds": round_meta, "num_registers": num_registers, "initial": merge_layer_dicts(initial or {})}
    return RegisterNeuronSet(found, metadata)
