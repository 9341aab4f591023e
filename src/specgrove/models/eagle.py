"""A feature-level draft head (EAGLE family): one decoder layer that reads the target's own hidden states.

The head predicts the target's next token from what the target already computed. For the pair at position
t+1 it takes the target's features f_t (the hidden states after a few of the target's layers, at token t:
`LlamaModel.forward(features=...)`) and the embedding of token t+1, and returns

    g   = fc(f_t)                                          features of `feature_layers`, fused (k*H -> H)
    x   = in_proj([rms(embed(x_{t+1}), w_e) ; rms(g, w_g)])  (2H -> H)
    h   = decoder_layer(x)                                  attention over the earlier pairs' keys and values
    p   = softmax(lm_head_cut(rms(h, w_norm)))              the next token x_{t+2}

and h, the head's guess of the target's last-layer state at t+1, stands in for the target's features one step
later: drafting deeper feeds (h, the drafted token) back in without fc (EAGLE-3: fused low, middle and high
layer features, and a head trained on its own outputs, "training-time test"; `specgrove.train.eagle`).

The embedding is the target's own. The output layer is the target's, cut to `head_vocab` tokens (the rows of
`lm_head.token_ids`): tokens outside it get probability 0 in q, which keeps speculation exact, and the cut
layer is what makes the head cheap (the target's full output layer is a sixth of its forward).

**On disk** a head is a directory:

    config.json        {"format": "specgrove-eagle/1", "hidden_size", "intermediate_size", "num_heads",
                        "num_kv_heads", "head_dim", "rms_norm_eps", "attention_bias", "feature_layers",
                        "target": {"fingerprint", "name", "vocab_size", "num_layers", "hidden_size"},
                        "training": {...}}
    model.safetensors  fc.weight, norm_embed.weight, norm_feature.weight, in_proj.weight,
                       model.layers.0.* (Hugging Face names), model.norm.weight, lm_head.token_ids

No pickles. The head is bound to its target by `target_fingerprint` (a digest of the target's shapes and of
weights that every format of it holds alike); loading it against another target is an error.

**At run time** the layer is a one-layer `LlamaModel` sharing the target's embedding, so it has the same KV
cache, token-tree masks and kernels as every model here. With a target in the gguf format its matrices
are quantized to Q8_0 (`gguf.quants`) and the cut output layer keeps the target's own blocks, so the head
runs on the same integer kernels; with a dense target they stay dense in the target's dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from specgrove.errors import SpecgroveError

FORMAT = "specgrove-eagle/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HEAD_TOKEN_IDS = "lm_head.token_ids"
TRAIN_COMMAND = "specgrove train-eagle"
TRAIN_TIME = "about 90 minutes on a 2-core CPU with the default recipe"


class EagleHeadError(SpecgroveError):
    """A head directory that is missing, malformed, or made for another target."""


@dataclass
class EagleConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    attention_bias: bool
    feature_layers: list[int]  # target layer numbers 0..L-1, increasing, the last one L-1
    target: dict  # fingerprint, name, vocab_size, num_layers, hidden_size
    training: dict = field(default_factory=dict)
    format: str = FORMAT

    @property
    def feature_size(self) -> int:
        return self.hidden_size * len(self.feature_layers)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def default_feature_layers(num_layers: int) -> list[int]:
    """Low, middle and last layer (EAGLE-3): layer 2, layer L/2 and layer L-1 (fewer on a shallow target)."""
    return sorted({min(2, num_layers - 1), num_layers // 2, num_layers - 1})


def check_feature_layers(layers, num_layers: int) -> list[int]:
    """Layer indices (negative from the end) as increasing layer numbers ending at the last layer, whose
    features give the target's own distribution (the training teacher)."""
    numbers = [int(i) % num_layers if -num_layers <= int(i) < num_layers else None for i in layers]
    if not numbers or None in numbers:
        raise ValueError(f"feature layers must be layer indices in [-{num_layers}, {num_layers}), got {list(layers)}")
    if numbers != sorted(set(numbers)) or numbers[-1] != num_layers - 1:
        raise ValueError(
            f"feature layers must increase and end with the target's last layer ({num_layers - 1} or -1), "
            f"got {list(layers)}"
        )
    return numbers


