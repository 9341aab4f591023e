"""The `speculative` configuration of LLM(...), validated at the edge, and the one language for naming a
method, shared by every entry point.

`LLM(speculative=...)`, `specgrove generate --method`, `serve --method`, `loadtest --method` and
`bench --methods` all read these strings through `parse_method`, which turns one into a
`SpeculativeConfig`; `method_name` writes a config back as its canonical string.

    none | plain          no speculation
    draft_model           a chain of k tokens from the draft model
    prompt_lookup         n-grams of the prompt and output so far (no draft model)
    tree:SHAPE            a token tree from the draft model, siblings drawn without replacement (Sequoia)
    rrs_wo:SHAPE          the same (RRS without replacement)
    rrs:SHAPE             siblings drawn independently, verified by SpecInfer's recursive rejection sampling
    spechub:SHAPE         SpecHub: pairs of siblings verified jointly, without replacement elsewhere
    sorted                a sorted draft (S2D), each token from the first exit confident enough
    sorted@L              exit L alone, a chain of k
    sorted@L:SHAPE        exit L alone drafting the tree SHAPE (siblings without replacement)
    sorted@A+B+...        adaptive over the exits A, B, ... only
    eagle                 a chain of k from a feature-level draft head (EAGLE family, `specgrove train-eagle`)
    eagle:SHAPE           the head drafting the tree SHAPE (siblings as tree_sampling says)
    eagle:dynamic:N[,D,K] EAGLE-2's dynamic tree of N nodes, D levels, the top K expanded per level
    eagle:mixed:N[,D,K]   the same plus prompt lookup's continuation as one more branch

SHAPE is `chain:N`, `kary:BxD`, `widths:W1,W2,...`, a tree .json written by `specgrove tune`, or
`auto` (tuned for this target, draft and temperature on first use; draft models only).
`tree` alone also works, with the shape given apart (`--tree`, or `tree=` in the config).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# method name -> whether its proposer runs a draft model (entry points then load one). Filled by the proposer
# factory, one `specgrove.drafting.factory.register(...)` line per drafter; `import specgrove` imports the
# factory, so every registered name is known before any string is parsed.
METHODS: dict[str, bool] = {}
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
    # `sorted_exits`: adaptive drafting over these exits only (several layer counts), e.g. the shallow ones.
    sorted_exit: int | None = None
    sorted_exits: list[int] | None = None
    sorted_thresholds: list[float] | None = None
    # method "eagle": a feature-level draft head (specgrove.models.eagle) from this directory (default: where
    # `specgrove train-eagle` writes the head of this target). `tree` is then a static shape, or EAGLE-2's
    # dynamic tree "dynamic:N[,D,K]", or "mixed:N[,D,K]" (the dynamic tree plus a prompt-lookup branch).
    eagle_head: str | None = None

    @classmethod
    def from_any(cls, value) -> SpeculativeConfig:
        """A validated config from None, a config, a method string of `specgrove.config` ('spechub:kary:2x2',
        'sorted@6+12', ...) or a dict of fields whose 'method' may be such a string."""
        if value is None:
            return cls()
        if isinstance(value, SpeculativeConfig):
            value.validate()
            return value
        if isinstance(value, str):
            return parse_method(value)
        if not isinstance(value, dict):
            raise TypeError(
                "speculative must be a method string like 'tree:kary:2x3' or a dict like "
                f"{{'method': 'draft_model', 'num_speculative_tokens': 4}}, got {value!r}"
            )
        options = dict(value)
        method = options.pop("method", None)
        return parse_method("none" if method is None else method, **options)

    @classmethod
    def of_fields(cls, values: dict) -> SpeculativeConfig:
        """The validated config of plain field values (no method string parsing); ValueError naming unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown speculative option(s) {sorted(unknown)}; known: {sorted(known)}")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        from specgrove.trees.dynamic import DynamicTree, is_dynamic

        if self.method == "eagle" and self.tree is not None:
            if is_dynamic(self.tree):
                self.num_speculative_tokens = DynamicTree.parse(self.tree).nodes
        elif self.method == "tree":
            if not self.tree:
                raise ValueError(
                    "speculative method 'tree' needs a tree: 'chain:5', 'kary:2x3', 'widths:4,2,1', "
                    "a tree .json written by `specgrove tune`, or 'auto'"
                )
        elif self.method == "sorted" and self.tree is not None:
            if self.sorted_exit is None:
                raise ValueError(
                    "a sorted draft drafts a tree with one fixed exit: give sorted_exit too "
                    "(adaptive drafting makes chains)"
                )
            if self.tree == "auto":
                raise ValueError(
                    "tree 'auto' is tuned for a draft model, not a sorted draft's exit: give a shape, e.g. 'widths:4,2'"
                )
        elif self.tree is not None:
            raise ValueError(
                f"a tree ({self.tree!r}) is given but the method is {self.method!r}; use method 'tree' "
                "(or 'sorted' with a sorted_exit)"
            )
        if self.eagle_head is not None and self.method != "eagle":
            raise ValueError(f"eagle_head is an option of method 'eagle', not {self.method!r}")
        if self.tree is not None and self.tree != "auto" and not (self.method == "eagle" and is_dynamic(self.tree)):
            from specgrove.trees.sequoia import parse_tree

            self.num_speculative_tokens = len(parse_tree(self.tree))
        sorted_options = (self.sorted_exit, self.sorted_exits, self.sorted_thresholds)
        if self.method != "sorted" and any(o is not None for o in sorted_options):
            raise ValueError(
                f"sorted_exit / sorted_exits / sorted_thresholds are options of method 'sorted', not {self.method!r}"
            )
        if self.sorted_exits is not None:
            exits = self.sorted_exits
            if (
                not isinstance(exits, (list, tuple))
                or len(exits) < 2
                or not all(isinstance(e, int) and e >= 1 for e in exits)
            ):
                raise ValueError(
                    f"sorted_exits must be two or more exit layer counts >= 1 (adaptive drafting over "
                    f"them), got {exits!r}; for one exit use sorted_exit"
                )
            if self.sorted_exit is not None:
                raise ValueError("give sorted_exit (one fixed exit) or sorted_exits (adaptive over several), not both")
            if self.tree is not None:
                raise ValueError("adaptive drafting over several exits makes chains; draft a tree with one sorted_exit")
            self.sorted_exits = list(exits)
        if self.sorted_exit is not None and self.sorted_thresholds is not None:
            raise ValueError("sorted_thresholds are for adaptive drafting; a fixed sorted_exit uses none")
        if self.sorted_exit is not None and (not isinstance(self.sorted_exit, int) or self.sorted_exit < 1):
            raise ValueError(
                f"sorted_exit must be a layer count >= 1 (one of the draft's exits), got {self.sorted_exit!r}"
            )
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


