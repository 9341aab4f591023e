"""The feature-level draft head as a trainable module, with EAGLE-3's "training-time test".

`EagleTrainHead` holds the same tensors as a head directory (`specgrove.models.eagle`) and computes what
`EagleHead` computes at run time, in plain PyTorch with gradients. Drafting d tokens ahead feeds the head its
own outputs from the second token on, so training unrolls that: `steps(tokens, features, n)` runs

  step 1   every pair t (features of token t, token t+1), causal attention over the pairs: h1_t;
  step j   for every anchor a, the pair a+j-1 with input (h_{j-1} of anchor a, token a+j), which sees the step-1
           keys of pairs 0..a (the committed context, from the target's true features) and its own chain's keys
           of steps 2..j, exactly the keys a draft at depth j sees in the head's KV cache;

and step j at anchor a predicts token a+j+1, whose teacher is the target's own distribution there (the target's
output layer, cut to the head's tokens, over its last-layer features). `tests/test_eagle.py` checks that the
module's steps equal the run-time head's drafting, so the head trained is the head that runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specgrove.models.eagle import HEAD_TOKEN_IDS, EagleConfig

# The head's MLP width by default: a quarter of the 1.5B target's, which keeps a draft forward near a twentieth of
# the target's and an epoch of training within minutes on a 2-core CPU (docs/benchmarks.md, session 7)
DEFAULT_INTERMEDIATE = 2048


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)


class EagleTrainHead(nn.Module):
    def __init__(
        self,
        config: EagleConfig,
        embed: torch.Tensor,
        head_rows: torch.Tensor,
        head_token_ids: torch.Tensor,
        target_norm: torch.Tensor,
        inv_freq: torch.Tensor,
        attention_scaling: float = 1.0,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.config = config
        hs, inter = config.hidden_size, config.intermediate_size
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        bias = config.attention_bias
        self.fc = nn.Linear(config.feature_size, hs, bias=False)
        self.norm_embed = nn.Parameter(torch.ones(hs))
        self.norm_feature = nn.Parameter(torch.ones(hs))
        self.in_proj = nn.Linear(2 * hs, hs, bias=False)
        self.input_layernorm = nn.Parameter(torch.ones(hs))
        self.q_proj = nn.Linear(hs, q, bias=bias)
        self.k_proj = nn.Linear(hs, kv, bias=bias)
        self.v_proj = nn.Linear(hs, kv, bias=bias)
        self.o_proj = nn.Linear(q, hs, bias=False)
        self.post_attention_layernorm = nn.Parameter(torch.ones(hs))
        self.gate_proj = nn.Linear(hs, inter, bias=False)
        self.up_proj = nn.Linear(hs, inter, bias=False)
        self.down_proj = nn.Linear(inter, hs, bias=False)
        self.norm = nn.Parameter(torch.ones(hs))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # frozen: the target's embedding, its output layer cut to the head's tokens, its final norm (the teacher)
        self.register_buffer("embed", embed.float(), persistent=False)
        self.register_buffer("head_rows", head_rows.float(), persistent=False)
        self.register_buffer("head_token_ids", head_token_ids.to(torch.int64), persistent=False)
        self.register_buffer("target_norm", target_norm.float(), persistent=False)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = float(attention_scaling)

    # ---- names as the head directory has them ------------------------------------------------------
    _NAMES = {
        "fc.weight": "fc.weight",
        "norm_embed": "norm_embed.weight",
        "norm_feature": "norm_feature.weight",
        "in_proj.weight": "in_proj.weight",
        "input_layernorm": "model.layers.0.input_layernorm.weight",
        "q_proj.weight": "model.layers.0.self_attn.q_proj.weight",
        "q_proj.bias": "model.layers.0.self_attn.q_proj.bias",
        "k_proj.weight": "model.layers.0.self_attn.k_proj.weight",
        "k_proj.bias": "model.layers.0.self_attn.k_proj.bias",
        "v_proj.weight": "model.layers.0.self_attn.v_proj.weight",
        "v_proj.bias": "model.layers.0.self_attn.v_proj.bias",
        "o_proj.weight": "model.layers.0.self_attn.o_proj.weight",
        "post_attention_layernorm": "model.layers.0.post_attention_layernorm.weight",
        "gate_proj.weight": "model.layers.0.mlp.gate_proj.weight",
        "up_proj.weight": "model.layers.0.mlp.up_proj.weight",
        "down_proj.weight": "model.layers.0.mlp.down_proj.weight",
        "norm": "model.norm.weight",
    }

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The head's tensors under the names of a head directory (fp32), with the cut vocabulary's ids."""
        out = {self._NAMES[name]: p.detach().float().cpu().clone() for name, p in self.named_parameters()}
        out[HEAD_TOKEN_IDS] = self.head_token_ids.cpu().clone()
        return out

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """The inverse of `export_weights` (the ids must be this module's)."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, file_name in self._NAMES.items():
                if name in params:
                    params[name].copy_(weights[file_name])

    # ---- the computation ---------------------------------------------------------------------------
    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [n, heads, D] rotated to `positions` [n] (the target's RoPE, as LlamaModel applies it)."""
        freqs = positions[:, None].float() * self.inv_freq
        cos = torch.cat((freqs.cos(), freqs.cos()), -1)[:, None, :] * self.attention_scaling
        sin = torch.cat((-freqs.sin(), freqs.sin()), -1)[:, None, :] * self.attention_scaling
        half = x.shape[-1] // 2
        return x * cos + torch.cat((x[..., half:], x[..., :half]), -1) * sin

    def _input(self, tokens: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        eps = self.config.rms_norm_eps
        e = F.embedding(tokens, self.embed)
        return self.in_proj(torch.cat([_rms(e, self.norm_embed, eps), _rms(g, self.norm_feature, eps)], -1))

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        c = self.config
        n = x.shape[0]
        y = _rms(x, self.input_layernorm, c.rms_norm_eps)
        q = self._rope(self.q_proj(y).view(n, c.num_heads, c.head_dim), positions)
        k = self._rope(self.k_proj(y).view(n, c.num_kv_heads, c.head_dim), positions)
        v = self.v_proj(y).view(n, c.num_kv_heads, c.head_dim)
        groups = c.num_heads // c.num_kv_heads
        return q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)

    def _finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        c = self.config
        h = x + self.o_proj(attn.reshape(x.shape[0], c.num_heads * c.head_dim))
        y = _rms(h, self.post_attention_layernorm, c.rms_norm_eps)
        return h + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the cut vocabulary (row i = token head_token_ids[i])."""
        return _rms(h, self.norm, self.config.rms_norm_eps) @ self.head_rows.T

    def teacher_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The target's own logits over the cut vocabulary from its features [n, k*H] (last layer's slice)."""
        last = features[..., -self.config.hidden_size :].float()
        return _rms(last, self.target_norm, self.config.rms_norm_eps) @ self.head_rows.T

    def steps(
        self, tokens: torch.Tensor, features: torch.Tensor, num_steps: int, first_anchor: int = 0
    ) -> list[torch.Tensor]:
        """The head's outputs of steps j = 1..num_steps over one sequence: tokens [L] and the target's features
        [>= L-1, k*H] of its tokens (the last token's are not needed). Step 1 gives h_1 [L-1, H], row a the
        pair a after the pairs 0..a-1; step j >= 2 gives the rows of anchors a = first_anchor..L-j-1, the draft
        at depth j after the pairs 0..a (predicting token a+j+1): [L-j-first_anchor, H]. Anchors before
        `first_anchor` are context only (their later steps are not computed)."""
        c = self.config
        length = tokens.shape[0]
        if length < 2 or features.shape[0] < length - 1:
            raise ValueError(
                f"a training sequence needs >= 2 tokens and the features of all but the last, got {length} tokens "
                f"and {features.shape[0]} feature rows"
            )
        scale = c.head_dim**-0.5
        n1 = length - 1
        positions = torch.arange(1, length, device=tokens.device)
        x = self._input(tokens[1:], self.fc(features[:n1].float()))
        q, k1, v1 = self._qkv(x, positions)
        causal = torch.ones(n1, n1, dtype=torch.bool, device=tokens.device).tril()
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1), k1.transpose(0, 1), v1.transpose(0, 1), attn_mask=causal, scale=scale
        ).transpose(0, 1)
        outs = [self._finish(x, attn)]
        own_k: list[torch.Tensor] = []
        own_v: list[torch.Tensor] = []
        f = first_anchor
        for j in range(2, num_steps + 1):
            n = length - j - f  # anchors a = f..f+n-1 (pair a+j-1 exists)
            if n < 1:
                break
            previous = outs[-1][f : f + n] if j == 2 else outs[-1][:n]
            x = self._input(tokens[f + j : f + j + n], previous)
            q, k, v = self._qkv(x, positions[f : f + n] + (j - 1))
            own_k = [t[:n] for t in own_k] + [k]
            own_v = [t[:n] for t in own_v] + [v]
            s1 = torch.einsum("ahd,bhd->hab", q, k1) * scale  # [heads, n, n1]
            s1 = s1.masked_fill(~causal[f : f + n], float("-inf"))
            s_own = torch.stack([(q * kk).sum(-1) for kk in own_k], -1).transpose(0, 1) * scale  # [heads, n, j-1]
            p = torch.softmax(torch.cat([s1, s_own], -1), -1)
            attn = torch.einsum("hab,bhd->ahd", p[..., :n1], v1)
            attn = attn + torch.einsum("han,anhd->ahd", p[..., n1:], torch.stack(own_v, 1))
            outs.append(self._finish(x, attn))
        return outs


