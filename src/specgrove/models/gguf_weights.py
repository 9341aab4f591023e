"""A GGUF file's matrices as they are stored: llama.cpp's quantized blocks, for the `gguf` weight format.

The fast runtime multiplies by these blocks directly (`specgrove.kernels.ggml`), so a model runs on the
same bytes llama.cpp reads: no dequantized copy of the matrices. Norms, biases and the embedding table
come from the converted Hugging Face directory as before (they are small, or gathered row by row).

Names: Hugging Face `model.layers.{i}.self_attn.q_proj.weight` is GGUF `blk.{i}.attn_q.weight`, and so
on (`_GGUF_NAMES`); the output layer is `output.weight`, or the embedding `token_embd.weight` when the
model ties them. llama.cpp's converter permutes the rows of Llama's q and k projections (its RoPE
pairs adjacent dimensions, Hugging Face's pairs the two halves of a head); rows are whole blocks, so
the permutation is undone on the raw rows (`_unpermute_rows`). Qwen2 is stored unpermuted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


@dataclass
class GGUFMatrix:
    """One weight matrix [n, k] (out, in) as raw blocks: `data` uint8 [n, row_bytes] of GGML type `type`."""

    data: torch.Tensor
    type: int
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name of a Hugging Face matrix name (None for names that are not a layer matrix)."""
    if hf_name == "lm_head.weight":
        return "output.weight"
    match = _LAYER.fullmatch(hf_name)
    if match is None or match.group(2) not in _GGUF_NAMES:
        return None
    return f"blk.{match.group(1)}.{_GGUF_NAMES[match.group(2)]}.weight"


def _unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: GGUF row h*D + 2j + t holds Hugging Face row h*D + t*D/2 + j."""
    n = rows.shape[0]
    head_dim = n // heads
    h, t, j = np.meshgrid(np.arange(heads), np.arange(2), np.arange(head_dim // 2), indexing="ij")
    index = (h * head_dim + 2 * j + t).reshape(-1)  # in Hugging Face row order
    return rows[index]


class GGUFWeights:
    """The matrices of one GGUF file, looked up by Hugging Face name (`matrix`)."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        reader = gguf.GGUFReader(str(self.path), "r")
        self.architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        self._heads = self._heads_kv = None
        if f"{self.architecture}.attention.head_count" in reader.fields:
            self._heads = int(reader.fields[f"{self.architecture}.attention.head_count"].parts[-1][0])
            kv_field = reader.fields.get(f"{self.architecture}.attention.head_count_kv")
            self._heads_kv = int(kv_field.parts[-1][0]) if kv_field is not None else self._heads
        self._tensors = {t.name: t for t in reader.tensors}

    def types(self) -> dict[str, int]:
        """GGML type of every matrix the runtime would multiply by (name -> type id)."""
        return {
            name: int(t.tensor_type)
            for name, t in self._tensors.items()
            if len(t.shape) == 2 and name != "token_embd.weight"
        }

    def has(self, gguf_tensor: str) -> bool:
        return gguf_tensor in self._tensors

    def matrix(self, hf_name: str, tied: bool = False) -> GGUFMatrix:
        """The matrix Hugging Face calls `hf_name`; `tied`: the output layer is the embedding table."""
        name = gguf_name(hf_name)
        if name is None:
            raise KeyError(f"{hf_name} is not a matrix of a GGUF layer")
        if name == "output.weight" and (tied or name not in self._tensors):
            name = "token_embd.weight"
        if name not in self._tensors:
            raise KeyError(f"{self.path.name} has no tensor {name} (for {hf_name})")
        tensor = self._tensors[name]
        k, n = (int(d) for d in tensor.shape)  # GGUF lists dimensions innermost first
        rows = np.asarray(tensor.data).reshape(n, -1)
        if self.architecture == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            rows = _unpermute_rows(rows, self._heads if "attn_q" in name else self._heads_kv)
        return GGUFMatrix(torch.from_numpy(np.array(rows)), int(tensor.tensor_type), n, k)
