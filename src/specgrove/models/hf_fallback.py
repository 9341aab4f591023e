"""Chain-mode fallback for transformers causal LMs outside the Llama family (e.g. Gemma 3).

Same interface as the fast runtime (`forward`, `new_cache`), backed by transformers' own model and
DynamicCache. It runs one sequence at a time and only causal chains: a token-tree mask or keeping a
non-prefix subset of positions raises UnsupportedError instead of computing something else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specgrove.errors import UnsupportedError


class HFChainCache:
    def __init__(self, max_len: int):
        from transformers import DynamicCache

        self.dynamic = DynamicCache()
        self.max_len = max_len
        self.lengths = [0]
        self.pending = [0]

    @property
    def batch_size(self) -> int:
        return 1

    def check_room(self, num_new: int, rows: Sequence[int] | None = None) -> None:
        if self.lengths[0] + num_new > self.max_len:
            raise ValueError(
                f"sequence needs {self.lengths[0] + num_new} positions but max_model_len is {self.max_len}"
            )

    def _crop(self, length: int) -> None:
        excess = self.dynamic.get_seq_length() - length
        if excess > 0:
            self.dynamic.crop(-excess)  # transformers 5.x: a negative count of tokens to drop

    def commit(self, row: int, keep: Sequence[int] | torch.Tensor | None = None) -> None:
        start = self.lengths[0]
        if keep is None:
            n = self.pending[0]
        else:
            keep_list = keep.tolist() if isinstance(keep, torch.Tensor) else list(keep)
            n = len(keep_list)
            if keep_list != list(range(n)):
                raise UnsupportedError(
                    "the transformers fallback can only keep a prefix of new positions (chain mode); "
                    "token trees need a Llama-family model"
                )
        self.lengths[0] = start + n
        self.pending[0] = 0
        self._crop(self.lengths[0])

    def truncate(self, row: int, length: int) -> None:
        self.lengths[0] = length
        self.pending[0] = 0
        self._crop(length)

    def reset(self, row: int) -> None:
        self.truncate(row, 0)


class HFCausalLM:
    supports_trees = False
    supports_batching = False  # one sequence at a time (batch size 1)
    supports_features = False  # no hidden states for a feature-level draft head

    def __init__(self, hf_model, dtype: torch.dtype, device):
        self.model = hf_model.eval()
        self.hf_config = hf_model.config
        self.dtype = dtype
        self.device = torch.device(device)
        self.vocab_size = (
            hf_model.config.vocab_size
            if hasattr(hf_model.config, "vocab_size")
            else hf_model.get_output_embeddings().weight.shape[0]
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def new_cache(self, batch_size: int, max_len: int) -> HFChainCache:
        if batch_size != 1:
            raise UnsupportedError("the transformers fallback runs one sequence at a time (batch size 1)")
        return HFChainCache(max_len)

    @torch.inference_mode()
    def forward(
        self,
        input_ids,
        positions,
        cache: HFChainCache,
        tree_mask=None,
        rows=None,
        logits_at="all",
        num_new=None,
        extend: bool = False,
        features=None,
    ):
        if features is not None:
            raise UnsupportedError("the transformers fallback does not return hidden states (features)")
        batch, num_tokens = input_ids.shape
        if batch != 1 or (rows is not None and list(rows) != [0]):
            raise UnsupportedError("the transformers fallback runs one sequence at a time (batch size 1)")
        prior = cache.pending[0] if extend else 0
        if tree_mask is not None:
            # Only a chain can run here: each new token sees every uncommitted slot before it.
            region = prior + num_tokens
            causal = torch.ones(region, region, dtype=torch.bool).tril()[prior:]
            own = torch.arange(region)[None, :] == (prior + torch.arange(num_tokens))[:, None]
            if not torch.equal(tree_mask[0].cpu().bool() | own, causal):
                raise UnsupportedError(
                    "token trees need a Llama-family model; the transformers fallback runs chains only"
                )
        cache.check_room(prior + num_tokens)
        cache._crop(cache.lengths[0] + prior)  # drop uncommitted positions not extended
        out = self.model(
            input_ids=input_ids.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache.dynamic,
            use_cache=True,
        )
        cache.pending[0] = prior + num_tokens
        if logits_at is None:
            return None
        logits = out.logits
        if isinstance(logits_at, str):
            if logits_at == "last":
                logits = logits[:, -1:]
        else:
            logits = torch.gather(logits, 1, logits_at.to(logits.device)[:, :, None].expand(-1, -1, logits.shape[-1]))
        return logits.float()
