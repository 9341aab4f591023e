"""Prompt prefill, ours against llama.cpp on the same GGUF, in turns: `python scripts/prefill_vs_llama_cpp.py
[TOKENS]` (default 256 random token ids, 3 rounds; the default target; needs llama-cpp-python). Prints ms per
prompt token for each, per round and the medians. The prefill comparison in docs/benchmarks.md came from it."""

import statistics
import sys
import time

import torch

from specgrove.bench.llamacpp_peer import LlamaCppPeer
from specgrove.models.defaults import DEFAULT_TARGET, fetch_gguf
from specgrove.models.loader import load_model

T = int(sys.argv[1]) if len(sys.argv) > 1 else 256
model = load_model(DEFAULT_TARGET).model
llm = LlamaCppPeer(fetch_gguf(DEFAULT_TARGET), n_ctx=T + 64, eos_token_ids=[]).llm  # as the bench's llama_cpp method
ids = torch.randint(100, 20000, (1, T))
ours, theirs = [], []
for r in range(3):
    cache = model.new_cache(1, T + 8)
    t = time.perf_counter()
    model.forward(ids, torch.arange(T)[None], cache, logits_at="last")
    ours.append(time.perf_counter() - t)
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids[0].tolist())
    theirs.append(time.perf_counter() - t)
    print(
        f"round {r}: ours {ours[-1] * 1e3 / T:.2f} ms/token, llama.cpp {theirs[-1] * 1e3 / T:.2f} ms/token", flush=True
    )
print(
    f"median: ours {statistics.median(ours) * 1e3 / T:.2f}, llama.cpp {statistics.median(theirs) * 1e3 / T:.2f} "
    "ms per prompt token"
)