def head_config(target, intermediate_size: int | None = None, feature_layers=None, training: dict | None = None):
    """The EagleConfig of a new head for `target` (a LoadedModel on the fast runtime): the target's attention
    geometry, an MLP of `intermediate_size` (default: DEFAULT_INTERMEDIATE, at most the target's), `feature_layers`
    (default: low, middle and last layer), bound to the target by its fingerprint."""
    from specgrove.models.eagle import (
        check_feature_layers,
        default_feature_layers,
        require_fast_target,
        target_fingerprint,
    )

    require_fast_target(target)
    c = target.model.config
    layers = default_feature_layers(c.num_layers) if feature_layers is None else feature_layers
    return EagleConfig(
        hidden_size=c.hidden_size,
        intermediate_size=int(intermediate_size or min(DEFAULT_INTERMEDIATE, c.intermediate_size)),
        num_heads=c.num_heads,
        num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        attention_bias=c.attention_bias,
        feature_layers=check_feature_layers(layers, c.num_layers),
        target={
            "fingerprint": target_fingerprint(target),
            "name": str(target.name),
            "vocab_size": c.vocab_size,
            "num_layers": c.num_layers,
            "hidden_size": c.hidden_size,
        },
        training=dict(training or {}),
    )


def new_train_head(
    target, config: EagleConfig, token_ids: torch.Tensor | None = None, init_std: float = 0.02, seed: int = 0
) -> EagleTrainHead:
    """A freshly initialised head for `target` (its embedding, output rows `token_ids` (default: every token) and
    final norm frozen inside), reproducible from `seed`."""
    from specgrove.models.eagle import dense_output_rows
    from specgrove.models.llama import rope_inverse_frequencies

    model = target.model
    ids = torch.arange(model.vocab_size) if token_ids is None else torch.as_tensor(token_ids, dtype=torch.int64)
    inv_freq, scaling = rope_inverse_frequencies(target.hf_config)
    torch.manual_seed(seed)
    return EagleTrainHead(
        config,
        embed=model.embed.detach().float().cpu(),
        head_rows=dense_output_rows(target, ids),
        head_token_ids=ids,
        target_norm=model.norm.detach().float().cpu(),
        inv_freq=inv_freq,
        attention_scaling=scaling,
        init_std=init_std,
    )
