"""The machine's memory bandwidth, the physical limit of decoding at batch size 1.

A decode step reads every weight once, so tokens/s can never exceed bandwidth / weight bytes. We time
a large tensor copy (dst.copy_(src)): it reads and writes `2 * bytes(src)`, with the same torch threads
the engine uses, and keep the best of a few runs (the least disturbed one).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

DEFAULT_NUM_FLOATS = 256 * 2**20  # 1 GiB of fp32: far beyond every cache level


@dataclass
class BandwidthResult:
    memory_bandwidth_gbs: float  # (bytes read + bytes written) / best copy time, in 1e9 bytes/s
    bytes_per_copy: int  # read + write
    best_copy_s: float
    repeats: int
    device: str
    torch_threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure_memory_bandwidth(num_floats: int = DEFAULT_NUM_FLOATS, repeats: int = 5,
                             device: str | torch.device = "cpu") -> BandwidthResult:
    """Best-of-`repeats` bandwidth of copying `num_floats` fp32 values into another buffer."""
    if num_floats < 1 or repeats < 1:
        raise ValueError(f"num_floats and repeats must be >= 1, got {num_floats}, {repeats}")
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    src = torch.empty(num_floats, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    src.fill_(1.0)  # touch every page first, so the timed copies do not count page faults
    dst.fill_(0.0)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return BandwidthResult(
        memory_bandwidth_gbs=moved / best / 1e9, bytes_per_copy=moved, best_copy_s=best, repeats=repeats,
        device=str(device), torch_threads=torch.get_num_threads(),
    )


if __name__ == "__main__":
    print(f"memory bandwidth: {measure_memory_bandwidth().memory_bandwidth_gbs:.1f} GB/s")
