"""Decoding over a preallocated (static) KV cache: one fixed-shape step per generated token.

`model.generate` and the plain sampling loop grow a `DynamicCache` by concatenation every token and run
the model's full forward (mask construction, cache bookkeeping) around a handful of matmuls. Here the
cache is allocated once for prompt + max_new_tokens, each step writes one slot in place and attends
over the whole cache under a validity mask, so every step has the same shapes: that is what lets
`torch.compile` fuse the small ops and, on CUDA (`mode="reduce-overhead"`), replay the step as one CUDA
graph instead of hundreds of kernel launches.

The step calls the model's own submodules (projections, norms, MLP, rotary embedding), so LoRA adapters
and FSDP's gathered weights work unchanged; only attention over the cache is written here. The
architectures whose decoder layer has exactly that shape (`STATIC_ARCHITECTURES`) decode this way; any
other falls back to the dynamic cache (algorithms.rollout).

The prefill runs the model's forward once per distinct prompt and copies its keys/values into the
cache rows of that prompt's samples, as the dynamic path does. Sampling is inside the step: the token
is drawn by inverting the CDF of the tempered (top-p) policy with one uniform per row, and the step
returns the untruncated tempered policy's log-prob of it.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from models.scale import forward_autocast_dtype

# model_type of the configs whose layers are pre-norm attention (q/k/v/o projections, rotary) + MLP
STATIC_ARCHITECTURES = ("llama", "qwen2")


def supports_static_cache(model: nn.Module) -> bool:
    """Whether `model` decodes with the static cache (a Llama-shaped decoder without sliding windows)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in STATIC_ARCHITECTURES or getattr(config, "use_sliding_window", False):
        return False
    decoder = model.get_decoder()
    return all(hasattr(decoder, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Set logits outside the nucleus of mass `top_p` to -inf (the top token is always kept)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_token(logits: Tensor, uniform: Tensor, temperature: float, top_p: float) -> tuple[Tensor, Tensor]:
    """(token [n], logp [n]): a draw from softmax(top_p(logits / T)) by inverse CDF, and its log-prob
    under the untruncated tempered policy (what training recomputes).

    logits: [n, V]; uniform: [n] in [0, 1). One uniform per row (not V exponentials, as a race would
    need) keeps the noise tiny and lets it be drawn for every step before decoding starts.
    """
    z = logits.float() / temperature
    logp_all = torch.log_softmax(z, dim=-1)  # [n, V]
    probs = logp_all.exp() if top_p >= 1.0 else torch.softmax(top_p_filter(z, top_p), dim=-1)
    cdf = probs.cumsum(-1)  # [n, V]
    target = (uniform * cdf[:, -1]).unsqueeze(-1)  # [n, 1]: scaled by the total, which rounding keeps off 1
    token = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return token, logp_all.gather(-1, token[:, None]).squeeze(-1)


def cached_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float) -> Tensor:
    """One query per row over the whole cache: q [n, Hq, 1, D], k and v [n, Hkv, T, D], valid [n, T] -> [n, 1, Hq * D].

    Written as two matmuls rather than scaled_dot_product_attention: for a single query the CPU kernel's
    per-call cost was most of the attention time. Query head h reads key/value head h // (Hq / Hkv), as
    transformers' repeat_kv lays them out; the softmax is in fp32, as its eager attention does.
    """
    n, hq, _, d = q.shape
    hkv = k.shape[1]
    q = q.reshape(n, hkv, hq // hkv, d)  # [n, Hkv, g, D]
    scores = torch.matmul(q, k.to(q.dtype).transpose(-1, -2)).float() * scale  # [n, Hkv, g, T]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(weights, v.to(q.dtype)).reshape(n, 1, hq * d)  # [n, Hkv, g, D] -> [n, 1, Hq * D]


class StaticKVCache(nn.Module):
    """Keys and values of every layer for `batch` rows and `length` positions, and which slots are valid.

    Buffers of a module, so that a compiled step sees them as static inputs it mutates in place (CUDA graphs
    keep their addresses).
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("k", torch.zeros(layers, batch, kv_heads, length, head_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros_like(self.k))
        self.register_buffer("valid", torch.zeros(batch, length, dtype=torch.bool, device=device))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def select(self, rows: Tensor) -> StaticKVCache:
        """A cache of the given rows only (batch compaction)."""
        out = StaticKVCache.__new__(StaticKVCache)
        nn.Module.__init__(out)
        out.register_buffer("k", self.k[:, rows])
        out.register_buffer("v", self.v[:, rows])
        out.register_buffer("valid", self.valid[rows])
        return out


class StaticDecoder:
    """A causal LM's prefill and fixed-shape decode step over a StaticKVCache; `compile_mode` None = eager.

    The step reads the model's parameters at call time, so it follows training updates without recompiling.
    """

    def __init__(self, model: nn.Module, compile_mode: str | None = None):
        # weakly: a decoder kept for a model (the compiled ones) must not keep the model alive
        self._model = weakref.ref(model)
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        config = model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        # fp32 master weights under bf16 autocast (models.scale) compute, and cache, in bf16
        self.autocast = forward_autocast_dtype(model)
        self.compile_mode = compile_mode
        self._step = self.step_eager if compile_mode is None else torch.compile(
            self.step_eager, mode=None if compile_mode == "default" else compile_mode, dynamic=False)

    @property
    def model(self) -> nn.Module:
        return self._model()

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.autocast or self.decoder.embed_tokens.weight.dtype

    def new_cache(self, batch: int, length: int) -> StaticKVCache:
        device = self.decoder.embed_tokens.weight.device
        return StaticKVCache(len(self.decoder.layers), batch, self.kv_heads, length, self.head_dim,
                             self.cache_dtype, device)

    def _autocast(self):
        device = self.decoder.embed_tokens.weight.device.type
        return torch.autocast(device, dtype=self.autocast, enabled=self.autocast is not None)

    def prefill(self, cache: StaticKVCache, prompt_ids: Tensor, prompt_mask: Tensor, rows: Tensor) -> Tensor:
        """Run the distinct prompts [U, Tp] (left-padded) and fill cache slots [0, Tp) of each row with its
        prompt's keys/values; rows: [n] index of each cache row's prompt. Returns the last logits [n, V]."""
        tp = prompt_ids.shape[1]
        dynamic = DynamicCache()
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                         cache=dynamic, use_cache=True, logits_to_keep=1)
        for i, layer in enumerate(dynamic.layers):
            cache.k[i, :, :, :tp] = layer.keys[rows]
            cache.v[i, :, :, :tp] = layer.values[rows]
        cache.valid.zero_()
        cache.valid[:, :tp] = prompt_mask[rows].bool()
        return out.logits[rows, -1]

    def step(self, cache: StaticKVCache, token: Tensor, position: Tensor, slot: Tensor, uniform: Tensor,
             temperature: float, top_p: float) -> tuple[Tensor, Tensor]:
        """Feed token [n] at `position` [n] into cache slot `slot` (0-d), then draw the next token:
        (next token [n], its log-prob [n])."""
        if self.compile_mode is None:
            return self._step(cache, token, position, slot, uniform, temperature, top_p)
        # a CUDA graph replay writes its outputs into the same memory every time: a new step begins, and what
        # the loop keeps of this one is copied out
        torch.compiler.cudagraph_mark_step_begin()
        token, logp = self._step(cache, token, position, slot, uniform, temperature, top_p)
        return token.clone(), logp.clone()

    def step_eager(self, cache: StaticKVCache, token: Tensor, position: Tensor, slot: Tensor, uniform: Tensor,
                   temperature: float, top_p: float) -> tuple[Tensor, Tensor]:
        n = token.shape[0]
        slot = slot.view(1)
        cache.valid.index_fill_(1, slot, True)
        with self._autocast():
            x = self.decoder.embed_tokens(token[:, None])  # [n, 1, H]
            cos, sin = self.decoder.rotary_emb(x, position[:, None])
            for i, layer in enumerate(self.decoder.layers):
                attn = layer.self_attn
                h = layer.input_layernorm(x)
                q = attn.q_proj(h).view(n, 1, -1, self.head_dim).transpose(1, 2)  # [n, Hq, 1, D]
                k = attn.k_proj(h).view(n, 1, -1, self.head_dim).transpose(1, 2)  # [n, Hkv, 1, D]
                v = attn.v_proj(h).view(n, 1, -1, self.head_dim).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                cache.k[i].index_copy_(2, slot, k.to(cache.k.dtype))
                cache.v[i].index_copy_(2, slot, v.to(cache.v.dtype))
                o = cached_attention(q, cache.k[i], cache.v[i], cache.valid, attn.scaling)  # [n, 1, Hq * D]
                x = x + attn.o_proj(o)
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            logits = self.lm_head(self.decoder.norm(x))[:, -1]  # [n, V]
        return sample_token(logits, uniform, temperature, top_p)
