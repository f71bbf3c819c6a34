"""int8 weights for GPT-2's matmuls on CPU (`[model] dtype = "int8"`, `--dtype int8`).

Every matmul with weights becomes an `Int8Linear`: the blocks' `Conv1D` layers (attention c_attn and
c_proj, MLP c_fc and c_proj) and the LM head. Weights are int8 with one float32 scale per output
feature (symmetric, absmax / 127); activations come in as float32 and are quantised per row (one
scale per token, absmax / 127) at run time; `torch._int_mm` multiplies int8 x int8 into int32 and the
result is scaled back to float32, bias added: CTranslate2's int8 scheme (a scale per row of both).

Why this path: on torch 2.13 `torch.ao.quantization.quantize_dynamic` and the quantised tensor types
warn that they are deprecated; torchao's int8 configs ran 2-3x slower than float32 here (a quick test);
`aten._weight_int8pack_mm` (weight-only) and oneDNN's `qlinear_pointwise` ran 2.5-1000x slower than
float32 at 1-64 rows. `torch._int_mm` runs oneDNN's s8s8s32 GEMM on CPUs with AVX-512 VNNI: 1.6-5x
float32 per layer (benchmarks/int8.py). Without VNNI torch falls back to a scalar loop, so there the
same integer product is taken by a float32 matmul instead (exact while a dot product stays below
2**24, as with K=768; K=3072 may round at the 8th digit): the same numbers, slower than plain
float32, only smaller in memory.

The LM head is GPT-2's biggest matmul (768 x 50,257: a third of a decode step) and is tied to the
token embedding, so both share one int8 matrix with one scale per token: the head multiplies by it,
the embedding looks rows up and scales them back. The attention itself (scores, softmax, the KV
cache) stays float32 and untouched.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from botkit.errors import InputError

log = logging.getLogger("botkit")

QMAX = 127  # symmetric int8: -127..127 (never -128, so that negating a value stays in range)


def has_fast_int8() -> bool:
    """True where `torch._int_mm` runs oneDNN's VNNI kernel (its CPU code checks the last three things)."""
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)  # private: a torch without it gets the fallback
    return (
        hasattr(torch, "_int_mm") and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and vnni()
    )


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) float -> int8 (rows, cols) and a float32 scale per row, w ~ q * scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_(min=1e-12) / QMAX
    return torch.round(w / scale[:, None]).to(torch.int8).contiguous(), scale


class Int8Linear(nn.Module):
    """y = x @ W.T + b with W int8 (out_features, in_features) and per-output-feature scales."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, fast: bool):
        super().__init__()
        self.register_buffer("weight", weight)  # int8 (out, in)
        self.register_buffer("scale", scale)  # float32 (out,)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())  # float32 (out,)
        self.fast = fast  # torch._int_mm, else the same integer product through a float32 matmul

    @classmethod
    def of(cls, layer: nn.Module, fast: bool) -> Int8Linear:
        """From a `nn.Linear` (weight (out, in)) or GPT-2's `Conv1D` (weight (in, out), x @ W + b)."""
        weight = layer.weight.t() if isinstance(layer, Conv1D) else layer.weight
        return cls(*quantize_rows(weight), layer.bias, fast)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()  # (M, in)
        # abs().amax(): 10-20x faster here than linalg.vector_norm(x, inf) for the same numbers
        amax = x.abs().amax(dim=1, keepdim=True)  # (M, 1)
        inv_scale = QMAX / amax.clamp_(min=1e-12)  # (M, 1); an all-zero row stays zeros
        xq = torch.mul(x, inv_scale).round_().to(torch.int8)  # |x| * 127 / amax <= 127 by construction
        if self.fast:
            # (in, out) as a transposed view of the (out, in) matrix: oneDNN reads it as "B transposed",
            # 1.3-3x faster here at 1-64 rows than the same weights stored (in, out)
            y = torch._int_mm(xq, self.weight.t()).float()  # (M, out)
        else:
            y = torch.mm(xq.float(), self.weight.t().float())
        # x ~ xq / inv_scale and W ~ Wq * scale, so x @ W.T ~ (xq @ Wq.T) / inv_scale * scale. In place:
        # a fresh (M, out) tensor per pass costs more than the pass (and int32 * float32 in one op
        # takes torch's slow casting loop, 10x a conversion and an in-place pass)
        y.div_(inv_scale)
        if self.bias is None:
            y.mul_(self.scale)
        else:
            torch.addcmul(self.bias, y, self.scale, out=y)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int_mm={self.fast}"


class Int8Embedding(nn.Module):
    """A token embedding that reads the int8 matrix it shares with the LM head: rows looked up, then
    scaled back to float32."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        self.register_buffer("weight", head.weight)  # the head's own tensor, not a copy: (vocab, n_embd) int8
        self.register_buffer("scale", head.scale)  # (vocab,)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float().mul_(self.scale[ids].unsqueeze(-1))  # (..., n_embd)


def quantize_int8(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Swap the model's matmul layers for int8 ones, in place (the model must be float32, on CPU).
    Returns the model. Inference only: the int8 layers have no gradient."""
    if model.device.type != "cpu":
        raise InputError(
            f"int8 runs on CPU only, and this model is on {model.device}: use --dtype bfloat16 or float16 there."
        )
    fast = has_fast_int8()
    if not fast:
        log.warning(
            "This CPU lacks AVX-512 VNNI, so int8 matmuls run through float32 here: slower than --dtype "
            "float32, "
            "only smaller in memory."
        )
    transformer = model.transformer
    for block in transformer.h:
        for parent in (block.attn, block.mlp):
            for name in ("c_attn", "q_attn", "c_fc", "c_proj"):
                layer = getattr(parent, name, None)
                if isinstance(layer, (Conv1D, nn.Linear)):
                    setattr(parent, name, Int8Linear.of(layer, fast))
    tied = model.lm_head.weight is transformer.wte.weight
    model.lm_head = Int8Linear.of(model.lm_head, fast)
    if tied:  # GPT-2's default: one int8 matrix for both, instead of an int8 head beside a float32 embedding
        transformer.wte = Int8Embedding(model.lm_head)
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each shared tensor counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
