"""Teacher distributions for KL distillation: each target's top-K next-token log-probabilities over its
own continuation, for SoFT's soft-label loss (specgrove.train.soft, `--kl-weight`).

A distillation sample holds only the tokens the target chose; its distribution at each of those steps
carries much more (DistillSpec: a draft aligned to the target's distribution is accepted more often than
one fitted to its argmax). The distribution is recomputed by teacher forcing: one forward of the target
over prompt + continuation (chunked, as the engine prefills), keeping at every continuation position the
K most likely next tokens and their log-probabilities at temperature 1 (log-softmax over the whole
vocabulary). Those are the target's own distributions while it generated the text, up to the rounding
difference between a one-token and a many-token forward.

On disk: a JSONL file, one line per sample,
    {"key": <sample digest>, "target": name, "k": K, "ids": [[K ids] per continuation token],
     "logprobs": [[K values] per continuation token]}
keyed by a digest of (target, prompt, continuation), appended as each sample is done: an interrupted pass
resumes, and a samples file that changes only gains the lines it lacks.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from specgrove.errors import SpecgroveError
from specgrove.train.data import PREFILL_CHUNK, Sample, _open_for_append, _read_jsonl

DEFAULT_TOP_K = 16


def sample_key(sample: Sample) -> str:
    """A digest naming a sample: its target, prompt and continuation."""
    h = hashlib.sha256(json.dumps([sample.target, list(sample.prompt_ids), list(sample.output_ids)]).encode())
    return h.hexdigest()[:20]


@torch.inference_mode()
def teacher_topk(
    model, prompt_ids: Sequence[int], output_ids: Sequence[int], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k next-token (ids [n, k] int64, log-probabilities [n, k] fp32) of `model` (a fast-runtime
    LlamaModel) before each of the n continuation tokens, teacher-forced on prompt + continuation."""
    ids = list(prompt_ids) + list(output_ids)
    first = len(prompt_ids) - 1  # position whose logits predict output_ids[0]
    last = len(ids) - 2  # ... predict output_ids[-1]
    if first < 0 or not output_ids:
        raise ValueError("a teacher pass needs a non-empty prompt and continuation")
    cache = model.new_cache(1, len(ids))
    top_ids, top_lp = [], []
    for start in range(0, len(ids) - 1, PREFILL_CHUNK):
        chunk = ids[start : min(start + PREFILL_CHUNK, len(ids) - 1)]
        wanted = [i - start for i in range(max(start, first), start + len(chunk)) if i <= last]
        logits = model.forward(
            torch.tensor([chunk], device=model.device),
            torch.arange(start, start + len(chunk), device=model.device)[None],
            cache,
            logits_at=torch.tensor([wanted], device=model.device) if wanted else None,
        )
        cache.commit(0)
        if wanted:
            lp = torch.log_softmax(logits[0].float(), -1)
            values, indices = lp.topk(k, dim=-1)
            top_ids.append(indices.cpu())
            top_lp.append(values.cpu())
    return torch.cat(top_ids), torch.cat(top_lp)


def read_teachers(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """key -> (ids [n, k], log-probabilities [n, k]) of a teacher file (empty when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    out = {}
    for i, r in enumerate(_read_jsonl(path), 1):
        try:
            out[str(r["key"])] = (
                torch.tensor(r["ids"], dtype=torch.int64),
                torch.tensor(r["logprobs"], dtype=torch.float32),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SpecgroveError(
                f"{path}: record {i} is not a teacher record ({e}); delete the file to compute it again"
            ) from None
    return out


def compute_teachers(
    samples: Sequence[Sample],
    path: str | os.PathLike,
    load_target: Callable[[str], object],
    k: int = DEFAULT_TOP_K,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The teacher distributions of every sample, computing (and appending to `path`) those it lacks.
    load_target(name) -> a LoadedModel, called once per target that has samples left to do."""
    from tqdm.auto import tqdm

    if k < 1:
        raise ValueError(f"the teacher's top-k must be >= 1, got {k}")
    say = log or (lambda m: print(f"[specgrove] {m}", file=sys.stderr, flush=True))
    path = Path(path)
    have = read_teachers(path)
    short = [key for key, (ids, _) in have.items() if ids.shape[1] < k]
    if short:
        raise SpecgroveError(
            f"{path} holds teacher distributions of fewer than {k} tokens; delete it or lower --teacher-top-k"
        )
    todo: dict[str, list[Sample]] = {}
    for s in samples:
        if s.output_ids and sample_key(s) not in have:
            todo.setdefault(s.target, []).append(s)
    for target_name, group in todo.items():
        if not target_name:
            raise SpecgroveError(
                'a sample names no target, so its teacher cannot be loaded; give samples with a "target"'
            )
        loaded = load_target(target_name)
        say(f"teacher {target_name}: top-{k} distributions of {len(group)} samples -> {path}")
        t0, tokens = time.perf_counter(), 0
        with (
            _open_for_append(path) as f,
            tqdm(
                total=len(group),
                desc=f"teacher {Path(target_name).name}",
                unit="sample",
                disable=not progress,
                file=sys.stderr,
                dynamic_ncols=True,
            ) as bar,
        ):
            for s in group:
                ids, lp = teacher_topk(loaded.model, s.prompt_ids, s.output_ids, k)
                key = sample_key(s)
                rounded = [[round(v, 4) for v in row] for row in lp.tolist()]  # as the file holds them
                f.write(
                    json.dumps({"key": key, "target": s.target, "k": k, "ids": ids.tolist(), "logprobs": rounded})
                    + "\n"
                )
                f.flush()
                have[key] = (ids, torch.tensor(rounded, dtype=torch.float32))
                tokens += len(s.prompt_ids) + len(s.output_ids)
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
                bar.update()
        del loaded
    keys = {sample_key(s) for s in samples if s.output_ids}
    return {key: (have[key][0][:, :k], have[key][1][:, :k]) for key in keys}
