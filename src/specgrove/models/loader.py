"""Load a model by built-in name, from a local Hugging Face directory, or from a GGUF file.

Llama-family models (Llama, Qwen2, Mistral, SmolLM) get the fast tree-capable runtime; other
transformers causal LMs run chain mode through the transformers fallback. Weights are read from
safetensors only (nothing loads pickles).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specgrove.cpu import cpu_features
from specgrove.errors import IncompatibleModelsError, ModelNotFoundError, SpecgroveError
from specgrove.models import defaults
from specgrove.models.hf_fallback import HFCausalLM
from specgrove.models.linear import QUANTIZATIONS, check_w8a8
from specgrove.models.llama import SUPPORTED_MODEL_TYPES, LlamaConfig, LlamaModel

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def default_dtype(device: str | torch.device | None = "cpu") -> torch.dtype:
    """The fastest correct dtype here: bf16 on a GPU and on CPUs with native bf16 dot products (AVX-512 BF16,
    AMX); float32 elsewhere (on AVX2 bf16 matmuls convert to fp32 and are slower, and oneDNN cannot prepack them)."""
    if resolve_device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_features().fast_bf16 else torch.float32


def parse_dtype(dtype: str | torch.dtype, device: str | torch.device | None = "cpu") -> torch.dtype:
    """A dtype name (or "auto": `default_dtype(device)`) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype.lower() == "auto":
        return default_dtype(device)
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecgroveError("device 'cuda' was asked for but no CUDA device is available; use device='cpu'")
    return device


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: LlamaModel | HFCausalLM
    tokenizer: object | None
    hf_config: object
    dtype: torch.dtype
    device: torch.device
    load_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def is_fast(self) -> bool:
        return isinstance(self.model, LlamaModel)


def _gguf_cache_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return defaults.cache_root() / "models" / f"{gguf_path.stem}-{key}"


def resolve_model_dir(spec: str | os.PathLike, expected_sha256: str | None = None) -> Path:
    """Turn a model spec (built-in name, HF directory, GGUF file) into a local HF directory."""
    text = str(spec)
    if defaults.resolve_builtin(text) is not None:
        return defaults.ensure_builtin(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {text!r} not found: it is neither an existing path nor a built-in name "
            f"({', '.join(defaults.BUILTIN_MODELS)}). Pass a Hugging Face model directory, a .gguf file, "
            f"or a built-in name (`specgrove models list`)."
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf; pass a GGUF file or a model directory")
        if expected_sha256:
            defaults.verify_sha256(path, expected_sha256)
        out = _gguf_cache_dir(path)
        if not (out / defaults.MARKER).exists():
            digest = defaults.sha256_file(path)
            defaults.convert_gguf_to_hf(path, out, {"gguf": str(path.resolve()), "gguf_sha256": digest})
        return out
    if expected_sha256:
        raise SpecgroveError("a checksum can only be checked for a GGUF file, not for a directory")
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"{path} has no config.json; a model directory needs config.json and *.safetensors")
    return path


def read_safetensors(directory: Path, skip=None) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's *.safetensors files, except the names `skip(name)` is true for."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        found = [p.name for p in directory.iterdir()]
        raise ModelNotFoundError(
            f"{directory} holds no *.safetensors weights (found: {', '.join(found) or 'nothing'}). specgrove never "
            f"loads pickled weights; convert them with transformers' save_pretrained(safe_serialization=True)."
        )
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                if skip is None or not skip(name):
                    weights[name] = handle.get_tensor(name)
    return weights


