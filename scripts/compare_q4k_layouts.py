"""The target loaded twice in one process, its Q4_K matrices as Q4_K x8 (SPECGROVE_Q4K_LAYOUT=x8) and as the file's
rows (SPECGROVE_Q4K_LAYOUT=rows), timed in turns: `python scripts/compare_q4k_layouts.py [MODEL]`. The default layout,
"auto", is the rows for one token and x8 for more. Forward sizes 1 to 5 at context 100 (12 rounds, each a median
of 7 forwards, the two models' order alternating) and a 256-token prefill;
prints the ratio of the medians and each round's ratio, and checks that both give the same logits bit for bit.
The Q4_K x8 figures in docs/benchmarks.md (2026-11-30) came from this script."""

import os
import statistics
import sys
import time

import torch

from specgrove.models.loader import load_model

name = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-1.5b-instruct"
models = {}
for layout in ("x8", "rows"):
    os.environ["SPECGROVE_Q4K_LAYOUT"] = layout  # read by GGUFLinear when the model loads
    models[layout] = load_model(name).model
for key, m in models.items():
    print(key, "layouts:", sorted({t for layer in m.layers for t in layer.gate_up._types}))
caches = {}
for key, m in models.items():
    c = m.new_cache(1, 512)
    m.forward(torch.randint(0, 1000, (1, 100)), torch.arange(100)[None], c, logits_at=None)
    c.commit(0)
    caches[key] = c
SIZES = (1, 2, 3, 4, 5)
times = {}
keys = list(models)
for rnd in range(12):
    for T in SIZES:
        for key in keys if rnd % 2 == 0 else keys[::-1]:
            m = models[key]
            ts = []
            for _ in range(7):
                t = time.perf_counter()
                m.forward(torch.randint(0, 1000, (1, T)), (100 + torch.arange(T))[None], caches[key])
                ts.append(time.perf_counter() - t)
                caches[key].pending[0] = 0
            times.setdefault((T, key), []).append(statistics.median(ts))
for T in SIZES:
    a, b = statistics.median(times[(T, "rows")]), statistics.median(times[(T, "x8")])
    rounds = [round(y / x, 2) for x, y in zip(times[(T, "rows")], times[(T, "x8")])]
    print(f"T={T}: rows {a * 1e3:.1f} ms, x8 {b * 1e3:.1f} ms ({b / a:.3f}x); per round {rounds}")
for key, m in models.items():
    c = m.new_cache(1, 300)
    t = time.perf_counter()
    m.forward(torch.randint(0, 1000, (1, 256)), torch.arange(256)[None], c, logits_at=None)
    print(f"{key}: 256-token prefill {(time.perf_counter() - t) * 1e3 / 256:.2f} ms per token")
ids = torch.randint(0, 1000, (1, 20))
a, b = (m.forward(ids, torch.arange(20)[None], m.new_cache(1, 64)) for m in models.values())
print("same logits bit for bit:", torch.equal(a, b))
