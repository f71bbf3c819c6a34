"""float32 weights reordered once into oneDNN's blocked layout, for the matmuls of every step on CPU.

vLLM's CPU build does the same (`dispatch_cpu_unquantized_gemm`: a oneDNN matmul handle made once per
weight); torch has it as `mkldnn._reorder_linear_weight` + `mkldnn._linear_pointwise`, the pair its
compiler uses when it freezes a CPU model. A plain `addmm` lays the weight out again on every call,
which at 2-7 rows made a step slower than at one row.

Measured here (torch 2.13, 2-core AVX2 EPYC, GPT-2 124M shapes, a decode step of R rows, packed vs
plain): 1 row 1.23x, 2 rows 2.25x, 4 rows 2.66x, 8 rows 2.0x, 16 rows 1.49x (blocks packed from one
row on; from 8 rows on they gave 1.23-1.34x at 1-4 rows). The packed weights are a second copy of
every matmul weight (~490 MB for GPT-2 124M: ~340 MB of blocks, ~150 MB of the LM head, which is tied
to the embedding); the model's own weights stay as they are.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

PACK_ROWS_HINT = 64  # the batch size oneDNN picks its layout for
MIN_WIDTH = 512  # narrower models keep addmm: at width 128-256 packed matmuls measured 0.6-1.0x at 16-64 rows


def can_prepack(model: nn.Module) -> bool:
    """Whether packing pays: CPU, float32, a model at least MIN_WIDTH wide (int8 and LoRA layers are
    left as they are: only plain Conv1D / Linear layers are packed)."""
    return (
        model.device.type == "cpu"
        and model.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and model.config.n_embd >= MIN_WIDTH
    )


class PackedLinear(nn.Module):
    """y = x W^T + b with W in oneDNN's layout."""

    def __init__(self, weight_out_in: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.bias = bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight_out_in.detach().contiguous(), PACK_ROWS_HINT)
        self.out_features = weight_out_in.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def prepack(model: nn.Module, blocks: bool = True) -> nn.Module:
    """A copy of GPT-2 `model` in which every Conv1D of the blocks (unless `blocks` is False) and the
    LM head are PackedLinear; it shares every parameter with `model`, which is left untouched (it can
    still be trained or saved; the copy's packed weights are a snapshot)."""
    model = _own(model)
    model.transformer = _own(model.transformer)
    if blocks:
        model.transformer.h = _own(model.transformer.h)
        for i, block in enumerate(model.transformer.h):
            block = model.transformer.h[i] = _own(block)
            block.attn, block.mlp = _own(block.attn), _own(block.mlp)
            for owner, name in (
                (block.attn, "c_attn"),
                (block.attn, "c_proj"),
                (block.mlp, "c_fc"),
                (block.mlp, "c_proj"),
            ):
                layer = getattr(owner, name)
                if isinstance(layer, Conv1D):  # weight (in, out)
                    setattr(owner, name, PackedLinear(layer.weight.t(), layer.bias))
    if isinstance(model.lm_head, nn.Linear):
        model.lm_head = PackedLinear(model.lm_head.weight, model.lm_head.bias)
    return model


def _own(module: nn.Module) -> nn.Module:
    """A shallow copy of `module`: the same parameters, its own children (and hooks) to replace."""
    new = copy.copy(module)
    new.__dict__.update({key: copy.copy(value) for key, value in vars(module).items() if isinstance(value, dict)})
    return new