# prefix -> how a tree's siblings are drawn and verified (SpeculativeConfig.tree_sampling)
TREE_PREFIXES = {"tree:": "without_replacement", "rrs_wo:": "without_replacement", "rrs:": "iid", "spechub:": "hub"}
# the prefix method_name writes for each sampling
_PREFIX_OF_SAMPLING = {"without_replacement": "tree:", "iid": "rrs:", "hub": "spechub:"}
NO_SPECULATION = ("none", "plain")
# the methods the grammar spells with more than their name
_STRUCTURED = ("tree", "sorted", "eagle")
_FORMS = (
    "tree:SHAPE, rrs:SHAPE, rrs_wo:SHAPE, spechub:SHAPE, sorted, sorted@L, sorted@L:SHAPE, sorted@A+B, "
    "eagle, eagle:SHAPE, eagle:dynamic:N[,D,K] or eagle:mixed:N[,D,K] "
    "(SHAPE: chain:N, kary:BxD, widths:W1,W2,..., a tree .json from `specgrove tune`, or auto)"
)


def register_method(name: str, needs_draft: bool) -> None:
    """Make `name` a method of the language (the proposer factory's `register` calls this)."""
    if not name.isidentifier() or name in NO_SPECULATION:
        raise ValueError(f"{name!r} cannot name a method: use a plain identifier other than {NO_SPECULATION}")
    METHODS[name] = bool(needs_draft)


