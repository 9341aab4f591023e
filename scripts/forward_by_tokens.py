"""Time one target forward by number of new tokens (1, 2, 4, 5, 8) at context 100: `python scripts/forward_by_tokens.py MODEL [QUANTIZATION]`.
The figures quoted in docs/benchmarks.md (2026-11-29) came from this script."""
import time, torch, sys
from specgrove.models.loader import load_model
name = sys.argv[1]; quant = sys.argv[2] if len(sys.argv) > 2 else "auto"
m = load_model(name, quantization=quant).model
cache = m.new_cache(1, 512)
ids = torch.randint(0, 1000, (1, 100)); m.forward(ids, torch.arange(100)[None], cache, logits_at=None); cache.commit(0)
for T in (1, 2, 4, 5, 8, 1):
    ts = []
    for r in range(5):
        t = time.perf_counter()
        m.forward(torch.randint(0, 1000, (1, T)), (100 + torch.arange(T))[None], cache)
        ts.append(time.perf_counter() - t)
        cache.truncate(0, 100) if hasattr(cache, "truncate") else None
        cache.pending[0] = 0
    print(f"T={T}: {sorted(ts)[2]*1e3:.1f} ms", flush=True)
print("weight GB", m.weight_bytes() / 1e9)
