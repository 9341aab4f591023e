"""The public Python API, in vLLM's shape: LLM(...).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field

import torch

from specgrove.config import SpeculativeConfig, uses_draft
from specgrove.drafting.factory import build_proposer
from specgrove.engine.engine import SpecEngine
from specgrove.engine.metrics import SpecMetrics
from specgrove.engine.scheduler import Scheduler
from specgrove.errors import IncompatibleModelsError  # noqa: F401 (the API re-exports it)
from specgrove.models import defaults
from specgrove.models.loader import LoadedModel, check_compatible, load_model  # noqa: F401 (check_compatible: API)
from specgrove.sampling import SamplingParams, choice_params
from specgrove.tuning import resolve_shape


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    # with SamplingParams(logprobs=k): per token, the target's raw log-probabilities (engine.sequence.TokenLogprob)
    logprobs: list | None = None


@dataclass
class RequestOutput:
    """One prompt's result: `outputs` holds its `SamplingParams.n` choices, index 0..n-1. `metrics`: the choice's
    own with n = 1; with n > 1 the choices' counts summed (`SpecMetrics.merge`) and `total_time_s` the request's,
    arrival to the last choice's finish."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    metrics: SpecMetrics = field(default_factory=SpecMetrics)
    finished: bool = True

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids


