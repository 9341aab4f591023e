"""Time one target forward by number of new tokens at context 100: `python scripts/forward_by_tokens.py MODEL
[QUANTIZATION]`. The sizes take turns (5 rounds, each size's median of 5 forwards per round), so the machine's
bandwidth swings hit them alike; printed: each size's median over the rounds and its ratio to one token.
The figures quoted in docs/benchmarks.md came from this script."""

import statistics
import sys
import time

import torch

from specgrove.models.loader import load_model

name = sys.argv[1]
quant = sys.argv[2] if len(sys.argv) > 2 else "auto"
m = load_model(name, quantization=quant).model
cache = m.new_cache(1, 512)
ids = torch.randint(0, 1000, (1, 100))
m.forward(ids, torch.arange(100)[None], cache, logits_at=None)
cache.commit(0)
sizes = (1, 2, 3, 4, 5, 8)
times = {t: [] for t in sizes}
for _ in range(5):
    for T in sizes:
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            m.forward(torch.randint(0, 1000, (1, T)), (100 + torch.arange(T))[None], cache)
            ts.append(time.perf_counter() - t)
            cache.pending[0] = 0
        times[T].append(statistics.median(ts))
one = statistics.median(times[1])
for T in sizes:
    med = statistics.median(times[T])
    print(f"T={T}: {med * 1e3:.1f} ms ({med / one:.2f}x one token)", flush=True)
print("weight GB", m.weight_bytes() / 1e9)
