"""Distillation data for sorted fine-tuning: the target models' own continuations of a set of prompts.

A draft is useful exactly where it predicts what the target will say, so SoFT (specgrove.train.soft)
trains on text the targets generated themselves (sequence-level knowledge distillation, as in S2D and
DistillSpec), not on a fixed corpus. This module makes that text:

  prompts      token-id lists: Spec-Bench questions 21.. through the target's chat template
               (`spec_bench_prompts`, the same prompts `specgrove tune` uses, disjoint from the benchmark's
               first 20), or a JSONL file of {"prompt": text} (raw text, no template), {"turns": [...]}
               (the first turn, chat-templated) or {"prompt_ids": [...]} lines (`read_prompt_records`,
               `encode_prompt_records`);
  generation   `batched_generate`: several prompts share one KV cache of the fast runtime; each row is
               prefilled on its own (chunked, as the engine does), then all live rows decode together, one
               token per row per forward. A row stops at the target's EOS token (kept in the output, so
               the draft learns to stop) or at max_new_tokens, and its cache row is refilled with the next
               prompt at once (continuous batching). Greedy by default; with a temperature each prompt
               draws from its own generator seeded with seed + prompt index, so the output does not depend
               on the batch size or on which prompts were already done;
  samples      `distill` appends one JSON line per finished prompt to a file,
               {"target": name, "prompt_ids": [...], "output_ids": [...], ...}; running it again skips
               the (target, prompt) pairs the file already holds, so an interrupted data phase resumes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specgrove.errors import SpecgroveError
from specgrove.models.kv_cache import PREFILL_CHUNK

SPEC_BENCH = "spec-bench"


@dataclass
class Sample:
    """One target continuation: the training text of SoFT (loss on output_ids only)."""

    target: str
    prompt_ids: list[int]
    output_ids: list[int]
    meta: dict = field(default_factory=dict)  # finish reason, sampling settings, prompt index

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        return self.target, tuple(self.prompt_ids)

    def to_json(self) -> str:
        return json.dumps(
            {"target": self.target, "prompt_ids": self.prompt_ids, "output_ids": self.output_ids, **self.meta}
        )


# ---- prompts ---------------------------------------------------------------------------------------
def spec_bench_prompts(target, num_prompts: int | None, data: str | os.PathLike | None = None) -> list[list[int]]:
    """Spec-Bench questions 21.. (disjoint from the benchmark's first 20), chat-templated for `target`
    (a LoadedModel): `specgrove.tuning.tune_prompts`. None = every question past the first 20."""
    from specgrove.tuning import TUNE_PROMPT_OFFSET, tune_prompts

    if num_prompts is None:
        from specgrove.bench.questions import find_spec_bench, load_questions

        num_prompts = max(0, len(load_questions(find_spec_bench(data), None)) - TUNE_PROMPT_OFFSET)
    return tune_prompts(target, num_prompts, data)


def is_spec_bench_file(path: str | os.PathLike) -> bool:
    """Whether `path` is the shared Spec-Bench question file (then its first 20 questions are held out)."""
    from specgrove.bench.questions import find_spec_bench

    try:
        return Path(path).resolve().samefile(find_spec_bench())
    except (SpecgroveError, OSError):
        return False


def _read_jsonl(path: str | os.PathLike) -> list[dict]:
    """JSON lines of a file; a last line cut off mid-write (an interrupted run) is ignored."""
    path = Path(path)
    if not path.is_file():
        raise SpecgroveError(f"data file {path} does not exist; pass a JSONL file of prompts or '{SPEC_BENCH}'")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if line_no == len(lines):
                break
            raise SpecgroveError(f"{path}:{line_no} is not JSON ({e})") from None
        if not isinstance(record, dict):
            raise SpecgroveError(f"{path}:{line_no} is not a JSON object")
        records.append(record)
    return records


def is_sample_file(path: str | os.PathLike) -> bool:
    """Whether a JSONL file holds distillation samples (lines with prompt_ids and output_ids)."""
    records = _read_jsonl(path)
    return bool(records) and all("prompt_ids" in r and "output_ids" in r for r in records)


def read_prompt_records(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Prompt lines of a JSONL file, in file order: {"prompt": text}, {"turns": [text, ...]} or
    {"prompt_ids": [ids]}. The first `limit` are kept."""
    records = _read_jsonl(path)
    for i, r in enumerate(records, 1):
        ok = (
            isinstance(r.get("prompt"), str)
            or (isinstance(r.get("turns"), list) and r["turns"] and isinstance(r["turns"][0], str))
            or (isinstance(r.get("prompt_ids"), list) and all(isinstance(t, int) for t in r["prompt_ids"]))
        )
        if not ok:
            raise SpecgroveError(
                f'{path}: record {i} is not a prompt; expected {{"prompt": "text"}}, '
                f'{{"turns": ["text", ...]}} (Spec-Bench) or {{"prompt_ids": [1, 2, 3]}}'
            )
    return records if limit is None else records[:limit]


def encode_prompt_records(records: Sequence[dict], tokenizer) -> list[list[int]]:
    """Token ids of prompt records: "prompt" raw (no template), "turns" through the chat template
    (specgrove.bench.spec_bench.encode_questions), "prompt_ids" as given."""
    from specgrove.bench.questions import encode_questions

    out = []
    for r in records:
        if "prompt_ids" in r:
            out.append([int(t) for t in r["prompt_ids"]])
        elif "prompt" in r:
            if tokenizer is None:
                raise SpecgroveError(
                    'text prompts need a tokenizer and this target has none; give {"prompt_ids": [...]}'
                )
            out.append(list(tokenizer.encode(r["prompt"], add_special_tokens=False)))
        else:
            out.append(encode_questions([{"category": "custom", **r}], tokenizer)[0].token_ids)
    return out


def eos_ids_of(hf_config, tokenizer) -> set[int]:
    """A model's EOS ids as the engine stops at them (specgrove.engine.engine.eos_token_ids), from its
    config and tokenizer alone (no weights loaded)."""
    from types import SimpleNamespace

    from specgrove.engine.engine import eos_token_ids

    return eos_token_ids(SimpleNamespace(hf_config=hf_config, model=None, tokenizer=tokenizer))


# ---- generation ------------------------------------------------------------------------------------
def _checked_prompts(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """The prompts as lists of ints, once the model, the limits and every prompt are checked."""
    from specgrove.models.llama import LlamaModel

    if not isinstance(model, LlamaModel):
        raise SpecgroveError("batched generation needs a Llama-family model on the fast runtime")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"the generation batch must be >= 1, got {batch_size}")
    prompts = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if min(p) < 0 or max(p) >= model.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside the model's vocabulary [0, {model.vocab_size})")
    return prompts


def batched_generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: Iterable[int] = (),
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    on_done: Callable[[int, list[int], str], None] | None = None,
    features: Sequence[int] | None = None,
    on_features: Callable[[int, torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Continue every prompt with `model` (a fast-runtime LlamaModel), `batch_size` rows of one KV cache
    decoding together; returns the outputs in prompt order (each ends with its EOS token, if any).

    Greedy = the argmax, first index on ties (as the engine). With a temperature > 0, prompt i samples
    with its own generator seeded with seeds[i] (default seed + i). `on_done(i, output, reason)` is called
    as each prompt finishes (reason "stop" at EOS, "length" at max_new_tokens), in completion order.

    `features` (target layer indices, `LlamaModel.forward(features=...)`): just before `on_done`,
    `on_features(i, feats)` gets the hidden states of every token the model ran, prompt and output but the last
    output token, [len(prompt) + len(output) - 1, H * len(features)] in bfloat16, from the same forwards."""
    from specgrove.sampling import SamplingParams, process_logits

    prompts = _checked_prompts(model, prompts, max_new_tokens, batch_size)
    outputs: list[list[int]] = [[] for _ in prompts]
    if not prompts:
        return outputs
    eos = set(int(t) for t in eos_ids)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
    seeds = [seed + i for i in range(len(prompts))] if seeds is None else list(seeds)
    rows = min(batch_size, len(prompts))
    cache = model.new_cache(rows, max(len(p) for p in prompts) + max_new_tokens)
    device = model.device

    slot_prompt: list[int | None] = [None] * rows  # which prompt each cache row holds
    generators: list[torch.Generator | None] = [None] * rows
    feature_chunks: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    queue = iter(range(len(prompts)))

    def forward(ids, positions, rows_, logits_at):
        """The model's logits, keeping each row's features when they are asked for."""
        out = model.forward(ids, positions, cache, rows=rows_, logits_at=logits_at, features=features)
        if features is None:
            return out
        logits, feats = out
        for b, slot in enumerate(rows_):
            feature_chunks[slot].append(feats[b].to(torch.bfloat16))
        return logits

    def choose(slot: int, logits: torch.Tensor) -> int:
        if params.greedy:
            return int(logits.argmax(-1))
        probs = process_logits(logits, params)
        return int(torch.multinomial(probs.cpu(), 1, generator=generators[slot]))

    def take(slot: int, token: int) -> bool:
        """Append a token to the row's output; True when the row is finished (and then reported)."""
        i = slot_prompt[slot]
        outputs[i].append(token)
        reason = "stop" if token in eos else "length" if len(outputs[i]) >= max_new_tokens else None
        if reason is not None:
            if features is not None:
                feats = torch.cat(feature_chunks[slot])
                feature_chunks[slot] = []
                if on_features is not None:
                    on_features(i, feats)
            if on_done is not None:
                on_done(i, outputs[i], reason)
            slot_prompt[slot] = None
            return True
        return False

    def fill(slot: int) -> None:
        """Prefill the next prompts into a free row until one needs decoding (or none is left)."""
        for i in queue:
            slot_prompt[slot] = i
            generators[slot] = torch.Generator().manual_seed(int(seeds[i]))
            cache.reset(slot)
            p = prompts[i]
            logits = None
            for start in range(0, len(p), PREFILL_CHUNK):
                chunk = p[start : start + PREFILL_CHUNK]
                last = start + PREFILL_CHUNK >= len(p)
                logits = forward(
                    torch.tensor([chunk], device=device),
                    torch.arange(start, start + len(chunk), device=device)[None],
                    [slot],
                    "last" if last else None,
                )
                cache.commit(slot)
            if not take(slot, choose(slot, logits[0, -1])):
                return

    for slot in range(rows):
        fill(slot)
    while True:
        live = [s for s in range(rows) if slot_prompt[s] is not None]
        if not live:
            break
        ids = torch.tensor([[outputs[slot_prompt[s]][-1]] for s in live], device=device)
        positions = torch.tensor([[cache.lengths[s]] for s in live], device=device)
        logits = forward(ids, positions, live, "last")
        for b, s in enumerate(live):
            cache.commit(s)
            if take(s, choose(s, logits[b, 0])):
                fill(s)
    return outputs


# ---- samples on disk -------------------------------------------------------------------------------
def read_samples(path: str | os.PathLike) -> list[Sample]:
    """Every sample of a JSONL file (a last line cut off by an interruption is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    samples = []
    for i, r in enumerate(_read_jsonl(path), 1):
        if not (isinstance(r.get("prompt_ids"), list) and isinstance(r.get("output_ids"), list)):
            raise SpecgroveError(f"{path}: record {i} is not a distillation sample (needs prompt_ids and output_ids)")
        meta = {k: v for k, v in r.items() if k not in ("target", "prompt_ids", "output_ids")}
        samples.append(
            Sample(str(r.get("target", "")), [int(t) for t in r["prompt_ids"]], [int(t) for t in r["output_ids"]], meta)
        )
    return samples


def _open_for_append(path: Path):
    """Open a JSONL file for appending, first dropping a last line cut off mid-write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def distill(
    target,
    prompts: Sequence[Sequence[int]],
    path: str | os.PathLike,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    name: str | None = None,
    eos_ids: Iterable[int] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    features: Sequence[int] | None = None,
    on_features: Callable[[Sample, torch.Tensor], None] | None = None,
) -> list[Sample]:
    """The target's continuation of each prompt, appended to the JSONL file `path` as it finishes;
    pairs (target name, prompt) already in the file are not generated again. Returns this target's
    samples in prompt order (a repeated prompt counts once). `features`: `on_features(sample, feats)` gets the
    target's features of each new sample (as `batched_generate` gives them) before its line is written.

    target: a LoadedModel, or a function returning one, called only when a prompt is left to generate
    (then `name` and `eos_ids` must be given). eos_ids default: the engine's (specgrove.engine.engine)."""
    from tqdm.auto import tqdm

    from specgrove.engine.engine import eos_token_ids

    if callable(target) and (name is None or eos_ids is None):
        raise ValueError("a lazily loaded target needs its name and EOS ids")
    name = name or str(target.name)
    path = Path(path)
    unique = list(dict.fromkeys(tuple(int(t) for t in p) for p in prompts))
    done = {s.key: s for s in read_samples(path) if s.target == name}
    todo = [i for i, p in enumerate(unique) if (name, p) not in done]
    say = log or (lambda m: print(f"[specgrove] {m}", file=sys.stderr, flush=True))
    wanted = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    reused = [done[(name, p)] for p in unique if (name, p) in done]
    differ = [s for s in reused if any(k in s.meta and s.meta[k] != v for k, v in wanted.items())]
    if differ:
        say(
            f"warning: {len(differ)} samples of {name} in {path} were made with other settings "
            f"({ {k: differ[0].meta.get(k) for k in wanted} } instead of {wanted}); they are reused as they are; "
            f"delete {path} (or pass another samples file) to generate them again"
        )
    if len(todo) < len(unique):
        say(f"{name}: {len(unique) - len(todo)} of {len(unique)} prompts already in {path}, generating {len(todo)}")
    if todo:
        if callable(target):
            target = target()
        eos = sorted(eos_token_ids(target) if eos_ids is None else set(int(t) for t in eos_ids))
        meta_common = dict(wanted)
        t0 = time.perf_counter()
        tokens = 0
        with (
            _open_for_append(path) as f,
            tqdm(
                total=len(todo),
                desc=f"distill {Path(name).name}",
                unit="prompt",
                disable=not progress,
                file=sys.stderr,
                dynamic_ncols=True,
            ) as bar,
        ):

            def on_done(j: int, output: list[int], reason: str) -> None:
                nonlocal tokens
                index = todo[j]
                meta = {**meta_common, "finish": reason, "prompt_index": index}
                if temperature > 0:
                    meta["seed"] = seed + index
                sample = Sample(name, list(unique[index]), list(output), meta)
                if on_features is not None:
                    on_features(sample, pending_features.pop(j))
                f.write(sample.to_json() + "\n")
                f.flush()
                done[sample.key] = sample
                tokens += len(output)
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
                bar.update()

            pending_features: dict[int, torch.Tensor] = {}
            batched_generate(
                target.model,
                [unique[i] for i in todo],
                max_new_tokens,
                eos,
                batch_size,
                temperature,
                top_p,
                seeds=[seed + i for i in todo],
                on_done=on_done,
                features=features,
                on_features=None if on_features is None else pending_features.__setitem__,
            )
    return [done[(name, p)] for p in unique]
