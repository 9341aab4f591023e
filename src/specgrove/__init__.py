"""specgrove: lossless speculative decoding with token trees, multi-draft verification, sorted drafts
and goodput-adaptive serving."""

from specgrove.api import LLM, CompletionOutput, RequestOutput
from specgrove.config import SpeculativeConfig
from specgrove.sampling import SamplingParams
from specgrove.version import __version__

__all__ = ["LLM", "SamplingParams", "SpeculativeConfig", "RequestOutput", "CompletionOutput", "__version__"]