def gguf_source(spec: str | os.PathLike) -> Path | None:
    """The GGUF file a model spec comes from (a built-in name or a .gguf path), None for a directory."""
    text = str(spec)
    if defaults.resolve_builtin(text) is not None:
        return defaults.fetch_gguf(text)
    path = Path(text).expanduser()
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def resolve_quantization(quantization: str | None, spec, device: torch.device, fast: bool):
    """ "auto": the model's own GGUF blocks (`gguf`) where it comes from a GGUF file whose matrix types have a kernel
    and runs on CPU in the fast runtime, else none. An explicit "gguf" that cannot run raises, saying why.
    Returns (the format, the parsed GGUF file when the format is gguf, else None)."""
    if quantization == "none":
        return None, None
    if quantization not in (*QUANTIZATIONS, "auto"):
        raise ValueError(f"unknown quantization {quantization!r}; use auto, none, int8, int4, w8a8 or gguf")
    if quantization not in ("auto", "gguf"):
        return quantization, None
    source = gguf_source(spec)
    reason = weights = None
    if source is None:
        reason = f"{spec} is not a GGUF model (a built-in name or a .gguf file)"
    elif device.type != "cpu":
        reason = "the gguf format runs on CPU"
    elif not fast:
        reason = "the model is not in the Llama family (it runs through the transformers fallback)"
    else:
        from specgrove.kernels import ggml
        from specgrove.models.gguf_weights import GGUFWeights

        weights = GGUFWeights(source)
        unsupported = sorted(
            {ggml.TYPE_NAMES.get(t, str(t)) for t in weights.types().values() if t not in ggml.MATMUL_TYPES}
        )
        if unsupported:
            reason = (
                f"{source.name} holds {', '.join(unsupported)} matrices, which have no kernel here "
                f"(supported: {', '.join(ggml.TYPE_NAMES[t] for t in ggml.MATMUL_TYPES)})"
            )
        else:
            ggml.load_extension()  # built once; a missing compiler raises here with what to install
    if reason is None:
        return "gguf", weights
    if quantization == "gguf":
        raise ValueError(f"quantization='gguf' cannot be used: {reason}; use quantization='none' (dequantized)")
    return None, None


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    has_tokenizer = any(
        (directory / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    )
    if not has_tokenizer:
        return None
    return AutoTokenizer.from_pretrained(str(directory))


def head_vocabulary(tokenizer, vocab_size: int, size: int) -> torch.Tensor:
    """Token ids 0..size-1 plus every special and added token of `tokenizer` (below `vocab_size`), increasing.
    Byte-level BPE vocabularies (Qwen, Llama 3, GPT-2) number their tokens in merge order, so low ids are the
    frequent ones; the special tokens (end of turn, end of text) are kept wherever they sit."""
    if int(size) < 1:
        raise ValueError(f"head_vocab must be a positive number of tokens, got {size}")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids = set(range(min(int(size), vocab_size))) | {int(i) for i in special if 0 <= int(i) < vocab_size}
    return torch.tensor(sorted(ids), dtype=torch.int64)


def load_model(
    spec: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = "cpu",
    expected_sha256: str | None = None,
    force_fallback: bool = False,
    quantization: str | None = "auto",
    cuda_graphs: bool | None = None,
    head_vocab: int | None = None,
) -> LoadedModel:
    """Load a built-in name, HF directory or .gguf file in `dtype` ("auto": the fastest correct one on this
    machine, `default_dtype`; float32 for the gguf format). `quantization`: "auto" (default) runs a model that comes
    from a GGUF file on its own quantized blocks (`gguf`, specgrove.models.gguf_weights) where a kernel exists, else
    dense; None / "none" dense; `"gguf"` insists on the blocks; `"int8"` / `"int4"` stores the
    fast runtime's matrices as weight-only int8 / int4 (see specgrove.models.linear). `cuda_graphs`: replay
    small forwards as CUDA graphs (None: on CUDA; False: always eager; specgrove.models.cuda_graphs).
    `head_vocab`: keep only the first `head_vocab` token ids (and the tokenizer's special and added tokens) in the
    output layer, `head_vocabulary`; every other token gets logit -inf, probability 0. Meant for drafts: their
    output layer is a large part of their step, and speculation stays exact whatever the draft proposes."""
    from transformers import AutoConfig

    t0 = time.perf_counter()
    torch_device = resolve_device(device)
    if quantization == "w8a8":
        check_w8a8(torch_device)  # before reading any weights: refused where fbgemm would be wrong
    directory = resolve_model_dir(spec, expected_sha256)
    hf_config = AutoConfig.from_pretrained(str(directory))
    fast = hf_config.model_type in SUPPORTED_MODEL_TYPES and not force_fallback
    quantization, gguf_weights = resolve_quantization(quantization, spec, torch_device, fast)
    # The gguf kernels compute in fp32: other dtypes would only round their inputs and outputs.
    torch_dtype = parse_dtype("float32" if quantization == "gguf" and dtype == "auto" else dtype, torch_device)
    if fast:
        if quantization == "gguf":
            from specgrove.models.gguf_weights import gguf_name

            weights = read_safetensors(directory, skip=lambda name: gguf_name(name) is not None)
        else:
            weights = read_safetensors(directory)
        head_tokens = None
        if head_vocab is not None:
            head_tokens = head_vocabulary(load_tokenizer(directory), hf_config.vocab_size, head_vocab)
        model = LlamaModel(
            LlamaConfig.from_hf(hf_config),
            hf_config,
            weights,
            torch_dtype,
            torch_device,
            quantization=quantization,
            cuda_graphs=cuda_graphs,
            gguf_weights=gguf_weights,
            head_tokens=head_tokens,
        )
    else:
        if head_vocab is not None:
            raise ValueError(
                f"head_vocab needs a Llama-family model (fast runtime); {hf_config.model_type!r} runs "
                "through the transformers fallback"
            )
        if quantization is not None:
            raise ValueError(
                f"quantization={quantization!r} needs a Llama-family model (fast runtime); "
                f"{hf_config.model_type!r} runs through the transformers fallback"
            )
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch_dtype, use_safetensors=True)
        model = HFCausalLM(hf_model.to(torch_device), torch_dtype, torch_device)
    tokenizer = load_tokenizer(directory)
    info = {}
    marker = directory / defaults.MARKER
    if marker.exists():
        info = json.loads(marker.read_text())
    return LoadedModel(
        name=str(spec),
        path=directory,
        model=model,
        tokenizer=tokenizer,
        hf_config=hf_config,
        dtype=torch_dtype,
        device=torch_device,
        load_seconds=time.perf_counter() - t0,
        info=info,
    )


def check_compatible(target: LoadedModel, draft: LoadedModel) -> None:
    """A draft must share the target's vocabulary: same size and, where both have tokenizers, same tokens."""
    if target.vocab_size != draft.vocab_size:
        raise IncompatibleModelsError(
            f"the draft's vocabulary ({draft.vocab_size} tokens, {draft.name}) differs from the target's "
            f"({target.vocab_size} tokens, {target.name}); speculative decoding needs a draft with the same tokenizer. "
            f"Use a draft from the target's model family, or method='prompt_lookup'."
        )
    if target.tokenizer is not None and draft.tokenizer is not None:
        if target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
            raise IncompatibleModelsError(
                f"the draft's tokenizer ({draft.name}) maps tokens differently from the target's ({target.name}); "
                f"speculative decoding needs identical vocabularies."
            )
