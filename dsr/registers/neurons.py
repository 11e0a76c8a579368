"""Register neurons: records with their JSON form, the release's lists, and their discovery.

Discovery (after Jiang et al. 2025) ranks MLP neurons by how strongly they fire at the patch positions where the
residual stream carries an outlier token (norm above a threshold at a detection layer); recursive discovery
applies test-time registers for the neurons found so far and looks again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dsr.registers.hooks import TokenCounter, ViTAdapter, capture_residual_stream
from dsr.registers.ttr import LayerDict, TestTimeRegisters

__all__ = [
    "RELEASE_NEURON_FILES",
    "NoOutliersError",
    "RegisterNeuron",
    "RegisterNeuronSet",
    "discover_recursive",
    "discover_register_neurons",
    "load_register_neurons",
    "merge_layer_dicts",
]

# The register-neuron lists of the DSR release, shipped as package data ({layer: [neuron, ...]}).
RELEASE_NEURON_FILES = {
    "siglip2_b": "siglip2_b_register_neurons.json",  # google/siglip2-base-patch16-256
    "siglip2_so400m": "siglip2_so400m_register_neurons_recursive.json",  # both rounds merged
}


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
    counter = TokenCounter(adapter)
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
