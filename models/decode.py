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

import types
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from models.forward import CausalLM, position_ids, with_cache
from models.packed import PackedProjections
from models.scale import forward_autocast_dtype

# model_type of the configs whose layers are pre-norm attention (q/k/v/o projections, rotary) + MLP
STATIC_ARCHITECTURES = ("llama", "qwen2")


def supports_static_cache(model: CausalLM) -> bool:
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

    The matmuls run in the cache's dtype: q is cast (one row), never the cache. Under bf16 autocast over fp32
    weights q comes out of the rotary embedding in fp32 (its cos/sin are), and `k.to(q.dtype)` copied every
    layer's whole cache to fp32 each step, only for autocast to cast it back to bf16 for the matmul.
    """
    n, hq, _, d = q.shape
    hkv = k.shape[1]
    q = q.reshape(n, hkv, hq // hkv, d).to(k.dtype)  # [n, Hkv, g, D]
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [n, Hkv, g, T]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(weights, v).reshape(n, 1, hq * d)  # [n, Hkv, g, D] -> [n, 1, Hq * D]


def mark_dynamic(x: Tensor, *dims: int) -> None:
    """Compile `x`'s dimensions `dims` as sizes rather than constants. `maybe_`: a dimension of size 1 (a chunk of
    one row) is specialized instead of raising, and so is its step (one more compile, once)."""
    for dim in dims:
        torch._dynamo.maybe_mark_dynamic(x, dim)


class StaticKVCache(nn.Module):
    """Keys and values of every layer, [n, Hkv, T, D] each, for n rows and T positions, and which slots are
    valid, [n, T].

    One buffer per layer and kind, each a buffer of this module: a compiled step sees them as static inputs
    (CUDA graphs keep their addresses) and writes one slot of each in place. With all layers in one buffer,
    functionalization turned each layer's slot write into a copy of the whole cache (inductor's code
    allocated and filled [L, n, Hkv, T, D] twice per layer per step).
    """

    valid: Tensor  # a buffer (register_buffer), as are the keys and values k0, v0, k1, ...

    def __init__(self, keys: list[Tensor], values: list[Tensor], valid: Tensor, static: bool = False):
        super().__init__()
        self.layers = len(keys)
        self.static = static
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            self.register_buffer(f"k{i}", k)
            self.register_buffer(f"v{i}", v)
        self.register_buffer("valid", valid)
        if static:
            # a CUDA graph then reads and writes these buffers where they are, rather than copying every input into
            # memory of its own on every replay (here, the whole cache each token); a new address re-records
            for buffer in self.buffers():
                torch._dynamo.mark_static_address(buffer, guard=False)
            # and a compiled step sees its rows (compaction: 64, 32, 16, ...) and positions (grown in LENGTH_STEPs)
            # as sizes, not constants: one compile for all of them (CUDA graphs still record one graph per shape)
            for i in range(self.layers):
                mark_dynamic(self.keys(i), 0, 2)
                mark_dynamic(self.values(i), 0, 2)
            mark_dynamic(self.valid, 0, 1)

    @classmethod
    def empty(
        cls,
        layers: int,
        batch: int,
        kv_heads: int,
        length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        static: bool = False,
    ) -> StaticKVCache:
        def zeros() -> Tensor:
            return torch.zeros(batch, kv_heads, length, head_dim, dtype=dtype, device=device)

        return cls(
            [zeros() for _ in range(layers)],
            [zeros() for _ in range(layers)],
            torch.zeros(batch, length, dtype=torch.bool, device=device),
            static,
        )

    def keys(self, layer: int) -> Tensor:  # [n, Hkv, T, D]
        return getattr(self, f"k{layer}")

    def values(self, layer: int) -> Tensor:  # [n, Hkv, T, D]
        return getattr(self, f"v{layer}")

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def rows(self, count: int) -> StaticKVCache:
        """The first `count` rows, as views: the same memory, so a CUDA graph recorded on them replays."""
        return StaticKVCache(
            [self.keys(i)[:count] for i in range(self.layers)],
            [self.values(i)[:count] for i in range(self.layers)],
            self.valid[:count],
            self.static,
        )

    def compact(self, keep: Tensor) -> StaticKVCache:
        """Batch compaction: rows `keep` [m] gathered, in place, into the first m rows, which are returned."""
        m = keep.shape[0]
        for buffer in [
            *(self.keys(i) for i in range(self.layers)),
            *(self.values(i) for i in range(self.layers)),
            self.valid,
        ]:
            buffer[:m] = buffer[keep]
        return self.rows(m)


class ModuleProjections:
    """A decode step's projections through the model's own modules, so that LoRA adapters, FSDP's gathered
    weights and autocast apply as in its forward (models.packed.PackedProjections is the CPU alternative)."""

    # `layer`: one of the decoder's layers (self_attn with q/k/v/o_proj, mlp), duck-typed like the model

    def __init__(self, model: CausalLM):
        self.lm_head = model.get_output_embeddings()

    def attention_in(self, i: int, layer: Any, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = layer.self_attn
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)

    def attention_out(self, i: int, layer: Any, o: Tensor) -> Tensor:
        return layer.self_attn.o_proj(o)

    def mlp(self, i: int, layer: Any, x: Tensor) -> Tensor:
        return layer.mlp(x)

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(x)


class StaticDecoder:
    """A causal LM's prefill and fixed-shape decode step over a StaticKVCache; `compile_mode` None = eager.

    The step reads the model's parameters at call time, so it follows training updates without recompiling;
    with `pack_rows` > 0 (eager only) it reads a packed copy of them made here instead (models.packed), laid
    out for that many decode rows: such a decoder serves one rollout.

    A compiled decoder lives as long as its model and keeps one cache for all its rollouts, grown when a rollout
    needs more rows or positions (positions in steps of LENGTH_STEP): its step then sees few shapes (one per
    compaction size and cache length) and, under CUDA graphs, the same cache memory every rollout (a graph is
    recorded once per shape, not once per rollout). It attends over all the cache's positions, the unused ones
    masked. The rows and the cache length are compiled as dynamic sizes, so all those shapes share one compile
    (a model's step compiled per shape took 1-2 minutes for each); a single row would be one more (dynamo
    specializes size 1), which the rollout's compaction avoids.
    """

    LENGTH_STEP = 128
    BACKEND = "inductor"  # torch.compile's backend; tests count compiles with a cheaper one ("eager")
    # a margin over this decoder's few compiled entries (top_p < 1 or not, a chunk of one row, automatic dynamic
    # shapes): dynamo's default of 8 per code object would fall back to eager
    RECOMPILE_LIMIT = 16

    def __init__(self, model: CausalLM, compile_mode: str | None = None, pack_rows: int = 0):
        # weakly: a decoder kept for a model (the compiled ones) must not keep the model alive
        self._model = weakref.ref(model)
        self.decoder = model.get_decoder()
        config = model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        # fp32 master weights under bf16 autocast (models.scale) compute, and cache, in bf16
        self.autocast = forward_autocast_dtype(model)
        self.compile_mode = compile_mode
        if pack_rows and compile_mode is not None:
            raise ValueError("a packed decode step runs eager: packing and compiling are exclusive")
        self.projections = (
            PackedProjections(model, pack_rows, self.cache_dtype) if pack_rows else ModuleProjections(model)
        )
        self._step = self.step_eager if compile_mode is None else self._compiled_step(compile_mode)
        self._storage: StaticKVCache | None = None  # a compiled decoder's cache, kept between rollouts

    def _compiled_step(self, compile_mode: str):
        """`step_eager` compiled: on a copy of its code, so that this decoder's compiled entries (dynamo keeps them
        per code object) are its own, and without dynamo's guards on the model's modules.

        Those guards (each module's type, hooks, attributes such as `training`, and each parameter's metadata,
        reached through the module tree) were ~1.2 ms of every step's ~1.3 ms of guard checks for a 32-layer LoRA
        model (811 graph inputs), per token. What they guard does not change under one decoder: it serves one
        model for the model's lifetime (the code copy: never another model's entry), every rollout decodes in eval
        mode with the policy's adapter active, and a training update writes the parameters in place (the step
        reads them at call time, and guards on the cache and the step's other inputs stay). Swapping a module,
        or casting the model, after its decoder compiled is what would go unseen."""
        code = StaticDecoder.step_eager.__code__.replace()  # a distinct code object, dynamo's cache key
        function = types.FunctionType(code, StaticDecoder.step_eager.__globals__, "step_eager")
        options: dict[str, Any] = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if self.BACKEND == "inductor" and compile_mode != "default":
            from torch._inductor import list_mode_options

            options.update(list_mode_options(compile_mode))  # reduce-overhead: CUDA graphs
        # no dimension is dynamic but those marked so (mark_dynamic: the decode rows and the cache length), or a later
        # call finds varying (dynamo's automatic dynamic shapes); mode and options are exclusive: the mode's options
        return torch.compile(types.MethodType(function, self), backend=self.BACKEND, options=options)

    @property
    def model(self) -> nn.Module:
        model = self._model()
        assert model is not None, "the model of this decoder was freed"  # the caller holds it while decoding
        return model

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.autocast or self.decoder.embed_tokens.weight.dtype

    def new_cache(self, batch: int, length: int) -> StaticKVCache:
        """A cache for `batch` rows of at least `length` positions: a new one when eager, the kept one (grown if
        needed) when compiled."""
        device = self.decoder.embed_tokens.weight.device
        if self.compile_mode is None:
            return StaticKVCache.empty(
                len(self.decoder.layers), batch, self.kv_heads, length, self.head_dim, self.cache_dtype, device
            )
        kept = self._storage
        if kept is None or kept.batch < batch or kept.length < length:
            rows = max(batch, kept.batch if kept else 0)
            length = -(-max(length, kept.length if kept else 0) // self.LENGTH_STEP) * self.LENGTH_STEP
            self._storage = kept = None  # the old one freed before the new one is allocated
            self._storage = kept = StaticKVCache.empty(
                len(self.decoder.layers),
                rows,
                self.kv_heads,
                length,
                self.head_dim,
                self.cache_dtype,
                device,
                static=True,
            )
        return kept.rows(batch)

    def _autocast(self):
        device = self.decoder.embed_tokens.weight.device.type
        return torch.autocast(device, dtype=self.autocast, enabled=self.autocast is not None)

    def prefill(self, cache: StaticKVCache, prompt_ids: Tensor, prompt_mask: Tensor, rows: Tensor) -> Tensor:
        """Run the distinct prompts [U, Tp] (left-padded) and fill cache slots [0, Tp) of each row with its
        prompt's keys/values; rows: [n] index of each cache row's prompt. Returns the last logits [n, V]."""
        tp = prompt_ids.shape[1]
        dynamic = DynamicCache()
        out = self.model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=position_ids(prompt_mask),
            **with_cache(dynamic),
            logits_to_keep=1,
        )
        # a Llama-shaped model's layers are DynamicLayers, their keys and values filled [U, Hkv, Tp, D]; transformers
        # types the list with its linear-attention layers too (no keys) and the tensors as Optional
        layer: Any
        for i, layer in enumerate(dynamic.layers):
            cache.keys(i)[:, :, :tp] = layer.keys[rows]
            cache.values(i)[:, :, :tp] = layer.values[rows]
        cache.valid.zero_()
        cache.valid[:, :tp] = prompt_mask[rows].bool()
        return out.logits[rows, -1]

    def step(
        self,
        cache: StaticKVCache,
        token: Tensor,
        position: Tensor,
        slot: Tensor,
        uniform: Tensor,
        temperature: float,
        top_p: float,
    ) -> tuple[Tensor, Tensor]:
        """Feed token [n] at `position` [n] into cache slot `slot` (0-d), then draw the next token:
        (next token [n], its log-prob [n])."""
        # the cache as plain tensors, not a module's buffers: a compiled step takes a module's tensors as of static
        # shape (dynamo's force_nn_module_property_static_shapes), and the cache's rows and length are dynamic
        keys = [cache.keys(i) for i in range(cache.layers)]
        values = [cache.values(i) for i in range(cache.layers)]
        if self.compile_mode is None:
            return self._step(keys, values, cache.valid, token, position, slot, uniform, temperature, top_p)
        # a CUDA graph replay writes its outputs into the same memory every time: a new step begins, and what
        # the loop keeps of this one is copied out
        torch.compiler.cudagraph_mark_step_begin()
        for x in (token, position, uniform):
            mark_dynamic(x, 0)
        with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT):
            token, logp = self._step(keys, values, cache.valid, token, position, slot, uniform, temperature, top_p)
        return token.clone(), logp.clone()

    def step_eager(
        self,
        keys: list[Tensor],  # [n, Hkv, T, D] per layer: the cache (StaticKVCache)
        values: list[Tensor],
        valid: Tensor,  # [n, T]
        token: Tensor,
        position: Tensor,
        slot: Tensor,
        uniform: Tensor,
        temperature: float,
        top_p: float,
    ) -> tuple[Tensor, Tensor]:
        n = token.shape[0]
        slot = slot.view(1)
        valid.index_fill_(1, slot, True)
        with self._autocast():
            x = self.decoder.embed_tokens(token[:, None])  # [n, 1, H]
            cos, sin = self.decoder.rotary_emb(x, position[:, None])
            for i, layer in enumerate(self.decoder.layers):
                q, k, v = self.projections.attention_in(i, layer, layer.input_layernorm(x))
                q = q.view(n, 1, -1, self.head_dim).transpose(1, 2)  # [n, Hq, 1, D]
                k = k.view(n, 1, -1, self.head_dim).transpose(1, 2)  # [n, Hkv, 1, D]
                v = v.view(n, 1, -1, self.head_dim).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                keys[i].index_copy_(2, slot, k.to(keys[i].dtype))
                values[i].index_copy_(2, slot, v.to(values[i].dtype))
                o = cached_attention(q, keys[i], values[i], valid, layer.self_attn.scaling)  # [n, 1, Hq * D]
                x = x + self.projections.attention_out(i, layer, o)
                x = x + self.projections.mlp(i, layer, layer.post_attention_layernorm(x))
            logits = self.projections.head(self.decoder.norm(x))[:, -1]  # [n, V]
        return sample_token(logits, uniform, temperature, top_p)
