"""What a draft head's forward costs against the target's, in the same format, timed in turns in one process.

    .venv/bin/python scripts/eagle_cost.py [--head DIR] [--rounds 15]

Times (median ms, after 2 warm-up rounds): the target's forward of 1 and of 5 new tokens (with the features the
head reads), the head's drafting forward of 1 and of 4 tokens (its own outputs as input: a chain's or a tree
level's), and its catch-up forward of 3 committed pairs (the target's features through fc). Prints one JSON
object. Without --head a randomly initialised head of the default recipe's shape is made (the cost does not
depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def main() -> None:
    from specgrove.models import defaults
    from specgrove.models.eagle import default_head_dir, load_eagle_head, save_head
    from specgrove.models.loader import load_model
    from specgrove.train.eagle_model import head_config, new_train_head

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=defaults.DEFAULT_TARGET)
    parser.add_argument("--head", default=None, help="a head directory (default: train-eagle's, else a random one)")
    parser.add_argument("--head-tokens", type=int, default=16384, help="a random head's cut vocabulary")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--context", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(2)
    target = load_model(args.target)
    directory = args.head or default_head_dir(target)
    if args.head is None and not (directory / "model.safetensors").exists():
        config = head_config(target)
        module = new_train_head(target, config, torch.arange(args.head_tokens))
        directory = save_head(tempfile.mkdtemp() + "/head", config, module.export_weights())
    head = load_eagle_head(directory, target)
    model, layers, hidden = target.model, head.feature_layers, head.config.hidden_size
    length = args.context
    ids = torch.randint(0, 30000, (1, length))
    cache = model.new_cache(1, length + 16)
    _, feats = model.forward(ids, torch.arange(length)[None], cache, features=layers, logits_at="last")
    cache.commit(0)
    head_cache = head.new_cache(1, length + 16)
    head.forward(
        ids[:, 1:], feats[:, :-1], torch.arange(1, length)[None], head_cache, from_target=True, logits_at="last"
    )
    head_cache.commit(0)

    def target_forward(n):
        x, pos = torch.randint(0, 30000, (1, n)), torch.arange(length, length + n)[None]
        t = time.perf_counter()
        model.forward(x, pos, cache, features=layers)
        return time.perf_counter() - t

    def head_forward(n, from_target):
        x, pos = torch.randint(0, 30000, (1, n)), torch.arange(length, length + n)[None]
        inputs = torch.randn(1, n, head.config.feature_size if from_target else hidden)
        mask = torch.ones(1, n, n, dtype=torch.bool).tril()
        t = time.perf_counter()
        head.forward(x, inputs, pos, head_cache, from_target=from_target, tree_mask=mask)
        return time.perf_counter() - t

    probes = {
        "target_1": lambda: target_forward(1),
        "target_5": lambda: target_forward(5),
        "head_1": lambda: head_forward(1, False),
        "head_4": lambda: head_forward(4, False),
        "head_catch_up_3": lambda: head_forward(3, True),
    }
    times = {k: [] for k in probes}
    for _ in range(args.rounds + 2):
        for name, probe in probes.items():
            times[name].append(probe())
    ms = {k: round(1000 * statistics.median(v[2:]), 2) for k, v in times.items()}
    print(
        json.dumps(
            {
                "ms": ms,
                "head_1_over_target_1": round(ms["head_1"] / ms["target_1"], 4),
                "head_bytes_per_forward": head.weight_bytes(),
                "target_bytes_per_forward": model.weight_bytes(),
                "head": str(directory),
                "head_tokens": head.head_vocab,
                "intermediate_size": head.config.intermediate_size,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
