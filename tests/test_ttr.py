"""Register-neuron discovery and test-time registers on tiny random encoders with planted register neurons.

Each tiny encoder (HF SigLIP, HF DINOv2 with registers, timm ViT with CLS + 2 registers; width 32, 3 blocks, 4x4
patches) gets two planted populations:
- a marker in input channel 0 (channel 1) of one patch is copied, alone, into residual dimension 0 (1);
- neuron A = (layer 0, neuron 7) reads dimension 0 and writes a vector of norm 6 per unit of activation (strong);
- neuron B = (layer 1, neuron 21) reads dimension 1 with half the gain and writes norm 6 per unit (weaker).
So the two marked patches become high-norm tokens in later layers, with A's well above B's. The "clean" twin has
both write vectors zeroed: the same model without outliers, the reference for what TTR should restore.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import THRESHOLD, A, B, planted_images, planted_vit
from torch import Tensor, nn
from transformers import (
    Siglip2VisionConfig,
    Siglip2VisionModel,
)

from dsr.analysis.outliers import max_median_ratio, token_norms
from dsr.registers import ttr
from dsr.registers.hooks import ViTAdapter, capture_residual_stream
from dsr.registers.neurons import (
    NoOutliersError,
    RegisterNeuron,
    RegisterNeuronSet,
    discover_recursive,
    discover_register_neurons,
    load_register_neurons,
    merge_layer_dicts,
)
from dsr.registers.planted import plant_outlier_neuron, silence_neuron
from dsr.registers.ttr import signed_max

FAMILIES = ("siglip", "dinov2", "timm")
NUM_PREFIX = {"siglip": 0, "dinov2": 5, "timm": 3}


def last_layer_ratio(model: nn.Module, x: Tensor) -> float:
    """Mean over images of the patch max/median norm on the last block's output (pre final norm)."""
    return max_median_ratio(capture_residual_stream(model, x, layers=[-1])[0]).mean().item()


def activation_of(model: nn.Module, layer: int, x: Tensor) -> Tensor:
    """The MLP activation [B, T, H] of `layer` as the next module sees it (after any installed hooks)."""
    store = {}
    adapter = ViTAdapter.from_model(model)
    handle = adapter.activation(layer).register_forward_hook(lambda m, a, out: store.setdefault("a", out))
    with torch.no_grad():
        adapter.forward(x)
    handle.remove()
    return store["a"]


# --------------------------------------------------------------------------------------------------------
# Hook points and the residual stream
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_hook_points(family):
    model = planted_vit(family)
    adapter = ViTAdapter.from_model(model)
    assert adapter.num_layers == 3 and adapter.mlp_hidden_size == 64
    assert adapter.num_prefix_tokens == NUM_PREFIX[family]
    activations = [adapter.activation(i) for i in range(3)]
    assert len({id(a) for a in activations}) == 3  # one module per layer, so hooks are per layer
    norm_name = {"siglip": "post_layernorm", "dinov2": "layernorm", "timm": "norm"}[family]
    assert adapter.final_norm() is getattr(model, norm_name)


def test_adapter_rejects_naflex_siglip2_and_bad_settings():
    config = Siglip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, patch_size=4, num_patches=16
    )
    with pytest.raises(ValueError, match="FixRes"):
        ViTAdapter.from_model(Siglip2VisionModel(config))
    model = planted_vit("siglip")
    with pytest.raises(ValueError, match="register neuron layer=5"):
        ttr.TestTimeRegisters(model, {5: [1]})
    with pytest.raises(ValueError, match="out of range for MLP width 64"):
        ttr.TestTimeRegisters(model, {0: [64]})
    with pytest.raises(ValueError, match="detect_layer=7"):
        discover_register_neurons(model, planted_images(2)[0], detect_layer=7)


def test_capture_equals_hugging_face_hidden_states():
    model = planted_vit("dinov2")
    x = planted_images(2)[0]
    with torch.no_grad():
        reference = model(pixel_values=x, output_hidden_states=True).hidden_states[1:]  # after each block
    full = capture_residual_stream(model, x, patches_only=False)
    patches = capture_residual_stream(model, x)
    for h, ref, p in zip(full, reference, patches, strict=True):
        assert torch.equal(h, ref)
        assert torch.equal(p, ref[:, 5:])  # CLS + 4 trained registers dropped


