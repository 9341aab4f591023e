"""Where one forward goes: time every GGUF linear and attention call inside it: `python scripts/profile_forward.py MODEL TOKENS`.
The cost breakdown in docs/benchmarks.md (2026-11-29) came from this script."""
import time, torch, sys, collections
from specgrove.models.loader import load_model
from specgrove.models import linear as L
from specgrove.bench.bandwidth import measure_memory_bandwidth
m = load_model(sys.argv[1]).model
T = int(sys.argv[2])
acc = collections.defaultdict(float)
orig = L.GGUFLinear.__call__
def timed(self, x, residual=None):
    t = time.perf_counter(); y = orig(self, x, residual); acc[f"linear {self.out_features}x{self.in_features}"] += time.perf_counter() - t; return y
L.GGUFLinear.__call__ = timed
def timer(name, f):
    def g(*a, **k):
        t = time.perf_counter(); y = f(*a, **k); acc[name] += time.perf_counter() - t; return y
    return g
if m._attention is not None:  # the batch-invariant forward calls its kernels directly
    m._attention = timer("attention", m._attention)
    ops = m._ops
    class TimedOps:
        rms_norm = staticmethod(timer("rms_norm", ops.rms_norm))
        silu_mul = staticmethod(timer("silu_mul", ops.silu_mul))
        rope_store = staticmethod(timer("rope_store", ops.rope_store))
    m._ops = TimedOps
cache = m.new_cache(1, 512)
ids = torch.randint(0, 1000, (1, 100)); m.forward(ids, torch.arange(100)[None], cache, logits_at=None); cache.commit(0)
def step():
    m.forward(torch.randint(0, 1000, (1, T)), (100 + torch.arange(T))[None], cache); cache.pending[0] = 0
for _ in range(3): step()
acc.clear()
n = 10
t = time.perf_counter()
for _ in range(n): step()
total = (time.perf_counter() - t) / n
print(f"T={T} forward {total*1e3:.1f} ms")
s = 0
for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
    print(f"  {k}: {v/n*1e3:.2f} ms"); s += v / n
print(f"  other: {(total - s)*1e3:.1f} ms")
bw = measure_memory_bandwidth()
print("bw read", bw.read_bandwidth_gbs)
