"""The transformers peer: the same converted weights run through `model.generate()`, plain, with
assisted generation (a draft model proposing a fixed k tokens) and with prompt lookup.

It is the reference the benchmark holds specgrove against: same directories, dtype, device, prompts,
stopping tokens and greedy decoding, so both tokens/s and token-for-token identity are comparable.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from specgrove.models.loader import parse_dtype

HF_METHODS = ("hf_plain", "hf_assisted", "hf_prompt_lookup")


def _load(directory: str | Path, dtype: torch.dtype, device: torch.device, eos_token_ids: list[int]):
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the benchmark shows its own progress
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, use_safetensors=True)
    model = model.to(device).eval()
    # A fresh generation config: no sampling defaults shipped with the directory (e.g. repetition_penalty)
    # may change what is generated, and the stopping tokens are exactly the engine's.
    eos = eos_token_ids or None
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=eos[0] if eos else None, bos_token_id=getattr(model.config, "bos_token_id", None)
    )
    return model


class HFPeer:
    """transformers models loaded from the converted directories; call `close()` (or use `with`) to free them."""

    def __init__(
        self,
        target_dir: str | Path,
        draft_dir: str | Path | None = None,
        dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device = "cpu",
        eos_token_ids: list[int] | None = None,
    ):
        self.dtype = parse_dtype(dtype)
        self.device = torch.device(device)
        self.eos_token_ids = sorted(eos_token_ids or [])
        self._sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.target = _load(target_dir, self.dtype, self.device, self.eos_token_ids)
        self.draft = _load(draft_dir, self.dtype, self.device, self.eos_token_ids) if draft_dir is not None else None

    def _configure_assistant(self, num_speculative_tokens: int) -> None:
        # transformers reads these from the *assistant's* generation config. "constant" and a confidence
        # threshold of 0 (= off) make the draft propose exactly k tokens each step, as the engine does.
        config = self.draft.generation_config
        config.num_assistant_tokens = num_speculative_tokens
        config.num_assistant_tokens_schedule = "constant"
        config.assistant_confidence_threshold = 0.0

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        method: str,
        max_new_tokens: int,
        num_speculative_tokens: int = 4,
        temperature: float = 0.0,
        seed: int | None = None,
        prompt_lookup_max: int = 3,
    ) -> tuple[list[int], float]:
        """Generate for one prompt; returns (new token ids, wall seconds including prefill)."""
        kwargs: dict = {"max_new_tokens": max_new_tokens, "min_new_tokens": 0}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False)
        if method == "hf_assisted":
            if self.draft is None:
                raise ValueError("hf_assisted needs a draft model; give HFPeer a draft directory")
            self._configure_assistant(num_speculative_tokens)
            kwargs["assistant_model"] = self.draft
        elif method == "hf_prompt_lookup":
            kwargs.update(prompt_lookup_num_tokens=num_speculative_tokens, max_matching_ngram_size=prompt_lookup_max)
        elif method != "hf_plain":
            raise ValueError(f"unknown transformers method {method!r}; use one of {', '.join(HF_METHODS)}")
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        attention_mask = torch.ones_like(input_ids)
        if seed is not None:
            torch.manual_seed(seed)
        self._sync()
        t0 = time.perf_counter()
        out = self.target.generate(input_ids, attention_mask=attention_mask, **kwargs)
        self._sync()
        seconds = time.perf_counter() - t0
        return out[0, len(prompt_ids) :].tolist(), seconds

    def close(self) -> None:
        self.target = None
        self.draft = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> HFPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