def grammar() -> str:
    """Every method string the language reads (the registered names and the structured forms)."""
    return ", ".join(["none", *(n for n in METHODS if n not in _STRUCTURED), _FORMS])


def _sorted_parts(rest: str, text: str) -> dict:
    exits, _, shape = rest.partition(":")
    parts = exits.split("+")
    if not exits or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(
            f"method {text!r}: after 'sorted@' come exit layer counts, e.g. sorted@6, sorted@6:kary:2x2 or sorted@6+12"
        )
    if len(parts) > 1:
        if shape:
            raise ValueError(
                f"method {text!r}: adaptive drafting over several exits makes chains; draft a tree "
                "with one exit (sorted@L:SHAPE)"
            )
        return {"sorted_exits": [int(p) for p in parts]}
    out: dict = {"sorted_exit": int(parts[0])}
    if shape:
        out["tree"] = shape
    return out


def method_fields(text: str) -> dict:
    """The SpeculativeConfig fields a method string sets (method, tree, tree_sampling, sorted_exit(s)).
    ValueError, naming the grammar, for a string that is not a method."""
    if not isinstance(text, str):
        raise TypeError(f"a method is a string like 'draft_model' or 'tree:kary:2x3', got {text!r}")
    t = text.strip()
    if t in NO_SPECULATION:
        return {"method": None}
    if t in METHODS:
        return {"method": t}
    for prefix, sampling in TREE_PREFIXES.items():
        if t.startswith(prefix):
            shape = t[len(prefix) :]
            if not shape:
                raise ValueError(f"method {text!r} needs a tree shape after {prefix!r}, e.g. {prefix}kary:2x3")
            return {"method": "tree", "tree": shape, "tree_sampling": sampling}
    if t.startswith("sorted@"):
        return {"method": "sorted", **_sorted_parts(t[len("sorted@") :], text)}
    if t.startswith("eagle:"):
        if not t[len("eagle:") :]:
            raise ValueError(f"method {text!r} needs a tree after 'eagle:', e.g. eagle:kary:2x3 or eagle:dynamic:12")
        return {"method": "eagle", "tree": t[len("eagle:") :]}
    raise ValueError(f"unknown speculative method {text!r}; use {grammar()}")


def parse_method(text: str, **options) -> SpeculativeConfig:
    """The validated SpeculativeConfig of a method string plus other options (num_speculative_tokens,
    prompt_lookup_min, ...). An option the string already sets must agree with it: 'tree:kary:2x3' with
    tree='chain:4' is refused, naming both."""
    given = method_fields(text)
    merged = dict(given)
    for key, value in options.items():
        if value is None or key == "method":
            continue
        if key in given and given[key] != value:
            raise ValueError(
                f"method {text!r} sets {key}={given[key]!r}, but {key}={value!r} is given too; give it once"
            )
        merged[key] = value
    return SpeculativeConfig.of_fields(merged)


def method_name(config: SpeculativeConfig) -> str:
    """The canonical method string of a config (what parse_method reads back to the same fields). One
    setting has no string of its own: a sorted exit's tree drawn other than without replacement
    (sorted_exit + tree + tree_sampling 'iid' / 'hub'); its name is that of the same tree drawn without
    replacement, and the options say the rest."""
    if config.method is None:
        return "none"
    if config.method == "tree":
        return _PREFIX_OF_SAMPLING[config.tree_sampling] + str(config.tree)
    if config.method == "eagle":
        return "eagle" + (f":{config.tree}" if config.tree else "")
    if config.method == "sorted":
        if config.sorted_exits:
            return "sorted@" + "+".join(str(e) for e in config.sorted_exits)
        if config.sorted_exit is not None:
            return f"sorted@{config.sorted_exit}" + (f":{config.tree}" if config.tree else "")
        return "sorted"
    return config.method


def uses_draft(config: SpeculativeConfig) -> bool:
    return METHODS.get(config.method, False)
