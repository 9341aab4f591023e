"""The llama.cpp peer: the target's own GGUF file decoded plainly by llama.cpp (llama-cpp-python).

An outside reference for the runtime: llama.cpp reads the quantized GGUF weights directly with its own
CPU kernels. It is optional (`pip install llama-cpp-python` builds llama.cpp from source, about 5 minutes
on 2 cores); the benchmark's `llama_cpp` method says so when it is missing. Decoding is greedy or
samples with llama.cpp's own sampler at the same temperature (top-k/top-p/min-p off, no repetition
penalty), stops at the target's EOS tokens, and runs with the same number of CPU threads as torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from specgrove.errors import SpecgroveError
from specgrove.models import defaults

LLAMA_CPP_METHODS = ("llama_cpp",)


def gguf_of(model_dir: str | Path) -> Path:
    """The GGUF file a converted model directory was made from (built-in models and .gguf targets)."""
    marker = Path(model_dir) / defaults.MARKER
    source = json.loads(marker.read_text()).get("gguf") if marker.exists() else None
    if source:
        path = Path(source)
        if not path.is_absolute():
            path = defaults.cache_root() / "gguf" / path
        if path.exists():
            return path
    raise SpecgroveError(
        f"the llama_cpp method needs the target's GGUF file, and {model_dir} records none that exists; "
        "use a built-in model or a .gguf target"
    )


def require_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        raise SpecgroveError(
            "the llama_cpp method needs llama-cpp-python: `pip install llama-cpp-python` (it builds llama.cpp "
            "from source, about 5 minutes on 2 cores), or leave llama_cpp out of --methods"
        ) from e


class LlamaCppPeer:
    """One llama.cpp model; call `close()` (or use `with`) to free it."""

    def __init__(self, gguf_path: str | Path, n_ctx: int, eos_token_ids: list[int], n_threads: int | None = None):
        require_llama_cpp()
        from llama_cpp import Llama

        self.eos_token_ids = set(eos_token_ids)
        self.n_threads = n_threads or torch.get_num_threads()
        kwargs = dict(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=self.n_threads, n_batch=512, verbose=False)
        # On AMX CPUs llama.cpp's extra (repacked) weight buffers crashed in a trial here; keep them off.
        try:
            self.llm = Llama(**kwargs, use_extra_bufts=False)
        except TypeError:  # an older llama-cpp-python without that switch
            self.llm = Llama(**kwargs)

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int | None = None
    ) -> tuple[list[int], float]:
        """Generate for one prompt; returns (new token ids, wall seconds including prefill)."""
        if seed is not None:
            self.llm.set_seed(seed)
        out: list[int] = []
        t0 = time.perf_counter()
        self.llm.reset()  # no KV reuse of a previous prompt's prefix: the engine has no prefix cache either
        for token in self.llm.generate(
            prompt_ids,
            temp=temperature,
            top_k=0 if temperature > 0 else 1,
            top_p=1.0,
            min_p=0.0,
            repeat_penalty=1.0,
            reset=False,
        ):
            out.append(int(token))
            if token in self.eos_token_ids or len(out) >= max_new_tokens:
                break
        return out, time.perf_counter() - t0

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
        self.llm = None

    def __enter__(self) -> LlamaCppPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
