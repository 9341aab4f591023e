"""The `speculative` configuration of LLM(...), validated at the edge."""

from __future__ import annotations

from dataclasses import dataclass, fields

METHODS = ("draft_model", "prompt_lookup", "tree", "sorted")
TREE_SAMPLING = ("without_replacement", "iid", "hub")


@dataclass
class SpeculativeConfig:
    method: str | None = None
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3
    # method "tree": the shape ("chain:5", "kary:2x3", "widths:4,2,1", a tree .json from `specgrove tune`,
    # or "auto": the tuned tree for this target/draft/temperature, tuned on first use) and how siblings
    # are drawn and verified: "without_replacement" (Sequoia; RRS without replacement), "iid" (SpecInfer's
    # RRS) or "hub" (SpecHub's pairs at nodes with two children, without replacement elsewhere).
    tree: str | None = None
    tree_sampling: str = "without_replacement"
    # method "sorted" (S2D): the draft is a sorted draft (specgrove.models.sorted); `sorted_exit` None drafts
    # adaptively (each token from the first exit whose confidence reaches its threshold; `sorted_thresholds`
    # overrides the draft's sorted.json, one per exit), an int drafts with that exit's sub-model alone, a chain
    # of num_speculative_tokens or the token tree `tree` (drawn and verified as `tree_sampling` says).
    sorted_exit: int | None = None
    sorted_thresholds: list[float] | None = None

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
        if self.method == "tree":
            if not self.tree:
                raise ValueError("speculative method 'tree' needs a tree: 'chain:5', 'kary:2x3', 'widths:4,2,1', "
                                 "a tree .json written by `specgrove tune`, or 'auto'")
        elif self.method == "sorted" and self.tree is not None:
            if self.sorted_exit is None:
                raise ValueError("a sorted draft drafts a tree with one fixed exit: give sorted_exit too "
                                 "(adaptive drafting makes chains)")
            if self.tree == "auto":
                raise ValueError("tree 'auto' is tuned for a draft model, not a sorted draft's exit: give a shape, "
                                 "e.g. 'widths:4,2'")
        elif self.tree is not None:
            raise ValueError(f"a tree ({self.tree!r}) is given but the method is {self.method!r}; use method 'tree' "
                             "(or 'sorted' with a sorted_exit)")
        if self.tree is not None and self.tree != "auto":
            from specgrove.trees.shape import TreeShape

            self.num_speculative_tokens = len(TreeShape.parse(self.tree))
        if self.method != "sorted" and (self.sorted_exit is not None or self.sorted_thresholds is not None):
            raise ValueError(f"sorted_exit / sorted_thresholds are options of method 'sorted', not {self.method!r}")
        if self.sorted_exit is not None and self.sorted_thresholds is not None:
            raise ValueError("sorted_thresholds are for adaptive drafting; a fixed sorted_exit uses none")
        if self.sorted_exit is not None and (not isinstance(self.sorted_exit, int) or self.sorted_exit < 1):
            raise ValueError(f"sorted_exit must be a layer count >= 1 (one of the draft's exits), got {self.sorted_exit!r}")
        if self.tree_sampling not in TREE_SAMPLING:
            raise ValueError(f"tree_sampling {self.tree_sampling!r} is unknown; use one of {', '.join(TREE_SAMPLING)}")
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
