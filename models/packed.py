"""A CPU decode step's projections on weights prepacked once per rollout (oneDNN's blocked layout).

At a decode batch of a few rows a CPU decode step is its matmuls, and there the BLAS behind `nn.Linear`
(MKL) reaches about a third of what reading the weights once allows (2.6-5x the time of streaming them, the
lm_head worst). oneDNN's linear over a weight reordered once into its blocked layout gets 1.6-2.4x, and
q/k/v and gate/up concatenated into one product each cut the calls from seven to four a layer. Measured on
SmolLM2-135M fp32, 8 rows, one thread: a step's matmuls take 43 ms instead of 76 ms, for a pack that costs
about 0.3-0.4 s (experiments/bench_rollout.py measures the whole rollout both ways).

The pack is a copy of the weights, made when the rollout starts (so it follows every training update) and
dropped with it. Models whose projections are not plain `nn.Linear` (LoRA adapters, sharded weights) decode
through their modules instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.forward import CausalLM
from models.scale import forward_autocast_dtype

PACKED_DTYPES = (torch.float32, torch.bfloat16)
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN packs `dtype` weights: bf16 needs avx512bw/vl/dq or avx_ne_convert, which an
    AVX2-only CPU lacks (oneDNN raises there); asked once per dtype with a small weight."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
    except RuntimeError:
        return False
    return True


def packable(model: CausalLM) -> str | None:
    """None if `model`'s decode step can run on packed weights, else why not (one line)."""
    weight = model.get_output_embeddings().weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device.type}, packing is for a CPU"
    if not onednn_linear_available():
        return "this torch build has no oneDNN linear"
    if weight.dtype not in PACKED_DTYPES:
        return f"weights in {weight.dtype}, packing takes float32 or bfloat16"
    dtype = forward_autocast_dtype(model) or weight.dtype  # fp32 master weights under bf16 autocast pack in bf16
    if not onednn_packs(dtype):
        return f"this CPU's oneDNN cannot pack {dtype} weights (bf16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)"
    modules = [model.get_output_embeddings()] + [
        layer.get_submodule(name) for layer in model.get_decoder().layers for name in PROJECTIONS
    ]
    if any(type(m) is not nn.Linear or type(m.weight.data) is not Tensor for m in modules):
        return "a projection is not a plain nn.Linear (LoRA adapter or sharded weight)"
    return None


def _pack(
    weights: list[Tensor], biases: list[Tensor | None], rows: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """(packed weight, bias or None) of the products of `weights` concatenated along their outputs."""
    weight = torch.cat([w.detach().to(dtype) for w in weights]) if len(weights) > 1 else weights[0].detach().to(dtype)
    if all(b is None for b in biases):
        bias = None
    else:
        bias = torch.cat(
            [b.detach().to(dtype) if b is not None else weight.new_zeros(w.shape[0]) for w, b in zip(weights, biases)]
        )
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows), bias


@dataclass
class PackedLinear:
    weight: Tensor  # oneDNN-blocked [out, in]
    bias: Tensor | None  # [out]

    @classmethod
    def of(cls, modules: list[nn.Linear], rows: int, dtype: torch.dtype) -> PackedLinear:
        return cls(*_pack([m.weight for m in modules], [m.bias for m in modules], rows, dtype))

    def __call__(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(self.weight.dtype), self.weight, self.bias, "none", [], "")


class PackedProjections:
    """The projections of every layer and the lm_head on packed weights, fused where they share an input.

    rows: the decode batch the layout is chosen for (smaller batches after compaction still run on it);
    dtype: what the step computes in (the weights' dtype, or autocast's).
    """

    def __init__(self, model: CausalLM, rows: int, dtype: torch.dtype):
        self.qkv, self.o, self.gate_up, self.down, self.act, self.splits = [], [], [], [], [], []
        for layer in model.get_decoder().layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv.append(PackedLinear.of([attn.q_proj, attn.k_proj, attn.v_proj], rows, dtype))
            self.splits.append([attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features])
            self.o.append(PackedLinear.of([attn.o_proj], rows, dtype))
            self.gate_up.append(PackedLinear.of([mlp.gate_proj, mlp.up_proj], rows, dtype))
            self.down.append(PackedLinear.of([mlp.down_proj], rows, dtype))
            self.act.append(mlp.act_fn)
        self.lm_head = PackedLinear.of([model.get_output_embeddings()], rows, dtype)

    def attention_in(self, i: int, layer: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv[i](h).split(self.splits[i], dim=-1)
        return q, k, v

    def attention_out(self, i: int, layer: nn.Module, o: Tensor) -> Tensor:
        return self.o[i](o)

    def mlp(self, i: int, layer: nn.Module, x: Tensor) -> Tensor:
        gate, up = self.gate_up[i](x).chunk(2, dim=-1)
        return self.down[i](self.act[i](gate) * up)

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(x)