def target_fingerprint(target, legacy: bool = False) -> str:
    """A digest of a target (a LoadedModel on the fast runtime) that is the same in every format it loads in
    (GGUF blocks, dense fp32 or bf16 from the same file): its shapes, its norms, and a slice of its embedding,
    each rounded to bf16 first, so that a target loaded in fp32 and in bf16 (dtype auto on a CPU with AVX-512
    BF16) agree. `legacy`: the digest of heads saved before that rounding (unrounded values)."""
    model = target.model
    c = model.config
    h = hashlib.sha256(
        json.dumps([c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim]).encode()
    )
    for tensor in (model.norm, model.layers[0].input_norm, model.layers[-1].post_norm, model.embed[:16]):
        values = tensor.detach().to("cpu")
        values = values.to(torch.float32) if legacy else values.to(torch.bfloat16).to(torch.float32)
        h.update(values.contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def require_fast_target(target) -> None:
    from specgrove.models.llama import LlamaModel

    if not isinstance(target.model, LlamaModel):
        raise EagleHeadError(
            f"a feature-level draft head reads the target's hidden states, which needs a Llama-family target on the "
            f"fast runtime; {target.name} runs through the transformers fallback"
        )


# ---- the target's output layer, cut ----------------------------------------------------------------
def _target_output_source(target):
    """('gguf', GGUFMatrix of the whole output layer) or ('dense', float tensor [V, H]) of a target."""
    from specgrove.models.gguf_weights import GGUFWeights
    from specgrove.models.loader import gguf_source, read_safetensors

    tied = bool(target.model.config.tie_word_embeddings)
    if getattr(target.model, "quantization", None) == "gguf":
        head = target.model.lm_head
        if target.model.head_token_ids is None and head.parts is not None and len(head.parts) == 1:
            return "gguf", head.parts[0]  # the loaded target's own blocks
        source = gguf_source(target.name)
        if source is None:
            raise EagleHeadError(f"cannot find the GGUF file of {target.name} to read its output layer")
        return "gguf", GGUFWeights(source).matrix("lm_head.weight", tied=tied)
    names = ("model.embed_tokens.weight",) if tied else ("lm_head.weight", "model.embed_tokens.weight")
    weights = read_safetensors(target.path, skip=lambda n: n not in names)
    key = names[0] if names[0] in weights else "model.embed_tokens.weight"
    return "dense", weights[key]


def output_rows(target, token_ids: torch.Tensor):
    """The target's output-layer rows of `token_ids`: a GGUFMatrix of its own blocks (gguf format) or a float
    tensor [N, H]."""
    kind, full = _target_output_source(target)
    ids = token_ids.to(torch.int64).cpu()
    if kind == "gguf":
        return dataclasses.replace(full, data=full.data[ids].contiguous(), n=int(ids.numel()))
    return full[ids].contiguous()


def dense_output_rows(target, token_ids: torch.Tensor) -> torch.Tensor:
    """The same rows as fp32 [N, H] (what training multiplies by)."""
    from specgrove.kernels.ggml import ggml_dequantize

    rows = output_rows(target, token_ids)
    if isinstance(rows, torch.Tensor):
        return rows.float()
    return ggml_dequantize(rows.data, rows.type, rows.n, rows.k)


# ---- files -----------------------------------------------------------------------------------------
def save_head(directory: str | Path, config: EagleConfig, weights: dict[str, torch.Tensor]) -> Path:
    """Write config.json and model.safetensors (atomically: a temporary name, then renamed)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp))
    tmp.replace(directory / WEIGHTS_FILE)
    (directory / (CONFIG_FILE + ".tmp")).write_text(config.to_json())
    (directory / (CONFIG_FILE + ".tmp")).replace(directory / CONFIG_FILE)
    return directory


def no_head_message(what: str) -> str:
    return (
        f"{what}. The eagle method needs a feature-level draft head trained for this target: make one with "
        f"`{TRAIN_COMMAND} --out DIR` ({TRAIN_TIME}) and pass it with --eagle-head DIR "
        f"(LLM(speculative={{'method': 'eagle', 'eagle_head': DIR}}))"
    )


def read_head(directory: str | Path) -> tuple[EagleConfig, dict[str, torch.Tensor]]:
    """The config and weights of a head directory, with clear errors for what is missing or malformed."""
    from safetensors import safe_open

    directory = Path(directory).expanduser()
    config_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_file.exists() or not weights_file.exists():
        raise EagleHeadError(
            no_head_message(f"{directory} is not a draft head directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        )
    try:
        record = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise EagleHeadError(f"{config_file} is not valid JSON ({e})") from None
    found = record.get("format") if isinstance(record, dict) else None
    if found != FORMAT:
        raise EagleHeadError(f"{config_file} is not a draft head config (format {found!r}, expected {FORMAT!r})")
    names = {f.name for f in dataclasses.fields(EagleConfig)}
    missing = [
        f.name
        for f in dataclasses.fields(EagleConfig)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in record
    ]
    if missing:
        raise EagleHeadError(f"{config_file} lacks {', '.join(missing)}")
    config = EagleConfig(**{k: v for k, v in record.items() if k in names})
    with safe_open(str(weights_file), framework="pt") as handle:
        weights = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    expected = set(head_weight_shapes(config, 1))
    lacking = sorted(n for n in expected if n not in weights)
    if lacking:
        raise EagleHeadError(f"{weights_file} lacks {', '.join(lacking)}")
    return config, weights


def head_weight_shapes(config: EagleConfig, head_vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a head and its shape (`head_vocab`: rows of the cut output layer)."""
    hs, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    p = "model.layers.0."
    shapes = {
        "fc.weight": (hs, config.feature_size),
        "norm_embed.weight": (hs,),
        "norm_feature.weight": (hs,),
        "in_proj.weight": (hs, 2 * hs),
        p + "input_layernorm.weight": (hs,),
        p + "self_attn.q_proj.weight": (q, hs),
        p + "self_attn.k_proj.weight": (kv, hs),
        p + "self_attn.v_proj.weight": (kv, hs),
        p + "self_attn.o_proj.weight": (hs, q),
        p + "post_attention_layernorm.weight": (hs,),
        p + "mlp.gate_proj.weight": (inter, hs),
        p + "mlp.up_proj.weight": (inter, hs),
        p + "mlp.down_proj.weight": (hs, inter),
        "model.norm.weight": (hs,),
        HEAD_TOKEN_IDS: (head_vocab,),
    }
    if config.attention_bias:
        shapes.update(
            {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,)}
        )
    return shapes


