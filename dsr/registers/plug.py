"""Registers for other people's models, in one call and without editing their code.

`add_diffusion_registers(model, num_registers, start)` gives any diffusion transformer a bank of learned register
tokens (the same `DiffusionRegisters` dsr's own backbones build: standard-normal tokens plus a fixed sin-cos code)
through forward hooks on its block list: a pre-hook on block `start` prepends the bank to the token sequence, a
pre-hook on every later block widens what that block receives per token (attention masks, dsr's rotary tables),
and a hook on the last block drops the registers again, so whatever the model does after its blocks (final norm,
unpatchify) sees the original sequence. The bank is a submodule under one prefix (`diffusion_registers.`), so
optimizers, EMA copies, DDP/FSDP wrapping and checkpoints need nothing special; `remove_diffusion_registers`
restores the original model exactly.

The hooks are small callable objects holding the bank as an attribute, not closures, so a `copy.deepcopy` of the
model (an EMA copy) gets hooks that use the copy's own bank.

What a block receives beside its tokens:
- absolute position embeddings added before the blocks need nothing: registers join after them, position-free;
- dsr's `RotaryTables` (LightningDiT, DiT-DH): the `rope=(cos, sin)` argument gets identity rows in front
  (`dsr.models.rotary.rope_with_prefix`), so registers stay unrotated and the patches' angles do not change;
- attention masks (`attention_mask`, `attn_mask`, `mask`) covering the patch tokens are widened so that every token
  may attend to the registers and the registers to every token some patch may attend to;
- any other positional scheme (a rotary module the API does not know, or a block argument named like rotary
  angles) is refused when the registers are added or on the first forward, with what was found and what to pass
  (`extend_arguments={name: fn}`, fn(value, num_registers) -> value for the longer sequence).

`add_test_time_registers(model, neurons)` is the encoder-side counterpart: test-time registers on a frozen Hugging
Face or timm ViT (`dsr.registers.ttr.TestTimeRegisters`) installed for good, and `remove_test_time_registers`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dsr.models.registers import DiffusionRegisters
from dsr.models.rotary import RotaryTables, rope_with_prefix
from dsr.registers.ttr import TestTimeRegisters

__all__ = [
    "BANK_NAME",
    "TokenStream",
    "add_diffusion_registers",
    "add_test_time_registers",
    "diffusion_register_counts",
    "find_blocks",
    "remove_diffusion_registers",
    "remove_test_time_registers",
    "widen_mask",
]

BANK_NAME = "diffusion_registers"
TTR_ATTRIBUTE = "test_time_registers"
MASK_ARGUMENTS = ("attention_mask", "attn_mask", "mask")
# Block arguments with these names carry positions; a value the API does not know how to widen is refused.
POSITIONAL_ARGUMENT = re.compile(r"rot|rope|freq|pos_emb|position", re.IGNORECASE)
# Modules that compute rotary angles (timm RotaryEmbedding*, diffusers *RotaryPosEmbed / FluxPosEmbed / MochiRoPE).
ROTARY_MODULE = re.compile(r"Rotary|(RoPE|Rope)(?![a-z])|^(Flux\d*|Bria|Ovis\w*|LongCat\w*)PosEmbed$")
KNOWN_ROTARY = (RotaryTables,)


@dataclass(frozen=True)
class TokenStream:
    """Where a block's token sequence [B, N, D] is: the name of its forward argument, and the index of the
    sequence in a tuple output (None when the block returns the tensor itself)."""

    argument: str
    output_index: int | None = None


# Blocks whose sequence is not their first argument and only output (by class name, so no import is needed).
KNOWN_STREAMS = {
    # diffusers SD3 / MMDiT: forward(hidden_states, encoder_hidden_states, temb) -> (context, image). Registers join
    # the image stream only; the joint attention lets the text tokens see them as well.
    "JointTransformerBlock": TokenStream("hidden_states", 1),
}


# locating the blocks ---------------------------------------------------------------------------------------------


def _is_block_list(module: nn.Module) -> bool:
    """A ModuleList / Sequential of one block class that holds attention."""
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        return False
    kinds = {type(child) for child in module}
    if len(kinds) != 1:
        return False
    return any(
        "attention" in type(m).__name__.lower() or isinstance(m, nn.MultiheadAttention) for m in module[0].modules()
    )


def find_blocks(model: nn.Module, blocks: str | nn.Module | None = None) -> tuple[str, nn.Module]:
    """The name and module of `model`'s transformer block list: `blocks` (an attribute path such as
    "transformer_blocks", or the list itself), or the one obvious list found by looking."""
    names = {id(m): name for name, m in model.named_modules()}
    if isinstance(blocks, nn.Module):
        if id(blocks) not in names:
            raise ValueError("blocks= must be a module inside the model (its block list)")
        return names[id(blocks)], blocks
    if isinstance(blocks, str):
        try:
            found = model.get_submodule(blocks)
        except AttributeError as error:
            raise ValueError(f"blocks={blocks!r}: {type(model).__name__} has no such submodule ({error})") from None
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise ValueError(f"blocks={blocks!r} is a {type(found).__name__}, not a non-empty ModuleList / Sequential")
        return blocks, found
    candidates = [(name, m) for name, m in model.named_modules() if _is_block_list(m)]
    outermost = [(n, m) for n, m in candidates if not any(n.startswith(f"{o}.") for o, _ in candidates if o != n)]
    if len(outermost) == 1:
        return outermost[0]
    if not outermost:
        raise ValueError(
            f"add_diffusion_registers found no list of transformer blocks in {type(model).__name__} (an "
            "nn.ModuleList or nn.Sequential of one block class with attention inside): pass blocks=<its attribute "
            "path>, e.g. blocks='transformer_blocks'"
        )
    listed = ", ".join(f"{n!r} ({len(m)} x {type(m[0]).__name__})" for n, m in outermost)
    raise ValueError(
        f"add_diffusion_registers found several block lists in {type(model).__name__}: {listed}; pass blocks=<the "
        "one the registers should run through>"
    )


def _hidden_size(block: nn.Module) -> int:
    """The token width of a block: its first norm's normalised size (else its first Linear's input)."""
    for m in block.modules():
        shape = getattr(m, "normalized_shape", None)
        if shape:
            return int(shape[-1] if isinstance(shape, Sequence) else shape)
    for m in block.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise ValueError(f"cannot tell the token width of {type(block).__name__}: pass hidden_size=")


def _check_positional_scheme(model: nn.Module, extend_arguments: Mapping[str, Any]) -> None:
    if extend_arguments:
        return  # the caller widens its own positional arguments
    for name, m in model.named_modules():
        if isinstance(m, KNOWN_ROTARY):
            continue
        if ROTARY_MODULE.search(type(m).__name__):
            raise ValueError(
                f"add_diffusion_registers: {type(model).__name__} computes rotary positions with "
                f"{type(m).__name__} at `{name}`, a positional scheme it does not know how to extend (it knows "
                "absolute position embeddings added before the blocks and dsr's RotaryTables). Pass "
                "extend_arguments={'<block argument with the angles>': fn}, fn(value, num_registers) returning "
                "the angles with identity (unrotated) entries for the registers in front"
            )


# the hooks ---------------------------------------------------------------------------------------------------------


def _keep_value(mask: Tensor) -> bool | float:
    """What a mask entry that lets a token take part holds: True (bool), 1 (a 0/1 float mask) or 0 (additive)."""
    if mask.dtype == torch.bool:
        return True
    return 1.0 if bool((mask > 0).any()) else 0.0


def widen_mask(mask: Tensor, num_tokens: int, num_registers: int, batch_size: int) -> Tensor:
    """An attention mask over `num_tokens` tokens widened to `num_registers` more in front: every token may attend
    to the registers, and the registers to every token that some patch token may attend to (so padding stays
    hidden). Key padding [B, N] -> [B, R + N]; keys only [..., 1, N] -> [..., 1, R + N]; square [N, N] or
    [..., N, N] -> [..., R + N, R + N]."""
    if mask.shape[-1] != num_tokens:
        return mask  # not over this sequence (or already widened)
    keep = _keep_value(mask)
    square = mask.ndim >= 3 or (mask.ndim == 2 and mask.shape[0] == num_tokens and batch_size != num_tokens)
    widened = torch.cat([mask.new_full((*mask.shape[:-1], num_registers), keep), mask], dim=-1)
    if square and mask.shape[-2] == num_tokens:
        visible = mask.any(dim=-2, keepdim=True) if mask.dtype == torch.bool else mask.amax(dim=-2, keepdim=True)
        rows = torch.cat([visible.new_full((*visible.shape[:-1], num_registers), keep), visible], dim=-1)
        widened = torch.cat([rows.expand(*rows.shape[:-2], num_registers, rows.shape[-1]), widened], dim=-2)
    return widened


def _widen_rope(value: Any, num_tokens: int, num_registers: int) -> Any:
    """dsr's (cos, sin) tables [N, d] -> identity rows in front, [R + N, d]."""
    if value is None:
        return None
    cos, sin = value
    if cos.shape[0] != num_tokens:
        return value
    return rope_with_prefix(cos, sin, num_registers)


