"""Sorted (nested) draft models, S2D (Kavehzadeh et al. 2024): one draft whose first-l-layer sub-models
each predict the next token through the shared final norm and output layer.

On disk a sorted draft is an ordinary Hugging Face directory (config.json with num_hidden_layers = the
deepest exit, safetensors, tokenizer files) plus `sorted.json`:

    {"format": "specgrove-sorted/1", "exits": [2, 4, 6, 8], "thresholds": [0.6, 0.6, 0.6, 0.0],
     "target_thresholds": {"<target name>": [0.5, 0.6, 0.7, 0.0]}, "source": "...", "head_tokens": 32768 | null,
     ...}

`exits` are layer counts (sub-model l = layers 1..l + norm + head), increasing, the last one the model's
depth. `thresholds[i]` is the confidence (largest softmax probability of exit i at temperature 1) at which
adaptive drafting stops at exit i; the last exit always emits. `target_thresholds` (optional, written by
`calibrate-sorted --write` from samples of several targets) holds thresholds measured for each target, used
when the draft serves that target. With `head_tokens` the output layer holds
only those rows (`lm_head.weight` [N, H]) and `lm_head.token_ids` [N] names the vocabulary id of each row:
the draft's q is 0 on every other token, which keeps verification exact (q is still what is sampled from).

Any Llama-family directory without sorted.json loads as a sorted draft with one exit (its depth).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SORTED_FILE = "sorted.json"
FORMAT = "specgrove-sorted/1"
HEAD_TOKEN_IDS = "lm_head.token_ids"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass
class SortedSpec:
    exits: list[int]
    thresholds: list[float]
    source: str | None = None
    head_tokens: int | None = None
    extra: dict = field(default_factory=dict)  # provenance: training settings, data, ...
    # thresholds measured for one target (by its model name): one draft agrees with each target differently
    target_thresholds: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self):
        self.exits = [int(e) for e in self.exits]
        if not self.exits or any(e < 1 for e in self.exits) or any(b <= a for a, b in zip(self.exits, self.exits[1:])):
            raise ValueError(f"exits must be increasing layer counts >= 1, got {self.exits}")
        if self.thresholds is None or len(self.thresholds) == 0:
            self.thresholds = default_thresholds(self.exits)
        self.thresholds = [float(t) for t in self.thresholds]
        if len(self.thresholds) != len(self.exits):
            raise ValueError(f"one threshold per exit: {len(self.exits)} exits, {len(self.thresholds)} thresholds")
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds are probabilities in [0, 1], got {self.thresholds}")
        self.target_thresholds = {str(k): [float(t) for t in v] for k, v in (self.target_thresholds or {}).items()}
        for target, values in self.target_thresholds.items():
            if len(values) != len(self.exits) or any(not 0.0 <= t <= 1.0 for t in values):
                raise ValueError(f"target {target!r}: one threshold in [0, 1] per exit {self.exits}, got {values}")

    def thresholds_for(self, target: str | None) -> list[float]:
        """The thresholds measured for this target, else the draft's."""
        return list(self.target_thresholds.get(target, self.thresholds)) if target else list(self.thresholds)

    @property
    def depth(self) -> int:
        return self.exits[-1]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SORTED_FILE
        data = {"format": FORMAT, **asdict(self)}
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> SortedSpec | None:
        path = Path(directory) / SORTED_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file")
        return cls(**data)


# Measured thresholds are written by `specgrove calibrate-sorted` (see docs/methods.md, "Sorted drafts (S2D)");
# before that every exit but the last stops only when it is very sure.
DEFAULT_THRESHOLD = 0.8


def default_thresholds(exits: Sequence[int]) -> list[float]:
    return [DEFAULT_THRESHOLD] * (len(exits) - 1) + [0.0]


def parse_exits(text: str | Sequence[int]) -> list[int]:
    if isinstance(text, str):
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"exits must be comma-separated layer counts like 2,4,6,8, got {text!r}") from None
    return [int(x) for x in text]


def truncated_weights(
    weights: dict[str, torch.Tensor], depth: int, head_token_ids: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The first `depth` layers, embedding, final norm and output layer of a Llama-family state dict (the
    output layer cut to the rows `head_token_ids` when given)."""
    out = {}
    for name, tensor in weights.items():
        if name.startswith("model.layers."):
            if int(name.split(".")[2]) < depth:
                out[name] = tensor
        elif name != HEAD_TOKEN_IDS:
            out[name] = tensor
    if "lm_head.weight" not in out:  # tied embeddings: the head is the embedding
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    if head_token_ids is not None:
        ids = torch.as_tensor(head_token_ids, dtype=torch.int64)
        if ids.dim() != 1 or len(ids) == 0 or len(set(ids.tolist())) != len(ids):
            raise ValueError("head token ids must be a non-empty list of distinct vocabulary ids")
        out["lm_head.weight"] = out["lm_head.weight"][ids].clone()
        out[HEAD_TOKEN_IDS] = ids
    return {k: v.contiguous() for k, v in out.items()}


def write_sorted(
    out: str | Path,
    config,
    weights: dict[str, torch.Tensor],
    spec: SortedSpec,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Write a sorted draft directory: config (depth = the last exit, untied head), safetensors, sorted.json,
    and the tokenizer files of `tokenizer_from`."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config.__class__.from_dict(config.to_dict())
    config.num_hidden_layers = spec.depth
    config.tie_word_embeddings = False
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("layer_types", "max_window_layers"):  # per-layer lists follow the depth
        value = getattr(config, attr, None)
        if isinstance(value, list):
            setattr(config, attr, value[: spec.depth])
    config.save_pretrained(str(out))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    spec.save(out)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_from) / name
            if src.exists():
                shutil.copy2(src, out / name)
    return out


def build_sorted(
    init: str | Path,
    exits: Sequence[int],
    out: str | Path,
    thresholds: Sequence[float] | None = None,
    head_token_ids: Sequence[int] | torch.Tensor | None = None,
    extra: dict | None = None,
) -> Path:
    """Make a sorted draft by truncating a Llama-family model (built-in name, HF directory or GGUF) to its
    first max(exits) layers (no training: `specgrove train-sorted` fine-tunes it)."""
    from transformers import AutoConfig

    from specgrove.models.llama import SUPPORTED_MODEL_TYPES
    from specgrove.models.loader import read_safetensors, resolve_model_dir

    exits = parse_exits(exits)
    source = resolve_model_dir(init)
    config = AutoConfig.from_pretrained(str(source))
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"a sorted draft needs a Llama-family model; {init} is {config.model_type!r}")
    if exits[-1] > config.num_hidden_layers:
        raise ValueError(f"exit {exits[-1]} is deeper than {init}'s {config.num_hidden_layers} layers")
    ids = (
        None
        if head_token_ids is None
        else torch.as_tensor(list(head_token_ids) if not isinstance(head_token_ids, torch.Tensor) else head_token_ids)
    )
    weights = truncated_weights(read_safetensors(source), exits[-1], ids)
    spec = SortedSpec(
        exits,
        list(thresholds) if thresholds else [],
        source=str(init),
        head_tokens=None if ids is None else len(ids),
        extra=dict(extra or {}),
    )
    return write_sorted(out, config, weights, spec, tokenizer_from=source)