def check_binding(config: EagleConfig, target, directory) -> None:
    """EagleHeadError unless the head was trained for this target."""
    require_fast_target(target)
    c = target.model.config
    mine = config.target
    if (mine.get("vocab_size"), mine.get("hidden_size"), mine.get("num_layers")) != (
        c.vocab_size,
        c.hidden_size,
        c.num_layers,
    ) or mine.get("fingerprint") not in (target_fingerprint(target), target_fingerprint(target, legacy=True)):
        raise EagleHeadError(
            f"the draft head in {directory} was trained for another target ({mine.get('name')}, fingerprint "
            f"{mine.get('fingerprint')}), not {target.name} (fingerprint {target_fingerprint(target)}); train one "
            f"for this target with `{TRAIN_COMMAND} --target {target.name}`"
        )


def default_head_dir(target) -> Path:
    """Where `specgrove train-eagle` puts the head of `target` (a LoadedModel or a model spec) by default: under
    the cache root, named after the target."""
    import re

    from specgrove.models import defaults

    name = Path(str(getattr(target, "name", target))).name or "target"
    return defaults.cache_root() / "eagle" / re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# ---- run time --------------------------------------------------------------------------------------
class _HeadMatrices:
    """The head's matrices as GGUF blocks, for a one-layer LlamaModel in the gguf format (`matrix(name)`)."""

    def __init__(self, matrices: dict):
        self._matrices = matrices

    def matrix(self, hf_name: str, tied: bool = False):
        return self._matrices[hf_name]


def quantize_q8_0(weight: torch.Tensor):
    """A float matrix [n, k] as Q8_0 blocks (llama.cpp's 8-bit format: 32 values share one fp16 scale)."""
    import gguf.quants

    from specgrove.kernels import ggml
    from specgrove.models.gguf_weights import GGUFMatrix

    n, k = weight.shape
    data = gguf.quants.quantize(weight.detach().float().cpu().numpy(), gguf.GGMLQuantizationType.Q8_0)
    return GGUFMatrix(torch.from_numpy(data.reshape(n, -1).copy()), ggml.Q8_0, n, k)


