"""One layer's GGUF matrices, each multiplied over and over by one token's activations (so from cache after the
first call), at 2 and 1 torch threads: `python scripts/matrix_speed.py [MODEL] [LAYER]`. Prints each matrix's best
time per call (best of 5 runs of many calls) and the weight bytes per second that gives. With the weights in cache,
a rate below the machine's memory bandwidth says the kernel is limited by its own work per byte, not by memory."""

import sys
import time

import torch

from specgrove.models.loader import load_model


def best_call_seconds(linear, tokens: int, calls: int) -> float:
    x = torch.randn(1, tokens, linear.in_features)
    for _ in range(20):
        linear(x)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            linear(x)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    model = load_model(sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-1.5b-instruct").model
    layer = model.layers[int(sys.argv[2]) if len(sys.argv) > 2 else 3]
    matrices = {"o": layer.o, "qkv": layer.qkv, "gate_up": layer.gate_up, "down": layer.down}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        for name, linear in matrices.items():
            calls = max(20, int(4e8 / linear.nbytes))  # about the same time per matrix
            seconds = best_call_seconds(linear, 1, calls)
            print(
                f"threads {threads} {name:8s} {linear.out_features}x{linear.in_features}: {seconds * 1e6:8.1f} us "
                f"{linear.nbytes / seconds / 1e9:5.1f} GB/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
