"""What merging several requests' prefill chunks into one forward could save, at most: the prefill of two prompts
of n tokens each (two forwards) against one prompt of 2n tokens (one forward reads the weights once), on the
default models (target and draft, as `SpecEngine.prefill` fills both), interleaved, median of repeats.

    .venv/bin/python scripts/prefill_merge_bound.py [--sizes 16,64,128] [--repeats 4]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,128")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    from specgrove.api import LLM
    from specgrove.sampling import SamplingParams

    engine = LLM(max_num_seqs=4).engine
    for n in (int(size) for size in args.sizes.split(",")):
        times: dict[str, list[float]] = {"two": [], "one": []}
        for _ in range(args.repeats):
            for mode in times:
                if mode == "two":
                    prompts = [list(range(1000, 1001 + n)), list(range(2000, 2001 + n))]
                else:
                    prompts = [list(range(3000, 3001 + 2 * n))]
                seqs = [engine.new_sequence(p, SamplingParams(max_tokens=1)) for p in prompts]
                start = time.perf_counter()
                for seq in seqs:
                    engine.prefill(seq)
                times[mode].append(time.perf_counter() - start)
                for seq in seqs:
                    engine.finish(seq)
        two, one = statistics.median(times["two"]), statistics.median(times["one"])
        print(
            f"n={n}: two forwards of {n} tokens {two * 1e3:.0f} ms, one forward of {2 * n} {one * 1e3:.0f} ms, "
            f"ratio {two / one:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