def test_capture_equals_manual_timm_block_loop():
    model = planted_vit("timm")
    x = planted_images(2)[0]
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        reference = []
        for block in model.blocks:
            h = block(h)
            reference.append(h)
    for got, ref in zip(capture_residual_stream(model, x, patches_only=False), reference, strict=True):
        assert torch.allclose(got, ref, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_discovery_ranks_planted_neurons_first_with_hand_computed_scores(family):
    model = planted_vit(family)
    x, pa, pb = planted_images(6)
    found = discover_register_neurons(model, x, threshold=THRESHOLD, top_k=3, batch_size=4)
    assert (found[0].layer, found[0].neuron) == A
    assert (found[1].layer, found[1].neuron) == B
    assert found.metadata["n_images"] == 6 and found.metadata["n_images_with_outliers"] == 6

    # Reference, one image at a time: the outlier set is {pa, pb} (both above threshold, nothing else is), and the
    # score is the mean over images of the mean |activation| over that set.
    prefix = NUM_PREFIX[family]
    expected = {A: 0.0, B: 0.0}
    for i in range(6):
        norms = token_norms(capture_residual_stream(model, x[i : i + 1], layers=[-1])[0])[0]
        assert set(torch.nonzero(norms > THRESHOLD).flatten().tolist()) == {int(pa[i]), int(pb[i])}
        for layer, neuron in (A, B):
            a = activation_of(model, layer, x[i : i + 1])[0, prefix:, neuron].abs()
            expected[(layer, neuron)] += (a[pa[i]] + a[pb[i]]).item() / 2 / 6
    assert found[0].score == pytest.approx(expected[A], rel=1e-5)
    assert found[1].score == pytest.approx(expected[B], rel=1e-5)


def test_discovery_layer_range_exclude_and_no_outliers():
    model = planted_vit("siglip")
    x = planted_images(4)[0]
    only_later = discover_register_neurons(model, x, threshold=THRESHOLD, top_k=1, layer_range=(1, 2))
    assert (only_later[0].layer, only_later[0].neuron) == B
    without_a = discover_register_neurons(model, x, threshold=THRESHOLD, top_k=1, exclude={0: [7]})
    assert (without_a[0].layer, without_a[0].neuron) == B
    with pytest.raises(NoOutliersError, match="lower the threshold"):
        discover_register_neurons(model, x, threshold=1e4)
    # an iterable of (images, labels) batches gives the same ranking as one tensor
    from_batches = discover_register_neurons(model, [(x[:2], None), (x[2:], None)], threshold=THRESHOLD)
    from_tensor = discover_register_neurons(model, x, threshold=THRESHOLD)
    assert [(n.layer, n.neuron) for n in from_batches] == [(n.layer, n.neuron) for n in from_tensor]
    assert [n.score for n in from_batches] == pytest.approx([n.score for n in from_tensor], rel=1e-5)


def test_sparsity_filter_drops_a_neuron_active_everywhere():
    model = planted_vit("siglip")
    with torch.no_grad():  # neuron (2, 30): large activation at every token, no effect on the residual stream
        model.encoder.layers[2].mlp.fc1.weight[30] = 0
        model.encoder.layers[2].mlp.fc1.bias[30] = 50.0
        model.encoder.layers[2].mlp.fc2.weight[:, 30] = 0
    x = planted_images(4)[0]
    plain = discover_register_neurons(model, x, threshold=THRESHOLD, top_k=2)
    assert (plain[0].layer, plain[0].neuron) == (2, 30)
    filtered = discover_register_neurons(model, x, threshold=THRESHOLD, top_k=2, sparsity_filter=True)
    assert [(n.layer, n.neuron) for n in filtered] == [A, B]


# --------------------------------------------------------------------------------------------------------
# Test-time registers
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ttr_moves_the_high_norm_onto_the_register(family):
    model, clean = planted_vit(family), planted_vit(family, clean=True)
    x, pa, pb = planted_images(8)
    neurons = {A[0]: [A[1]], B[0]: [B[1]]}
    before, reference = last_layer_ratio(model, x), last_layer_ratio(clean, x)
    base = capture_residual_stream(model, x, layers=[-1])[0]
    with ttr.TestTimeRegisters(model, neurons):
        after = last_layer_ratio(model, x)
        with_register = capture_residual_stream(model, x, layers=[-1], patches_only=False)[0]
    assert before > 8 * reference
    assert after == pytest.approx(reference, rel=0.1)
    assert after < 3.0
    register_norm = with_register[:, -1].norm(dim=-1)
    assert (register_norm > 2 * THRESHOLD).all()  # the outlier now lives on the register

    # Tokens other than the two planted patches change little; the planted ones lose their outlier.
    moved = with_register[:, NUM_PREFIX[family] : -1]
    change = (moved - base).norm(dim=-1) / base.norm(dim=-1)  # [B, N]
    far = torch.ones_like(change, dtype=torch.bool)
    far[torch.arange(8), pa] = far[torch.arange(8), pb] = False
    assert change[far].mean() < 0.2 and change[far].max() < 0.5
    assert (change[torch.arange(8), pa] > 0.9).all()


def edited_activation(model: nn.Module, neurons: list[int], **kwargs) -> tuple[Tensor, Tensor]:
    """Layer-0 activation [B, T, H] of one run with test-time registers, before and after their edit."""
    # A hook registered before the registers' own sees the activation of the same run before the edit.
    seen = {}
    handle = (
        ViTAdapter.from_model(model).activation(0).register_forward_hook(lambda m, a, out: seen.setdefault("a", out))
    )
    with ttr.TestTimeRegisters(model, {0: neurons}, **kwargs):
        edited = activation_of(model, 0, planted_images(3)[0])
    handle.remove()
    return seen["a"], edited


def hand_signed_max(values: Tensor) -> Tensor:
    """Per row of [B, M]: the entry of largest magnitude, with its sign."""
    return values.gather(1, values.abs().argmax(dim=1, keepdim=True))[:, 0]


def test_redirect_rule_by_hand():
    """At each register neuron: register <- signed max over patches (jointly over neurons), patches <- 0."""
    model = planted_vit("dinov2")  # tokens: CLS, 4 trained registers, 16 patches, then the test-time registers
    _, pa, _ = planted_images(3)
    neurons = [7, 3, 12]
    original, edited = edited_activation(model, neurons, num_registers=2)
    start = 5 + 16
    expected = hand_signed_max(original[:, 5:start, neurons].flatten(1))  # [B]
    assert torch.allclose(edited[:, start:, neurons], expected[:, None, None].expand(-1, 2, 3))
    assert torch.allclose(expected, original[torch.arange(3), 5 + pa, 7])  # the planted neuron's peak
    assert (edited[:, 5:start, neurons] == 0).all()
    assert torch.equal(edited[:, :5], original[:, :5])  # CLS and trained registers untouched
    others = [j for j in range(64) if j not in neurons]
    assert torch.equal(edited[:, :, others], original[:, :, others])

    # per-neuron reduction over every unplanted neuron: each gets its own signed max, often a negative one
    neurons = [j for j in range(64) if j != 7]
    original, edited = edited_activation(model, neurons, reduce="per_neuron")
    expected = torch.stack([hand_signed_max(original[:, 5:start, j]) for j in neurons], dim=1)  # [B, 63]
    assert torch.allclose(edited[:, -1, neurons], expected)
    negative = [j for j, e in zip(neurons, expected.T, strict=True) if (e < 0).all()]
    assert negative  # silent neurons sit in GELU's negative lobe

    # jointly over neurons that stay silent: the register receives a negative value
    original, edited = edited_activation(model, negative)
    expected = hand_signed_max(original[:, 5:start, negative].flatten(1))
    assert (expected < 0).all()
    assert torch.allclose(edited[:, -1, negative], expected[:, None].expand(-1, len(negative)))


def test_signed_max_keeps_the_sign_of_the_largest_magnitude():
    x = torch.tensor([[1.0, -5.0, 3.0], [2.0, -1.0, 0.5], [-2.0, 2.0, 0.0]])
    assert signed_max(x, dim=1).tolist() == [-5.0, 2.0, -2.0]  # a tie goes to the negative value, as the release


def test_release_compatible_indexing_misses_patch_zero_on_siglip():
    """The release skips token 0 as if it were a CLS token; SigLIP has none, so an outlier at patch 0 survives."""
    model, clean = planted_vit("siglip"), planted_vit("siglip", clean=True)
    x = planted_images(4, a_patch=0)[0]
    neurons = {A[0]: [A[1]], B[0]: [B[1]]}
    reference = last_layer_ratio(clean, x)
    with ttr.TestTimeRegisters(model, neurons):
        ours = last_layer_ratio(model, x)
    with ttr.TestTimeRegisters(model, neurons, release_compatible=True):
        release = last_layer_ratio(model, x)
        norms = token_norms(capture_residual_stream(model, x, layers=[-1])[0])
    assert ours == pytest.approx(reference, rel=0.1)
    assert release > 8 * reference
    assert (norms.argmax(dim=1) == 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_ttr_keeps_output_shape_and_batch_elements_independent(family):
    model = planted_vit(family)
    adapter = ViTAdapter.from_model(model)
    x = planted_images(4)[0]
    with torch.no_grad():
        baseline = adapter.forward(x)
        with ttr.TestTimeRegisters(model, {0: [7], 1: [21, 5]}, num_registers=2):
            batched = adapter.forward(x)
            single = torch.cat([adapter.forward(x[i : i + 1]) for i in range(4)])
        restored = adapter.forward(x)
    assert batched.shape == baseline.shape
    assert torch.allclose(batched, single, atol=1e-5)
    assert not torch.allclose(batched, baseline, atol=1e-3)
    assert torch.equal(restored, baseline)  # hooks fully removed


def test_hugging_face_outputs_and_pooling_heads_see_no_registers():
    model = planted_vit("siglip")  # has a MAP pooling head after post_layernorm
    x = planted_images(2)[0]
    with torch.no_grad(), ttr.TestTimeRegisters(model, {0: [7]}):
        out = model(pixel_values=x)
    assert out.last_hidden_state.shape == (2, 16, 32)
    assert out.pooler_output.shape == (2, 32)


def test_final_norm_swapped_before_install_is_the_one_hooked():
    model = planted_vit("siglip")
    model.post_layernorm = nn.LayerNorm(32, elementwise_affine=False, eps=1e-6)  # what an RAE wrapper does
    x = planted_images(2)[0]
    with torch.no_grad(), ttr.TestTimeRegisters(model, {0: [7]}):
        out = model(pixel_values=x).last_hidden_state
    assert out.shape == (2, 16, 32)
    assert torch.allclose(out.norm(dim=-1), torch.full((2, 16), 32**0.5), rtol=1e-3)


def test_install_remove_empty_and_autograd():
    model = planted_vit("timm")
    x = planted_images(2)[0]
    registers = ttr.TestTimeRegisters(model, {0: [7]}).install()
    assert registers.installed
    with pytest.raises(RuntimeError, match="already installed"):
        registers.install()
    with pytest.raises(ZeroDivisionError), ttr.TestTimeRegisters(model, {1: [21]}):
        raise ZeroDivisionError  # hooks come off on errors too
    x.requires_grad_(True)
    model.forward_features(x).square().sum().backward()  # out-of-place edits: autograd works
    assert x.grad is not None and torch.isfinite(x.grad).all()
    registers.remove()
    assert not registers.installed
    full = capture_residual_stream(model, x.detach(), patches_only=False)[0]
    assert full.shape[1] == 3 + 16  # nothing appended any more
    with ttr.TestTimeRegisters(model, {}):  # empty neuron set: a no-op, nothing appended
        assert capture_residual_stream(model, x.detach(), patches_only=False)[0].shape[1] == 3 + 16


def test_stacked_test_time_registers_strip_their_own_tokens():
    model, clean = planted_vit("siglip"), planted_vit("siglip", clean=True)
    x = planted_images(4)[0]
    with ttr.TestTimeRegisters(model, {0: [7]}), ttr.TestTimeRegisters(model, {1: [21]}, num_registers=2):
        assert capture_residual_stream(model, x, patches_only=False)[0].shape[1] == 16 + 1 + 2
        assert model(pixel_values=x).last_hidden_state.shape == (4, 16, 32)
        assert last_layer_ratio(model, x) == pytest.approx(last_layer_ratio(clean, x), rel=0.1)


# --------------------------------------------------------------------------------------------------------
# Recursive TTR
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_one_round_leaves_the_weaker_population_and_recursion_removes_it(family):
    model, clean = planted_vit(family), planted_vit(family, clean=True)
    x, _, pb = planted_images(8)
    reference = last_layer_ratio(clean, x)

    first = discover_register_neurons(model, x, threshold=THRESHOLD, top_k=1)
    assert first.layer_dict() == {A[0]: [A[1]]}
    with ttr.TestTimeRegisters(model, first.layer_dict()):
        one_round = last_layer_ratio(model, x)
        norms = token_norms(capture_residual_stream(model, x, layers=[-1])[0])
    assert one_round > 3 * reference
    assert torch.equal(norms.argmax(dim=1), pb)  # what is left is the weaker outlier

    result = discover_recursive(model, x, rounds=2, threshold=THRESHOLD, top_k=1)
    assert [(n.layer, n.neuron, n.round) for n in result] == [(*A, 1), (*B, 2)]
    assert result.metadata["rounds"][1]["n_images_with_outliers"] == 8
    with ttr.TestTimeRegisters(model, result.layer_dict()):
        two_rounds = last_layer_ratio(model, x)
    assert two_rounds == pytest.approx(reference, rel=0.1)

    # a third round finds nothing left above the threshold and stops
    three = discover_recursive(model, x, rounds=3, threshold=THRESHOLD, top_k=1)
    assert len(three) == 2 and three.metadata["rounds"][-1] == {"round": 3, "converged": True}


# --------------------------------------------------------------------------------------------------------
# Neuron lists: JSON, release format, package data
# --------------------------------------------------------------------------------------------------------


def test_register_neuron_json_round_trip_and_release_format(tmp_path):
    found = RegisterNeuronSet(
        [RegisterNeuron(3, 10, 2.5), RegisterNeuron(1, 4, 1.5), RegisterNeuron(3, 2, 1.0, round=2)],
        {"threshold": 30.0, "detect_layer": -1, "n_images": 100, "model_id": "tiny"},
    )
    assert found.layer_dict() == {1: [4], 3: [10, 2]}
    loaded = RegisterNeuronSet.load(found.save(tmp_path / "neurons.json"))
    assert loaded.neurons == found.neurons and loaded.metadata == found.metadata
    (tmp_path / "release.json").write_text(json.dumps({"3": [10, 2], "1": [4]}))
    assert load_register_neurons(tmp_path / "release.json") == {1: [4], 3: [10, 2]}
    assert load_register_neurons(tmp_path / "neurons.json") == {1: [4], 3: [10, 2]}
    with pytest.raises(FileNotFoundError, match="siglip2_b"):
        load_register_neurons(tmp_path / "missing.json")


def test_release_neuron_lists_ship_as_package_data():
    base = load_register_neurons("siglip2_b")
    assert {k: len(v) for k, v in base.items()} == {1: 2, 2: 3, 3: 10, 4: 16, 5: 19}
    assert base[1] == [1958, 2804]
    so400m = load_register_neurons("siglip2_so400m")
    assert min(so400m) == 0 and all(0 <= j < 4304 for js in so400m.values() for j in js)


def test_merge_layer_dicts_keeps_order_and_drops_repeats():
    merged = merge_layer_dicts({2: [5, 1]}, {"2": [1, 9], 0: [3]})
    assert merged == {0: [3], 2: [5, 1, 9]}


# --------------------------------------------------------------------------------------------------------
# A neuron planted to a given share and strength (the small-scale study's encoder)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_outlier_neuron_has_the_asked_share_and_strength_and_ttr_removes_it(family):
    model = planted_vit(family, clean=True)
    g = torch.Generator().manual_seed(5)
    calibration, fresh = torch.randn(256, 3, 16, 16, generator=g), torch.randn(256, 3, 16, 16, generator=g)
    before = last_layer_ratio(model, fresh)
    twin = copy.deepcopy(model)
    silence_neuron(twin, 1, 30)  # the model as it was, less neuron 30's own (ordinary) write
    neuron = plant_outlier_neuron(model, calibration, layer=1, neuron=30, share=0.1, strength=10.0, seed=3)
    assert (neuron.layer, neuron.neuron) == (1, 30)

    # Counted independently of the planting code: the neuron's own activation and the block's output norms.
    patches = slice(NUM_PREFIX[family], NUM_PREFIX[family] + 16)
    fires = activation_of(model, 1, fresh)[:, patches, 30] > 0.5
    assert 0.06 < fires.float().mean().item() < 0.14  # the asked 10 %, on images it was not calibrated on
    norms = capture_residual_stream(model, fresh, layers=[1])[0].norm(dim=-1)
    median = norms.median()
    assert 5.0 < (norms[fires].median() / median).item() < 20.0  # "about 10x the median patch norm"
    assert (norms[~fires] < 3 * median).float().mean().item() > 0.99  # the others stay ordinary

    ranked = discover_register_neurons(model, fresh, detect_layer=-1, threshold=5 * median.item(), top_k=3)
    assert (ranked[0].layer, ranked[0].neuron) == (1, 30)
    planted_ratio = last_layer_ratio(model, fresh)
    with ttr.TestTimeRegisters(model, {1: [30]}):
        assert last_layer_ratio(model, fresh) < before + 0.5 < planted_ratio
    silence_neuron(model, 1, 30)
    silenced, reference = capture_residual_stream(model, fresh)[-1], capture_residual_stream(twin, fresh)[-1]
    torch.testing.assert_close(silenced, reference)


def test_planted_outlier_neuron_rejects_a_share_outside_zero_one():
    with pytest.raises(ValueError, match="share"):
        plant_outlier_neuron(planted_vit("siglip"), torch.zeros(2, 3, 16, 16), layer=1, neuron=0, share=1.5)
