"""Where forwards go: time every GGUF linear, attention and layer-op call inside them, for forwards of several sizes
taken in turns: `python scripts/profile_forward.py MODEL SIZES` (e.g. `1,4,5,256`; each a forward of that many new
tokens after a 100-token context, with every token's logits as in verification, or, above 32 tokens, the last
token's only, as in a prompt's prefill). The sizes alternate over 12 rounds, so the machine's bandwidth swings hit them
alike; printed: each size's mean forward and, per call kind (linears by shape), its ms and its ratio to the first
size. The cost breakdowns in docs/benchmarks.md came from this script."""

import collections
import sys
import time

import torch

from specgrove.bench.bandwidth import measure_memory_bandwidth
from specgrove.models import linear as L
from specgrove.models.loader import load_model

m = load_model(sys.argv[1]).model
sizes = [int(t) for t in sys.argv[2].split(",")]
acc = collections.defaultdict(float)
current = [None]
orig = L.GGUFLinear.__call__


def timed(self, x, residual=None):
    t = time.perf_counter()
    y = orig(self, x, residual)
    acc[(current[0], f"linear {self.out_features}x{self.in_features}")] += time.perf_counter() - t
    return y


L.GGUFLinear.__call__ = timed


def timer(name, f):
    def g(*a, **k):
        t = time.perf_counter()
        y = f(*a, **k)
        acc[(current[0], name)] += time.perf_counter() - t
        return y

    return g


if m._attention is not None:  # the batch-invariant forward calls its kernels directly
    m._attention = timer("attention", m._attention)
    ops = m._ops

    class TimedOps:
        rms_norm = staticmethod(timer("rms_norm", ops.rms_norm))
        silu_mul = staticmethod(timer("silu_mul", ops.silu_mul))
        rope_store = staticmethod(timer("rope_store", ops.rope_store))

    m._ops = TimedOps
cache = m.new_cache(1, 100 + max(sizes) + 8)
m.forward(torch.randint(0, 1000, (1, 100)), torch.arange(100)[None], cache, logits_at=None)
cache.commit(0)


def step(T):
    m.forward(
        torch.randint(0, 1000, (1, T)), (100 + torch.arange(T))[None], cache, logits_at="all" if T <= 32 else "last"
    )
    cache.pending[0] = 0


for T in sizes:  # warm-up
    step(T)
acc.clear()
total = collections.defaultdict(float)
rounds = 12
for r in range(rounds):
    for T in sizes if r % 2 == 0 else sizes[::-1]:
        current[0] = T
        t = time.perf_counter()
        step(T)
        total[T] += time.perf_counter() - t
print(
    "forward: "
    + ", ".join(f"T={T} {total[T] / rounds * 1e3:.1f} ms ({total[T] / total[sizes[0]]:.2f}x)" for T in sizes)
)
kinds = sorted({k for _, k in acc}, key=lambda k: -acc[(sizes[0], k)])
for k in kinds + ["other"]:
    ms = {
        T: (acc[(T, k)] if k != "other" else total[T] - sum(acc[(T, j)] for j in kinds)) / rounds * 1e3 for T in sizes
    }
    print(
        f"  {k:24s} "
        + "  ".join(f"T={T} {ms[T]:7.2f} ms ({ms[T] / ms[sizes[0]] if ms[sizes[0]] else 0:.2f}x)" for T in sizes)
    )
print("weight GB (one-token path)", m.weight_bytes() / 1e9)
print("read bandwidth GB/s", measure_memory_bandwidth().read_bandwidth_gbs)