class _RegisterHook:
    """Forward pre-hook (with kwargs) on each block from `start` on. On block `start` (`join`) it prepends the bank
    to the sequence; on every such block it widens the per-token arguments from N to R + N tokens."""

    def __init__(
        self,
        bank: DiffusionRegisters,
        parameters: list[str],
        stream: TokenStream,
        join: bool,
        extend_arguments: Mapping[str, Callable[[Any, int], Any]],
        rope_argument: str | None,
    ) -> None:
        self.bank = bank
        self.parameters = parameters
        self.stream = stream
        self.join = join
        self.extend_arguments = dict(extend_arguments)
        self.rope_argument = rope_argument

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, named = list(args), dict(kwargs)
        where = self.stream.argument
        position = self.parameters.index(where) if where in self.parameters else None
        if where in named:
            x = named[where]
        elif position is not None and position < len(args):
            x = args[position]
        else:
            raise RuntimeError(f"{type(module).__name__} was called without its `{where}` sequence argument")
        if not isinstance(x, Tensor) or x.ndim != 3:
            raise RuntimeError(f"{type(module).__name__}'s `{where}` is not a [B, N, D] token sequence")
        num_registers = self.bank.num_registers
        if self.join:
            if x.shape[-1] != self.bank.tokens.shape[-1]:
                raise RuntimeError(
                    f"the register bank is {self.bank.tokens.shape[-1]} wide but {type(module).__name__} receives "
                    f"{x.shape[-1]}-wide tokens: pass hidden_size={x.shape[-1]} to add_diffusion_registers"
                )
            num_tokens = x.shape[1]
            x = self.bank(x)
            if where in named:
                named[where] = x
            else:
                args[position] = x
        else:
            num_tokens = x.shape[1] - num_registers
        for i, value in enumerate(args):
            name = self.parameters[i] if i < len(self.parameters) else f"args[{i}]"
            if name != where:
                args[i] = self._widen(module, name, value, num_tokens, x.shape[0])
        for name, value in named.items():
            if name != where:
                named[name] = self._widen(module, name, value, num_tokens, x.shape[0])
        return tuple(args), named

    def _widen(self, module: nn.Module, name: str, value: Any, num_tokens: int, batch_size: int) -> Any:
        num_registers = self.bank.num_registers
        if name in self.extend_arguments:
            return self.extend_arguments[name](value, num_registers)
        if value is None:
            return None
        if name == self.rope_argument:
            return _widen_rope(value, num_tokens, num_registers)
        if name in MASK_ARGUMENTS and isinstance(value, Tensor):
            return widen_mask(value, num_tokens, num_registers, batch_size)
        if POSITIONAL_ARGUMENT.search(name):
            raise RuntimeError(
                f"{type(module).__name__} receives `{name}`, a positional argument add_diffusion_registers does not "
                f"know how to extend to {num_registers} more tokens: pass extend_arguments={{'{name}': fn}} with "
                "fn(value, num_registers) returning it for the sequence with the registers in front"
            )
        return value