class EagleHead:
    """A trained head ready to draft for `target` (a LoadedModel): `forward` runs new pairs through it."""

    supports_trees = True
    supports_batching = True

    def __init__(self, config: EagleConfig, weights: dict[str, torch.Tensor], target):
        from specgrove.models.linear import GGUFLinear, Linear
        from specgrove.models.llama import LlamaModel

        require_fast_target(target)
        self.config = config
        self.target = target
        tm = target.model
        weights = dict(weights)
        token_ids = weights.pop(HEAD_TOKEN_IDS).to(torch.int64)
        self.head_vocab = int(token_ids.numel())
        layer_config = dataclasses.replace(
            tm.config,
            num_layers=1,
            intermediate_size=config.intermediate_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            attention_bias=config.attention_bias,
            mlp_bias=False,
        )
        gguf = tm.quantization == "gguf"
        own = {"model.embed_tokens.weight": tm.embed, HEAD_TOKEN_IDS: token_ids}
        own.update({k: v for k, v in weights.items() if k.startswith("model.")})
        rows = output_rows(target, token_ids)
        matrices = None
        if gguf:
            matrices = {k: quantize_q8_0(v) for k, v in own.items() if k.endswith("_proj.weight") and v.dim() == 2}
            matrices["lm_head.weight"] = rows
        else:
            own["lm_head.weight"] = rows
        self.model = LlamaModel(
            layer_config,
            tm.hf_config,
            own,
            tm.dtype,
            tm.device,
            quantization=tm.quantization,
            cuda_graphs=False,
            gguf_weights=None if matrices is None else _HeadMatrices(matrices),
        )

        def linear(name):
            w = weights[name]
            if gguf:
                return GGUFLinear([quantize_q8_0(w)], None)
            return Linear(w.to(tm.device, tm.dtype), None, self.model.packed, tm.quantization)

        self.fc = linear("fc.weight")
        self.in_proj = linear("in_proj.weight")
        self.norm_embed = weights["norm_embed.weight"].to(tm.device, tm.dtype)
        self.norm_feature = weights["norm_feature.weight"].to(tm.device, tm.dtype)
        self.vocab_size = tm.vocab_size
        self.feature_layers = tuple(config.feature_layers)
        self.name = "eagle-head"  # its directory, once loaded from one (load_eagle_head)
        self.device, self.dtype = tm.device, tm.dtype

    def weight_bytes(self) -> int:
        """Bytes one drafting forward reads (fc runs only on the target's features, once per step)."""
        return self.model.weight_bytes() + self.in_proj.nbytes

    def new_cache(self, batch_size: int, max_len: int):
        return self.model.new_cache(batch_size, max_len)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        cache,
        *,
        from_target: bool,
        tree_mask: torch.Tensor | None = None,
        rows: list[int] | None = None,
        logits_at="all",
        num_new: list[int] | None = None,
        extend: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """New pairs through the head: input_ids [B, T] (token t+1 of each pair), inputs [B, T, k*H] the
        target's features of token t (`from_target`) or [B, T, H] the head's own output at the parent pair.
        Cache, masks, rows, num_new, extend and logits_at as `LlamaModel.forward`. Returns (logits over the
        whole vocabulary, -inf outside the cut head; hidden states [B, T, H] to feed the next depth)."""
        inputs = inputs.to(self.model.device, self.model.dtype)
        g = self.fc(inputs) if from_target else inputs
        e = self.model.embed_tokens(input_ids)
        x = self.in_proj(
            torch.cat([self.model.rms_norm(e, self.norm_embed), self.model.rms_norm(g, self.norm_feature)], dim=-1)
        )
        return self.model.forward(
            input_ids,
            positions,
            cache,
            tree_mask=tree_mask,
            rows=rows,
            logits_at=logits_at,
            num_new=num_new,
            extend=extend,
            features=[-1],
            inputs_embeds=x,
        )


_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # target model -> {(directory, mtime): head}


def load_eagle_head(directory: str | Path, target) -> EagleHead:
    """The head in `directory` for `target`, checked against it (EagleHeadError otherwise). Loaded once per target
    and directory (tuning a tree and building the proposer share it), again when its weights file changes."""
    path = Path(directory).expanduser().resolve()
    weights_file = path / WEIGHTS_FILE
    key = (str(path), weights_file.stat().st_mtime_ns if weights_file.exists() else None)
    loaded = _LOADED.setdefault(target.model, {})
    if key not in loaded:
        config, weights = read_head(directory)
        check_binding(config, target, directory)
        head = EagleHead(config, weights, target)
        head.name = str(path)
        loaded.clear()  # one head per target at a time
        loaded[key] = head
    return loaded[key]
