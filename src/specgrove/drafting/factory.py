"""The one place that turns a SpeculativeConfig into a proposer (`build_proposer`).

`LLM`, the CLI commands built on it (`generate`, `serve`, `loadtest`) and `bench` all call it, so a
method string means the same proposer everywhere. Each method has one builder in `BUILDERS`; a new
drafter is a module with its proposer plus one `register` line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from specgrove.config import SpeculativeConfig, register_method
from specgrove.drafting.draft_model import DraftModelProposer
from specgrove.drafting.prompt_lookup import PromptLookupProposer
from specgrove.drafting.sorted import sorted_proposer
from specgrove.models.loader import LoadedModel
from specgrove.trees.dynamic import DynamicTree, is_dynamic
from specgrove.trees.sequoia import parse_tree
from specgrove.trees.shape import TreeShape

_UNSET = object()


@dataclass
class ProposerSpec:
    """What a builder gets: the config, the models, the longest sequence the engine will hold, and the
    config's tree resolved (`resolve_shape`)."""

    config: SpeculativeConfig
    target: LoadedModel
    draft: LoadedModel | None
    max_model_len: int
    shape: object = None


def resolve_shape(config: SpeculativeConfig):
    """The config's fixed tree as a TreeShape, or None (a chain of whatever length the engine asks for).
    'auto' is tuned by running the engine, above this layer: `specgrove.tuning.resolve_shape` resolves it."""
    if config.tree is None:
        return None
    if config.method == "eagle" and is_dynamic(config.tree):
        return DynamicTree.parse(config.tree)
    if config.tree == "auto":
        raise ValueError(
            "tree 'auto' is tuned on this machine: resolve it with specgrove.tuning.resolve_shape "
            "(LLM and bench do) and pass the shape"
        )
    return parse_tree(config.tree)


def draft_tokens(config: SpeculativeConfig, shape) -> int:
    """Draft tokens per step for the engine: 0 without speculation, a fixed tree's size, the largest tree
    'auto' may choose, else the config's num_speculative_tokens."""
    if config.method is None:
        return 0
    return config.num_speculative_tokens if shape is None else shape_size(shape)


def shape_size(shape) -> int:
    """Nodes of a TreeShape; the most an AutoTree may choose."""
    return len(shape) if isinstance(shape, TreeShape) else shape.max_nodes


def _needs_draft(spec: ProposerSpec) -> LoadedModel:
    if spec.draft is None:
        raise ValueError(f"speculative method {spec.config.method!r} needs a draft model")
    return spec.draft


def _draft_model(spec: ProposerSpec):
    return DraftModelProposer(_needs_draft(spec), spec.max_model_len, spec.shape, spec.config.tree_sampling)


def _sorted(spec: ProposerSpec):
    c = spec.config
    exits = c.sorted_exits if c.sorted_exits is not None else c.sorted_exit
    target = spec.target.name if spec.target is not None else None
    return sorted_proposer(
        _needs_draft(spec), spec.max_model_len, exits, c.sorted_thresholds, spec.shape, c.tree_sampling, target
    )


def _eagle(spec: ProposerSpec):
    from specgrove.drafting.eagle import EagleProposer
    from specgrove.models.eagle import default_head_dir, load_eagle_head

    c = spec.config
    head = load_eagle_head(c.eagle_head or default_head_dir(spec.target), spec.target)  # loaded once per target
    lookup = PromptLookupProposer(c.prompt_lookup_min, c.prompt_lookup_max)
    return EagleProposer(head, spec.max_model_len, spec.shape, c.tree_sampling, lookup)


def _prompt_lookup(spec: ProposerSpec):
    return PromptLookupProposer(spec.config.prompt_lookup_min, spec.config.prompt_lookup_max)


# method -> builder (`register`)
BUILDERS: dict[str, Callable[[ProposerSpec], object]] = {}


def register(name: str, builder: Callable[[ProposerSpec], object], *, needs_draft: bool = False) -> None:
    """Make `name` a method everywhere: the method language (`config.parse_method`, hence `LLM`, `generate`,
    `serve`, `loadtest`, `bench`) reads it and `build_proposer` builds it with `builder(spec)`. `needs_draft`:
    the proposer runs a draft model, which the entry points then load."""
    register_method(name, needs_draft)
    BUILDERS[name] = builder


# one line per drafter ("tree" is the draft model drafting the config's tree)
register("draft_model", _draft_model, needs_draft=True)
register("tree", _draft_model, needs_draft=True)
register("sorted", _sorted, needs_draft=True)
register("prompt_lookup", _prompt_lookup)
register("eagle", _eagle)


def build_proposer(
    config: SpeculativeConfig, target: LoadedModel, draft: LoadedModel | None, max_model_len: int, shape=_UNSET
):
    """(proposer, draft tokens per step) of a validated config; (None, 0) without speculation. `shape`: the
    config's tree resolved by the caller (`resolve_shape`, or `specgrove.tuning.resolve_shape` for 'auto');
    by default a fixed tree is parsed here."""
    if config.method is None:
        return None, 0
    builder = BUILDERS.get(config.method)
    if builder is None:
        raise ValueError(f"no proposer is registered for method {config.method!r}; known: {', '.join(BUILDERS)}")
    if shape is _UNSET:
        shape = resolve_shape(config)
    proposer = builder(ProposerSpec(config, target, draft, max_model_len, shape))
    return proposer, draft_tokens(config, shape)