class _StripHook:
    """Forward hook on the last block: drops the bank's tokens from the front of the output sequence."""

    def __init__(self, bank: DiffusionRegisters, stream: TokenStream) -> None:
        self.bank = bank
        self.stream = stream

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        index = self.stream.output_index
        if index is None:
            if not isinstance(output, Tensor):
                raise RuntimeError(
                    f"{type(module).__name__} returns a {type(output).__name__}: pass stream=TokenStream(<argument>, "
                    "output_index=<position of the token sequence in it>) to add_diffusion_registers"
                )
            return self.bank.strip(output)
        items = list(output)
        items[index] = self.bank.strip(items[index])
        return type(output)(items) if isinstance(output, list) else tuple(items)


_HOOKS = (_RegisterHook, _StripHook)


# the public calls --------------------------------------------------------------------------------------------------


def add_diffusion_registers(
    model: nn.Module,
    num_registers: int,
    start: int = 0,
    blocks: str | nn.Module | None = None,
    *,
    hidden_size: int | None = None,
    stream: TokenStream | None = None,
    extend_arguments: Mapping[str, Callable[[Any, int], Any]] | None = None,
) -> nn.Module:
    """Give `model` `num_registers` learned diffusion registers that join before block `start` of its block list
    and leave after its last block; returns the same model (modified in place). See the module docstring.

    Args:
        model: a diffusion transformer (diffusers DiT / SD3, a timm ViT denoiser, dsr's LightningDiT, ...).
        num_registers: register tokens (36 in the DSR release); start: index of the first block that sees them.
        blocks: the block list, as an attribute path or the module; found automatically when there is one.
        hidden_size: the token width, read from the block's first norm when not given.
        stream: where each block's token sequence is (argument name, index in a tuple output); known for diffusers'
            JointTransformerBlock, else the block's first argument and its only output.
        extend_arguments: functions that widen other per-token block arguments, fn(value, num_registers) -> value.
    """
    if num_registers < 0:
        raise ValueError(f"num_registers must be >= 0, got {num_registers}")
    if hasattr(model, BANK_NAME):
        raise ValueError(f"{type(model).__name__} already has `{BANK_NAME}`: remove_diffusion_registers first")
    extend_arguments = dict(extend_arguments or {})
    _check_positional_scheme(model, extend_arguments)
    name, block_list = find_blocks(model, blocks)
    if num_registers == 0:
        return model  # nothing added: the model as it was
    if not 0 <= start < len(block_list):
        raise ValueError(f"start={start} must lie in [0, {len(block_list)}), the blocks of `{name}`")
    first = block_list[start]
    stream = stream or KNOWN_STREAMS.get(type(first).__name__)
    parameters = list(inspect.signature(first.forward).parameters)
    stream = stream or TokenStream(parameters[0])
    if stream.argument not in parameters:
        raise ValueError(f"{type(first).__name__}.forward has no argument {stream.argument!r} ({parameters})")
    width = hidden_size or _hidden_size(first)
    reference = next(first.parameters(), None)
    bank = DiffusionRegisters(num_registers, width)
    if reference is not None:
        bank = bank.to(device=reference.device, dtype=reference.dtype)
    bank.blocks_name, bank.start = name, start  # what diffusion_register_counts reads
    model.add_module(BANK_NAME, bank)
    rope_argument = "rope" if any(isinstance(m, RotaryTables) for m in model.modules()) else None
    for i in range(start, len(block_list)):
        hook = _RegisterHook(bank, parameters, stream, i == start, extend_arguments, rope_argument)
        block_list[i].register_forward_pre_hook(hook, with_kwargs=True)
    block_list[-1].register_forward_hook(_StripHook(bank, stream))
    return model


