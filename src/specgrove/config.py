"""The `speculative` configuration of LLM(...), validated at the edge."""

from __future__ import annotations

from dataclasses import dataclass, fields

METHODS = ("draft_model", "prompt_lookup")


@dataclass
class SpeculativeConfig:
    method: str | None = None
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3

    @classmethod
    def from_any(cls, value) -> "SpeculativeConfig":
        if value is None:
            return cls()
        if isinstance(value, SpeculativeConfig):
            value.validate()
            return value
        if not isinstance(value, dict):
            raise TypeError(f"speculative must be a dict like {{'method': 'draft_model', 'num_speculative_tokens': 4}}, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown speculative option(s) {sorted(unknown)}; known: {sorted(known)}")
        config = cls(**value)
        config.validate()
        return config

    def validate(self) -> None:
        if self.method not in (None, "none", *METHODS):
            raise ValueError(f"speculative method {self.method!r} is unknown; use one of {', '.join(METHODS)} or None")
        if self.method == "none":
            self.method = None
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens (k) must be an integer >= 0, got {self.num_speculative_tokens!r}")
        if not (1 <= self.prompt_lookup_min <= self.prompt_lookup_max):
            raise ValueError(
                f"prompt lookup needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"{self.prompt_lookup_min}, {self.prompt_lookup_max}"
            )

    @property
    def enabled(self) -> bool:
        return self.method is not None and self.num_speculative_tokens > 0