class LLM:
    """A target model with an optional speculative method.

    LLM(target="qwen2.5-coder-1.5b-instruct", draft="qwen2.5-coder-0.5b-instruct",
        speculative={"method": "draft_model", "num_speculative_tokens": 4})
    `target` / `draft`: a built-in name, a Hugging Face directory, or a .gguf file.
    `quantization` / `draft_quantization`: "auto" (default: a model from a GGUF file, e.g. a built-in one, runs on
    its own quantized blocks, "gguf", where a kernel exists; others dense), "gguf", None (dense), "int8" or "int4"
    (weight-only) or "w8a8" (int8 weights and activations, CPUs with AVX-512 VNNI; specgrove.models.linear).
    Speculation stays exact with respect to the target as loaded, so a quantized draft never changes the output,
    a quantized target does.
    `draft_vocab`: the draft's output layer keeps only token ids below it and the special tokens
    (`load_model`'s `head_vocab`): cheaper draft steps, the same output.
    `max_num_seqs`: requests decoded together by `generate` (continuous batching; each holds a KV cache
    row of max_model_len positions); 1 decodes one prompt after the other.
    `max_num_batched_tokens`: chunked prefill, at most that many prompt tokens prefilled per scheduler step over
    all requests (`engine.scheduler.Scheduler`; the server's `--max-num-batched-tokens`); None (default): whole
    prompts. Outputs do not depend on it.
    `enforce_eager`: never replay CUDA graphs (on a GPU they are on by default for forwards of up to 32 new
    tokens; see specgrove.models.cuda_graphs). No effect on CPU.
    """

    def __init__(
        self,
        target: str | os.PathLike = defaults.DEFAULT_TARGET,
        draft: str | os.PathLike | None = None,
        speculative: dict | SpeculativeConfig | None = None,
        dtype: str | torch.dtype = "auto",
        draft_dtype: str | torch.dtype | None = None,
        device: str | None = "cpu",
        max_model_len: int = 4096,
        target_sha256: str | None = None,
        draft_sha256: str | None = None,
        num_threads: int | None = None,
        quantization: str | None = "auto",
        draft_quantization: str | None = "auto",
        draft_vocab: int | None = None,
        max_num_seqs: int | None = 8,
        enforce_eager: bool = False,
        max_num_batched_tokens: int | None = None,
    ):
        if max_num_batched_tokens is not None and (
            not isinstance(max_num_batched_tokens, int)
            or isinstance(max_num_batched_tokens, bool)
            or max_num_batched_tokens < 1
        ):
            raise ValueError(
                "max_num_batched_tokens must be an integer >= 1 (prompt tokens prefilled per step), or None for "
                f"whole prompts; got {max_num_batched_tokens!r}"
            )
        self.max_num_batched_tokens = max_num_batched_tokens
        self.speculative = SpeculativeConfig.from_any(speculative)
        if num_threads:
            torch.set_num_threads(num_threads)
        if uses_draft(self.speculative) and draft is None:
            if str(target) != defaults.DEFAULT_TARGET:
                raise ValueError(
                    f"method {self.speculative.method!r} needs a draft model: pass draft=<name, directory or .gguf>"
                )
            draft = defaults.DEFAULT_DRAFT
        graphs = False if enforce_eager else None
        self.target = load_model(
            target,
            dtype=dtype,
            device=device,
            expected_sha256=target_sha256,
            quantization=quantization,
            cuda_graphs=graphs,
        )
        self.draft: LoadedModel | None = None
        if uses_draft(self.speculative):
            if isinstance(draft, LoadedModel):  # one loaded draft serving several targets (S2D)
                self.draft = draft
            else:
                self.draft = load_model(
                    draft,
                    dtype=draft_dtype or dtype,
                    device=device,
                    expected_sha256=draft_sha256,
                    quantization=draft_quantization,
                    cuda_graphs=graphs,
                    head_vocab=draft_vocab,
                )
            check_compatible(self.target, self.draft)
        shape = resolve_shape(self.speculative, self.target, self.draft)
        proposer, num_draft = build_proposer(self.speculative, self.target, self.draft, max_model_len, shape=shape)
        if self.speculative.tree is not None:
            self.speculative.num_speculative_tokens = num_draft
        if max_num_seqs is not None and (not isinstance(max_num_seqs, int) or max_num_seqs < 1):
            raise ValueError(f"max_num_seqs must be an integer >= 1, got {max_num_seqs!r}")
        self.max_num_seqs = max_num_seqs or 1
        self.engine = SpecEngine(self.target, proposer, num_draft, max_model_len, max_num_seqs=self.max_num_seqs)

    @property
    def tokenizer(self):
        return self.target.tokenizer

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this target model has no tokenizer; pass prompts as lists of token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=False) or self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)):
            raise TypeError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        return [int(t) for t in prompt]

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this target model has no chat template; pass a plain prompt instead")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(
        self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list of prompts (strings or lists of token ids): one RequestOutput per
        prompt, holding its `n` choices."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)
        )
        prompt_list = [prompts] if single else list(prompts)
        params_list = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params or SamplingParams()] * len(prompt_list)
        )
        if len(params_list) != len(prompt_list):
            raise ValueError("give one SamplingParams, or one per prompt")
        requests = [
            (p if isinstance(p, str) else None, self.encode(p), params) for p, params in zip(prompt_list, params_list)
        ]
        return self._generate(requests, use_tqdm)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """Generate the assistant's reply to one conversation (list of {'role', 'content'} dicts)."""
        requests = [(None, self.apply_chat_template(messages), sampling_params or SamplingParams())]
        return self._generate(requests, use_tqdm=False)[0]

    def _generate(self, requests: list[tuple[str | None, list[int], SamplingParams]], use_tqdm: bool):
        """(prompt text, prompt ids, params) per request -> a RequestOutput each. A request of n choices is n
        sequences (`sampling.choice_params`, seeded as the server seeds them, so choice i is the server's choice
        i), decoded with the others by continuous batching."""
        choices = []  # per request: its sequences, choice 0 first
        for _, prompt_ids, params in requests:
            base = uuid.uuid4().hex
            per_choice = choice_params(params)
            ids = [None] if len(per_choice) == 1 else [f"{base}-{i}" for i in range(len(per_choice))]
            choices.append([self.engine.new_sequence(prompt_ids, p, request_id=rid) for p, rid in zip(per_choice, ids)])
        seqs = [seq for group in choices for seq in group]
        request_of = {id(seq): r for r, group in enumerate(choices) for seq in group}
        # Continuous batching: up to max_num_seqs sequences share each step; the queue holds the rest.
        scheduler = Scheduler(
            self.engine,
            max_num_seqs=self.max_num_seqs,
            max_waiting=len(seqs),
            max_num_batched_tokens=self.max_num_batched_tokens,
        )
        for seq in seqs:
            scheduler.add(seq)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(seqs), desc="generate")
        try:
            while scheduler.has_unfinished:
                for out in scheduler.step():
                    if out.finished:
                        if out.seq.finish_reason == "error":
                            raise RuntimeError(
                                f"generation failed for prompt {request_of[id(out.seq)]}: {out.seq.error}"
                            )
                        out.seq.metrics.total_time_s = time.perf_counter() - out.times.arrival
                        if bar is not None:
                            bar.update(1)
        finally:
            for seq in scheduler.running + scheduler.prefilling:
                self.engine.finish(seq)
            if bar is not None:
                bar.close()
        return [self._output(prompt, group) for (prompt, _, _), group in zip(requests, choices)]

    @staticmethod
    def _output(prompt: str | None, seqs: list) -> RequestOutput:
        first = seqs[0]
        metrics = first.metrics
        if len(seqs) > 1:
            for seq in seqs[1:]:
                metrics = metrics.merge(seq.metrics)
            metrics.total_time_s = max(seq.metrics.total_time_s for seq in seqs)  # they ran side by side
        outputs = [
            CompletionOutput(i, seq.text, list(seq.output_ids), seq.finish_reason, seq.stop_reason, seq.logprobs)
            for i, seq in enumerate(seqs)
        ]
        request_id = first.request_id if len(seqs) == 1 else first.request_id.rpartition("-")[0]
        return RequestOutput(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=first.prompt_ids,
            outputs=outputs,
            metrics=metrics,
        )