def remove_diffusion_registers(model: nn.Module) -> nn.Module:
    """Take the registers `add_diffusion_registers` added off again: hooks and bank; the model is the original."""
    if not isinstance(getattr(model, BANK_NAME, None), DiffusionRegisters):
        raise ValueError(f"{type(model).__name__} has no diffusion registers added by add_diffusion_registers")
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(hook, _HOOKS)]:
                del hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
    delattr(model, BANK_NAME)
    return model


def diffusion_register_counts(model: nn.Module, blocks: str | nn.Module | None = None) -> list[int]:
    """Register tokens at the front of each block's output, as a forward hook added after the registers sees it
    (the last block's output has them removed already): for outlier statistics that exclude them. All zero for a
    model without added registers (`blocks` as in `add_diffusion_registers`)."""
    bank = getattr(model, BANK_NAME, None)
    if not isinstance(bank, DiffusionRegisters):
        return [0] * len(find_blocks(model, blocks)[1])
    depth = len(model.get_submodule(bank.blocks_name))
    return [bank.num_registers if bank.start <= i < depth - 1 else 0 for i in range(depth)]


def add_test_time_registers(
    model: nn.Module, neurons: Mapping[int, Sequence[int]], num_registers: int = 1, **options: Any
) -> nn.Module:
    """Test-time registers at `neurons` ({layer: [neuron, ...]}) on a frozen Hugging Face SigLIP / DINOv2 or timm
    ViT, installed for good; returns the same model. `options` go to `TestTimeRegisters` (scale, reduce, ...)."""
    if getattr(model, TTR_ATTRIBUTE, None) is not None:
        raise ValueError(f"{type(model).__name__} already has test-time registers: remove_test_time_registers first")
    registers = TestTimeRegisters(model, neurons, num_registers, **options).install()
    object.__setattr__(model, TTR_ATTRIBUTE, registers)  # a plain attribute: no parameters, not in the state dict
    return model


def remove_test_time_registers(model: nn.Module) -> nn.Module:
    """Take the test-time registers `add_test_time_registers` installed off again."""
    registers = getattr(model, TTR_ATTRIBUTE, None)
    if not isinstance(registers, TestTimeRegisters):
        raise ValueError(f"{type(model).__name__} has no test-time registers added by add_test_time_registers")
    registers.remove()
    object.__delattr__(model, TTR_ATTRIBUTE)
    return model
