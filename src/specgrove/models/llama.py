"""A forward pass for the Llama family (Llama, Qwen2, Mistral, SmolLM) that takes token trees.

`forward(input_ids, positions, cache, tree_mask)` appends T new tokens per sequence to a KVCache.
Each new token has its own position id and sees (a) every committed token of its sequence and
(b) the new tokens its row of `tree_mask` allows (its ancestors in a token tree; a chain is the
causal mask). Rows of a batch may have different committed lengths and different numbers of new
tokens (the rest is padding). Logits match transformers' implementation of the same weights.

q/k/v and gate/up projections are fused at load time so a layer is four matrix multiplies, each a
`specgrove.models.linear.Linear` (prepacked for oneDNN on CPU, or int8 / int4 / w8a8). On CUDA, forwards
of up to 32 new tokens replay CUDA graphs (`specgrove.models.cuda_graphs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specgrove.models.kv_cache import KVCache
from specgrove.models.linear import GGUFLinear, Linear, packing_available

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass
class LlamaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    sliding_window: int | None

    @classmethod
    def from_hf(cls, hf_config) -> LlamaConfig:
        model_type = hf_config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {model_type!r} is not in the Llama family ({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"activation {hf_config.hidden_act!r} is not supported by the fast runtime (silu only)")
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        sliding = None
        if model_type == "mistral" or getattr(hf_config, "use_sliding_window", False):
            sliding = getattr(hf_config, "sliding_window", None)
        return cls(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            # Qwen2 has biases on q/k/v by architecture; Llama/Mistral carry a flag.
            attention_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            sliding_window=sliding,
        )


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


class _WeightReader:
    """Takes a checkpoint's tensors by name, each once (popped, so memory is freed as the model is built), onto
    the model's device and dtype; matrices become Linear (dense) or GGUFLinear (from the GGUF file)."""

    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        packed: bool,
        quantization: str | None,
        gguf_weights=None,
    ):
        self.weights, self.dtype, self.device = weights, dtype, device
        self.packed, self.quantization, self.gguf_weights = packed, quantization, gguf_weights

    def take(self, name: str) -> torch.Tensor:
        return self.weights.pop(name).to(device=self.device, dtype=self.dtype).contiguous()

    def maybe(self, name: str) -> torch.Tensor | None:
        return self.take(name) if name in self.weights else None

    def fuse(self, *names: str) -> torch.Tensor:
        return torch.cat([self.weights.pop(n).to(self.dtype) for n in names], dim=0).to(self.device).contiguous()

    def fuse_optional(self, *names: str) -> torch.Tensor | None:
        return self.fuse(*names) if all(n in self.weights for n in names) else None

    def linear(self, names: tuple[str, ...], bias: torch.Tensor | None) -> Linear | GGUFLinear:
        """The matrices `names` stacked along the output (fused), from the GGUF file or the dense weights."""
        if self.gguf_weights is not None:
            for n in names:
                self.weights.pop(n, None)
            return GGUFLinear([self.gguf_weights.matrix(n) for n in names], bias)
        return Linear(self.fuse(*names), bias, self.packed, self.quantization)

    def layer(self, i: int) -> LayerWeights:
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        return LayerWeights(
            input_norm=self.take(p + "input_layernorm.weight"),
            qkv=self.linear(
                (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                self.fuse_optional(attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
            ),
            o=self.linear((attn + "o_proj.weight",), self.maybe(attn + "o_proj.bias")),
            post_norm=self.take(p + "post_attention_layernorm.weight"),
            gate_up=self.linear(
                (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
                self.fuse_optional(mlp + "gate_proj.bias", mlp + "up_proj.bias"),
            ),
            down=self.linear((mlp + "down_proj.weight",), self.maybe(mlp + "down_proj.bias")),
        )


def rope_inverse_frequencies(hf_config) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies and attention scaling, computed by transformers' own rope functions."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type == "dynamic":
        raise ValueError("dynamic NTK RoPE changes with the sequence length and is not supported by the fast runtime")
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config)


class LlamaModel:
    """The fast runtime model. Not an nn.Module: a plain holder of tensors and one forward function."""

    supports_trees = True
    supports_batching = True

    def __init__(
        self,
        config: LlamaConfig,
        hf_config,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device,
        pack_weights: bool | None = None,
        quantization: str | None = None,
        cuda_graphs: bool | None = None,
        gguf_weights=None,
        head_tokens: torch.Tensor | None = None,
    ):
        self.config = config
        self.hf_config = hf_config
        self.dtype = dtype
        self.device = torch.device(device)
        self.vocab_size = config.vocab_size
        ids = self._check_options(weights, quantization, gguf_weights, head_tokens)
        available = packing_available(self.device, dtype)
        if pack_weights and not available:
            raise ValueError(
                "weight prepacking needs a CPU with oneDNN and float32 weights, or bfloat16 weights on a CPU "
                "whose oneDNN can reorder them (AVX-512 BW/VL/DQ or AVX-NE-CONVERT)"
            )
        self.packed = available if pack_weights is None else pack_weights
        # None, "int8", "int4", "w8a8" or "gguf" (every matrix multiply incl. the head)
        self.quantization = quantization
        reader = _WeightReader(weights, dtype, self.device, self.packed, quantization, gguf_weights)
        self.embed = reader.take("model.embed_tokens.weight")
        self.layers: list[LayerWeights] = [reader.layer(i) for i in range(config.num_layers)]
        self.norm = reader.take("model.norm.weight")
        # a head cut to some tokens (sorted drafts, specgrove.models.sorted; drafts' head_vocab), else None
        self.head_token_ids = None if ids is None else ids.to(self.device)
        self.lm_head = self._load_head(reader, ids)
        # Batch-invariant attention (specgrove.kernels.attention) where every matrix multiply is too: then a
        # token's logits do not depend on which other tokens share the forward, and speculative greedy output
        # equals plain greedy output bit for bit.
        # The layer's small operations (norms, RoPE with the KV store, SiLU * up, residual adds) are then fused
        # C++ calls too (specgrove.kernels.layer_ops): the same per-token arithmetic in any batch, fewer dispatches.
        self.batch_invariant = quantization == "gguf" and dtype == torch.float32
        self._attention = self._ops = None
        if self.batch_invariant:
            from specgrove.kernels import attention, layer_ops
            from specgrove.kernels.build import best_isa

            self._attention, self._attention_isa = attention.load_extension().attention, best_isa()
            self._ops = layer_ops.load_extension()
        inv_freq, self.attention_scaling = rope_inverse_frequencies(hf_config)
        self.inv_freq = inv_freq.to(self.device, torch.float32)
        # Small forwards (decode, verification, drafting) replayed as CUDA graphs: on by default on CUDA.
        self.graphs = None
        if cuda_graphs or (cuda_graphs is None and self.device.type == "cuda"):
            from specgrove.models.cuda_graphs import GraphRunner

            self.graphs = GraphRunner(self)

    def _check_options(self, weights, quantization, gguf_weights, head_tokens) -> torch.Tensor | None:
        """ValueError for options that do not go together; the head's token ids (int64) when it is cut."""
        ids = None
        if head_tokens is not None:  # the output layer cut to these tokens (load_model's head_vocab)
            if "lm_head.token_ids" in weights:
                raise ValueError("this checkpoint's head is already cut to some tokens (lm_head.token_ids)")
            ids = torch.as_tensor(head_tokens, dtype=torch.int64).flatten()
            vocab = self.config.vocab_size
            if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab or bool((ids.diff() <= 0).any()):
                raise ValueError(f"head_tokens must be increasing token ids in [0, {vocab})")
        if (quantization == "gguf") != (gguf_weights is not None):
            raise ValueError("quantization='gguf' needs the model's GGUF file (gguf_weights), and only it")
        if quantization == "gguf" and self.device.type != "cpu":
            raise ValueError("the gguf weight format runs on CPU; on a GPU use int4 or none")
        return ids

    def _load_head(self, reader: _WeightReader, ids: torch.Tensor | None) -> Linear | GGUFLinear:
        """The output layer: lm_head (or the tied embedding), cut to `ids` or to the checkpoint's own token ids."""
        weights, gguf_weights = reader.weights, reader.gguf_weights
        if "lm_head.token_ids" in weights:
            # the checkpoint's head is already cut; with gguf_weights, its matrix is those rows' blocks
            self.head_token_ids = weights.pop("lm_head.token_ids").to(self.device, torch.int64)
            if gguf_weights is None and "lm_head.weight" not in weights:
                raise ValueError("lm_head.token_ids needs its own lm_head.weight")
        if gguf_weights is not None:
            weights.pop("lm_head.weight", None)
            head = gguf_weights.matrix("lm_head.weight", tied=self.config.tie_word_embeddings)
            if ids is not None:  # the rows of those tokens, as they are stored
                head = dataclasses.replace(head, data=head.data[ids].contiguous(), n=int(ids.numel()))
            if self.head_token_ids is not None and head.n != len(self.head_token_ids):
                raise ValueError(f"the head has {head.n} rows but lm_head.token_ids names {len(self.head_token_ids)}")
            return GGUFLinear([head], None)
        if "lm_head.weight" in weights and (not self.config.tie_word_embeddings or self.head_token_ids is not None):
            head = reader.take("lm_head.weight")
        else:
            weights.pop("lm_head.weight", None)
            head = self.embed
        if ids is not None:
            head = head[ids.to(head.device)].contiguous()
        if self.head_token_ids is not None and head.shape[0] != len(self.head_token_ids):
            raise ValueError(
                f"lm_head.weight has {head.shape[0]} rows but lm_head.token_ids names {len(self.head_token_ids)}"
            )
        return Linear(head, None, self.packed, self.quantization)

    # ---- sizes -------------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (every matrix once; the embedding row gather is ~free)."""
        total = self.norm.numel() * self.norm.element_size() + self.lm_head.nbytes
        for layer in self.layers:
            total += layer.qkv.nbytes + layer.o.nbytes + layer.gate_up.nbytes + layer.down.nbytes
            total += (layer.input_norm.numel() + layer.post_norm.numel()) * layer.input_norm.element_size()
        return total

    def num_parameters(self) -> int:
        tied = self.config.tie_word_embeddings or getattr(self.lm_head, "weight", None) is self.embed
        n = self.embed.numel() + self.norm.numel() + (0 if tied else self.lm_head.numel)
        for layer in self.layers:
            n += layer.qkv.numel + layer.o.numel + layer.gate_up.numel + layer.down.numel
            n += layer.input_norm.numel() + layer.post_norm.numel()
        return n

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c = self.config
        if self.config.sliding_window is not None and max_len > self.config.sliding_window:
            raise ValueError(
                f"this model attends within a sliding window of {self.config.sliding_window} tokens; the fast runtime "
                f"supports contexts up to the window only (asked for {max_len})"
            )
        return KVCache(c.num_layers, batch_size, c.num_kv_heads, c.head_dim, max_len, self.dtype, self.device)

    # ---- forward -----------------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm with this model's epsilon and kernels (batch-invariant in the gguf format)."""
        return self._rms_norm(x, weight)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self._ops is not None:  # batch-invariant fp32: specgrove.kernels.layer_ops
            return self._ops.rms_norm(x, weight, self.config.rms_norm_eps, self._attention_isa)
        if x.dtype == torch.float32:  # one kernel, weight included
            return F.rms_norm(x, (x.shape[-1],), weight, eps=self.config.rms_norm_eps)
        # As transformers: normalise in fp32, scale in the model dtype (one fused kernel for the normalising).
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.config.rms_norm_eps).to(x.dtype)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and the sign-folded sin [B, T, 1, D] of each position: x * cos + swap_halves(x) * sin is
        transformers' x * cos + rotate_half(x) * sin (rotate_half negates the swapped first half)."""
        freqs = positions[..., None].float() * self.inv_freq
        cos = freqs.cos() * self.attention_scaling
        sin = freqs.sin() * self.attention_scaling
        cos = torch.cat((cos, cos), dim=-1).to(self.dtype)
        sin = torch.cat((-sin, sin), dim=-1).to(self.dtype)
        return cos[:, :, None, :], sin[:, :, None, :]

    @staticmethod
    def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin

    def build_attention_mask(
        self,
        cache: KVCache,
        rows: list[int],
        num_tokens: int,
        tree_mask: torch.Tensor | None,
        prior: int = 0,
        min_span: int = 0,
    ) -> tuple[torch.Tensor, int]:
        """Boolean mask [B, 1, T, S] over keys 0..S-1 of each row's cache, S = max(max(len) + prior + T, min_span).

        Keys before a row's committed length are visible to every new token. The `prior` uncommitted
        slots written by earlier forwards (a tree being extended level by level) and the T new slots form
        the tree region; `tree_mask` [B, T, prior + T] says which of them each new token sees. Keys past
        a row's region are masked (a `min_span` longer than needed gives a fixed shape for CUDA graphs)."""
        lengths = torch.tensor([cache.lengths[r] for r in rows], device=self.device)
        region = prior + num_tokens
        span = max(int(max(cache.lengths[r] for r in rows)) + region, min_span)
        keys = torch.arange(span, device=self.device)
        rel = keys[None, :] - lengths[:, None]  # [B, S] key offset from the first uncommitted slot
        committed = rel < 0
        in_region = (rel >= 0) & (rel < region)
        if tree_mask is None:
            if prior:
                raise ValueError("extending uncommitted slots needs a tree_mask over them")
            tree_mask = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=self.device).tril()
            tree_mask = tree_mask.expand(len(rows), -1, -1)
        else:
            if tuple(tree_mask.shape[-2:]) != (num_tokens, region):
                raise ValueError(f"tree_mask must be [B, {num_tokens}, {region}], got {tuple(tree_mask.shape)}")
            # Every token sees itself (also padding rows, which keeps their softmax finite).
            own = (
                torch.arange(region, device=self.device)[None, :]
                == (prior + torch.arange(num_tokens, device=self.device))[:, None]
            )
            tree_mask = tree_mask.to(self.device, torch.bool) | own
        gathered = torch.gather(
            tree_mask, 2, rel.clamp(0, region - 1)[:, None, :].expand(-1, num_tokens, -1)
        )  # [B, T, S]: tree_mask[b, i, rel[b, s]]
        mask = committed[:, None, :] | (in_region[:, None, :] & gathered)
        return mask[:, None], span

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        tree_mask: torch.Tensor | None = None,
        rows: list[int] | None = None,
        logits_at: torch.Tensor | str | None = "all",
        num_new: list[int] | None = None,
        extend: bool = False,
        features: Sequence[int] | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | None | tuple[torch.Tensor | None, torch.Tensor]:
        """Run T new tokens per row through the model, writing their KV (uncommitted) into `cache`.

        input_ids, positions: [B, T]. tree_mask: [B, T, T] bool (row i may attend to new token j), None =
        causal. rows: which cache rows the B inputs belong to (default 0..B-1). num_new: valid tokens per
        row (the rest is padding), default T. logits_at: "all" -> [B, T, V]; "last" -> the last valid
        token per row, [B, 1, V]; a LongTensor [B, M] of token indices -> [B, M, V]; None -> no logits.
        Logits are returned in fp32.

        extend: keep the uncommitted slots of the previous forward(s) and write after them (a draft tree
        grown one level per forward); tree_mask is then [B, T, prior + T] over old and new uncommitted
        slots, and a later `commit` picks among all of them. Rows must have the same number of prior slots.

        features: layer indices (negative counts from the last layer; -1 is the last layer's output before the
        final norm). When given, returns (logits, features): features [B, T, H * len(features)] are the hidden
        states after those layers, concatenated in the order given, for every new token, from this same forward
        (what a feature-level draft head reads). They are not reduced by `logits_at`.

        inputs_embeds: [B, T, H] the first layer's input instead of the embedding of input_ids (a draft head's
        own input, specgrove.models.eagle); input_ids still give the shape.
        """
        input_ids = input_ids.to(self.device)
        positions = positions.to(self.device)
        batch, num_tokens = input_ids.shape
        rows = list(range(batch)) if rows is None else list(rows)
        prior = cache.pending[rows[0]] if extend else 0
        if extend and any(cache.pending[r] != prior for r in rows):
            raise ValueError("extend needs the same number of uncommitted slots in every row")
        cache.check_room(prior + num_tokens, rows)
        if isinstance(logits_at, str) and logits_at not in ("all", "last"):
            raise ValueError(f"logits_at must be 'all', 'last', None or an index tensor, got {logits_at!r}")
        layers = self._feature_layer_numbers(features)
        graph = None
        if self.graphs is not None and logits_at is not None and layers is None and inputs_embeds is None:
            graph = self.graphs.lookup(cache, rows, num_tokens, prior)
        mask, span = self.build_attention_mask(
            cache, rows, num_tokens, tree_mask, prior, 0 if graph is None else graph.span
        )
        # GQA without repeating K/V: fold the query heads of a group into the query axis.
        mask = self.fold_groups(mask)
        row_index = torch.tensor(rows, device=self.device)
        slots = torch.tensor([cache.lengths[r] + prior for r in rows], device=self.device)[:, None] + torch.arange(
            num_tokens, device=self.device
        )
        if graph is not None:
            logits = graph.run(input_ids, positions, mask, slots, row_index)
        else:
            all_rows = rows == list(range(cache.batch_size))
            collected = None if layers is None else dict.fromkeys(layers)
            h = self.hidden_states(
                input_ids, positions, cache, mask, slots, row_index, span, all_rows, collected, inputs_embeds
            )

        for b, r in enumerate(rows):
            cache.pending[r] = prior + (num_tokens if num_new is None else num_new[b])
        if logits_at is None and layers is None:
            return None
        index = self._logit_index(logits_at, batch, num_tokens, num_new)
        if graph is not None:  # the graph computed every token's logits into its buffer: copy out the ones asked for
            if index is None:
                return logits.clone()
            return torch.gather(logits, 1, index[:, :, None].expand(-1, -1, logits.shape[-1]))
        logits = None
        if logits_at is not None:
            logits = self.logits(
                h if index is None else torch.gather(h, 1, index[:, :, None].expand(-1, -1, h.shape[-1]))
            )
        if layers is None:
            return logits
        return logits, torch.cat([collected[li] for li in layers], dim=-1)

    def _feature_layer_numbers(self, features: Sequence[int] | None) -> list[int] | None:
        """`features` (layer indices, negative from the end) as layer numbers 0..L-1; None stays None."""
        if features is None:
            return None
        n = len(self.layers)
        layers = [int(i) for i in features]
        if not layers or any(not -n <= i < n for i in layers):
            raise ValueError(f"features must be one or more layer indices in [-{n}, {n}), got {list(features)}")
        return [i % n for i in layers]

    def _logit_index(self, logits_at, batch: int, num_tokens: int, num_new: list[int] | None) -> torch.Tensor | None:
        """The token indices [B, M] whose logits `forward` returns; None for every token (or no logits)."""
        if logits_at is None or (isinstance(logits_at, str) and logits_at == "all"):
            return None
        if isinstance(logits_at, str):  # "last"
            counts = [num_tokens] * batch if num_new is None else num_new
            return torch.tensor([[n - 1] for n in counts], device=self.device)
        return logits_at.to(self.device)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        mask: torch.Tensor,
        slots: torch.Tensor,
        row_index: torch.Tensor,
        span: int,
        all_rows: bool = False,
        collect: dict[int, torch.Tensor | None] | None = None,
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every layer over new tokens input_ids [B, T] at `positions` (no host work: what a CUDA graph
        captures). Writes their KV into cache rows `row_index` [B] at `slots` [B, T]; `mask` as layer_forward
        takes it; `all_rows`: row_index is 0..batch-1 of the cache (attend by slicing, not gathering).
        `collect`: layer numbers as keys; each gets the hidden states after that layer. `embeds`: the first
        layer's input in place of the tokens' embeddings."""
        batch, num_tokens = input_ids.shape
        write_rows = row_index[:, None].expand(batch, num_tokens)
        rope = self._rope(positions)
        h = self.embed_tokens(input_ids) if embeds is None else embeds
        for li in range(len(self.layers)):
            h = self.layer_forward(li, h, rope, cache, write_rows, slots, mask, span, None if all_rows else row_index)
            if collect is not None and li in collect:
                collect[li] = h
        return h

    # ---- pieces of the forward (also used layer by layer by sorted drafts, specgrove.drafting.sorted) ----
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids.to(self.device), self.embed)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rope(positions.to(self.device))

    def layer_forward(
        self,
        li: int,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        write_rows: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor,
        span: int,
        row_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Layer `li` over hidden states h [B, T, H]: writes the tokens' keys/values into cache slots
        (write_rows, slots) [B, T] of layer li, attends over keys 0..span-1 of rows `row_index` (None = all
        rows, in order) with the boolean mask [B, 1, groups * T, span] (query groups folded), returns h."""
        c = self.config
        batch, num_tokens = h.shape[:2]
        groups = c.num_heads // c.num_kv_heads
        q_size = c.num_heads * c.head_dim
        kv_size = c.num_kv_heads * c.head_dim
        cos, sin = rope
        layer = self.layers[li]
        if self._ops is not None:  # batch-invariant fp32: fused C++ calls (same operations, fewer dispatches)
            ops, isa = self._ops, self._attention_isa
            rows0 = write_rows[:, 0].contiguous()
            qkv = layer.qkv(ops.rms_norm(h, layer.input_norm, c.rms_norm_eps, isa))
            q = ops.rope_store(
                qkv, cos[:, :, 0], sin[:, :, 0], cache.k[li], cache.v[li], rows0, slots, c.num_heads, c.num_kv_heads
            )
            attn = self._attention(q, cache.k[li], cache.v[li], rows0, mask, c.head_dim**-0.5, isa)
            h = layer.o(attn.view(batch, num_tokens, q_size), residual=h)
            x = ops.rms_norm(h, layer.post_norm, c.rms_norm_eps, isa)
            return layer.down(ops.silu_mul(layer.gate_up(x), isa), residual=h)
        x = self._rms_norm(h, layer.input_norm)
        qkv = layer.qkv(x)
        # RoPE on the query and key heads together: one set of kernels.
        qk = self._apply_rope(
            qkv[..., : q_size + kv_size].view(batch, num_tokens, c.num_heads + c.num_kv_heads, c.head_dim), cos, sin
        )
        q, k = qk[:, :, : c.num_heads], qk[:, :, c.num_heads :]
        v = qkv[..., q_size + kv_size :].view(batch, num_tokens, c.num_kv_heads, c.head_dim)
        # Write the new keys/values into their slots ([B, S, H, D] views of the cache).
        cache.k[li].permute(0, 2, 1, 3)[write_rows, slots] = k
        cache.v[li].permute(0, 2, 1, 3)[write_rows, slots] = v
        if row_index is None:
            keys, values = cache.k[li, :, :, :span], cache.v[li, :, :, :span]
        else:
            keys, values = cache.k[li, row_index, :, :span], cache.v[li, row_index, :, :span]
        qg = q.view(batch, num_tokens, c.num_kv_heads, groups, c.head_dim).permute(0, 2, 3, 1, 4)
        qg = qg.reshape(batch, c.num_kv_heads, groups * num_tokens, c.head_dim)
        attn = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
        attn = attn.view(batch, c.num_kv_heads, groups, num_tokens, c.head_dim).permute(0, 3, 1, 2, 4)
        h = h + layer.o(attn.reshape(batch, num_tokens, q_size))
        x = self._rms_norm(h, layer.post_norm)
        gate, up = layer.gate_up(x).chunk(2, dim=-1)
        return h + layer.down(F.silu(gate) * up)

    def fold_groups(self, mask: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, S] boolean mask -> [B, 1, groups * T, S], as layer_forward takes it (GQA folded); the
        batch-invariant attention takes [B, T, S] (no folding)."""
        if self.batch_invariant:
            return mask[:, 0]
        groups = self.config.num_heads // self.config.num_kv_heads
        batch, _, num_tokens, span = mask.shape
        return mask.unsqueeze(2).expand(batch, 1, groups, num_tokens, span).reshape(batch, 1, groups * num_tokens, span)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output layer, fp32 logits over the whole vocabulary. A head cut to some tokens
        (`lm_head.token_ids`, sorted drafts) gives -inf elsewhere, so their probability is exactly 0."""
        return self.expand_head(self.head_logits(h))

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output layer, fp32, one logit per row of the head (for a cut head, the tokens
        `head_token_ids`; their softmax equals the full-vocabulary softmax restricted to them)."""
        return self.lm_head(self._rms_norm(h, self.norm)).float()

    def expand_head(self, out: torch.Tensor) -> torch.Tensor:
        """Head-row logits -> logits over the whole vocabulary (-inf outside a cut head)."""
        if self.head_token_ids is None:
            return out
        full = torch.full((*out.shape[:-1], self.vocab_size), float("-inf"), device=out.device)
        full[..., self.head_token_ids] = out
        return full

    def truncated(self, depth: int) -> LlamaModel:
        """The sub-model of the first `depth` layers with the same final norm and head (weights shared)."""
        if not 1 <= depth <= len(self.layers):
            raise ValueError(f"a sub-model needs 1..{len(self.layers)} layers, got {depth}")
        import copy

        view = copy.copy(self)
        view.layers = self.layers[:depth]
        view.config = copy.copy(self.config)
        view.config.num_layers = depth
        return view
