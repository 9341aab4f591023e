"""The machine's memory bandwidth, the physical limit of decoding at batch size 1.

A decode step reads every weight once, so tokens/s can never exceed bandwidth / weight bytes. Two
measurements, each the best of a few runs (the least disturbed one), with the torch threads the engine
uses, over 1 GiB (far beyond every cache level):

  read   `x.sum()`: reads `bytes(x)` and writes nothing, the access pattern of a decode step. This is
         the limit the benchmark compares weight bandwidth against.
  copy   `dst.copy_(src)`: counted as read + write = 2 * bytes(src), as STREAM's copy does.

On shared machines a neighbour's load moves both by tens of percent within minutes, so the benchmark
measures before its first method and after its last, and compares only figures of the same run (the readings
of each run are in docs/benchmarks.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

DEFAULT_NUM_FLOATS = 256 * 2**20  # 1 GiB of fp32: far beyond every cache level


@dataclass
class BandwidthResult:
    memory_bandwidth_gbs: float  # copy: (bytes read + bytes written) / best copy time, in 1e9 bytes/s
    read_bandwidth_gbs: float  # bytes read / best reduction time
    bytes_per_copy: int  # read + write
    best_copy_s: float
    best_read_s: float
    repeats: int
    device: str
    torch_threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure_memory_bandwidth(
    num_floats: int = DEFAULT_NUM_FLOATS, repeats: int = 5, device: str | torch.device = "cpu"
) -> BandwidthResult:
    """Best-of-`repeats` bandwidth of copying `num_floats` fp32 values into another buffer, and of reading
    them (a sum)."""
    if num_floats < 1 or repeats < 1:
        raise ValueError(f"num_floats and repeats must be >= 1, got {num_floats}, {repeats}")
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    src = torch.empty(num_floats, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    src.fill_(1.0)  # touch every page first, so the timed passes do not count page faults
    dst.fill_(0.0)
    sync()

    def best(fn) -> float:
        out = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            out = min(out, time.perf_counter() - t0)
        return out

    copy_s = best(lambda: dst.copy_(src))
    read_s = best(lambda: src.sum())
    nbytes = src.numel() * src.element_size()
    return BandwidthResult(
        memory_bandwidth_gbs=2 * nbytes / copy_s / 1e9,
        read_bandwidth_gbs=nbytes / read_s / 1e9,
        bytes_per_copy=2 * nbytes,
        best_copy_s=copy_s,
        best_read_s=read_s,
        repeats=repeats,
        device=str(device),
        torch_threads=torch.get_num_threads(),
    )


if __name__ == "__main__":
    result = measure_memory_bandwidth()
    print(f"memory bandwidth: read {result.read_bandwidth_gbs:.1f} GB/s, copy {result.memory_bandwidth_gbs:.1f} GB/s")
