"""Drafter names -> constructors: what `--drafter NAME[:ARG][@K]` (CLI, bench, tune-tree) means.

The CLI's name list, its parser and `tune-tree`'s tree drafters all come from `REGISTRY`. Adding
a drafter is its own file plus one `register(...)` line here (or in the user's code: the
registry is a plain dict).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from specjax.drafters.shapes import DynamicTree, StaticTree
from specjax.engine.protocol import Drafter

if TYPE_CHECKING:
    from specjax.model import Model

# Medusa's static tree when none is given (depth 4: needs 4 heads).
MEDUSA_TREE = "eagle_small"
# The EAGLE tree shape used when none is given: measured best on the 2-core CPU for SmolLM2
# (`specjax tune-tree --drafter eagle3_tree --candidates 4:3:2,6:4:3,7:4:3,8:4:3,11:5:3,15:5:4
# --limit 16 --max-new-tokens 96 --repeats 2` on the package's tuning questions, 2026-12-05:
# 7 nodes 42.0 tok/s, 8 nodes 33.8; with the root a verify block of 8 tokens, which CPU's
# row-reduction kernel reads the weights once for, `llama.ROW_REDUCE_ROWS`).
EAGLE_TREE = dict(nodes=7, depth=4, top_k=3)
# The static EAGLE tree (`eagle3_static`; specjax/configs/trees/), whose children are drawn from
# the drafter's law at temperature > 0: chosen by tau at temperature 1 (the preset says how).
EAGLE_STATIC_TREE = "eagle_static7"


@dataclasses.dataclass(frozen=True)
class DrafterEntry:
    """One CLI drafter name.

    `make(arg, k, model, tree)` -> Drafter: `arg` is the text after ':' ("" when absent), `k` the
    draft size from `@K` or `--k` (None: the drafter's default), `model` the target (some
    drafters read its name or dtype), `tree` a `DynamicTree` to use instead of the default (only
    for entries with `tree=True`; `tune-tree` passes its candidates). Entries with
    `per_decode=True` are also given the decode's `temperature=` and `batch=` (rows) ("auto":
    what pays when greedy need not when sampling, nor at a larger batch)."""

    name: str
    make: Callable[..., Drafter]
    arg: str = ""  # what ":ARG" names, e.g. "PATH" ("" = takes none)
    arg_required: bool = False
    arg_type: Callable = str  # checks ARG before any model is loaded (raises ValueError)
    tree: bool = False  # drafts a dynamic tree (`tune-tree` can size it)
    per_decode: bool = False  # make(..., temperature=, batch=) chooses for the decode

    @property
    def usage(self) -> str:
        if not self.arg:
            return self.name
        return f"{self.name}:{self.arg}" if self.arg_required else f"{self.name}[:{self.arg}]"


REGISTRY: dict[str, DrafterEntry] = {}


def register(entry: DrafterEntry) -> DrafterEntry:
    REGISTRY[entry.name] = entry
    return entry


def names() -> list[str]:
    """Usage strings of every registered drafter (for help texts and errors)."""
    return [e.usage for e in REGISTRY.values()]


@dataclasses.dataclass(frozen=True)
class DrafterName:
    """A parsed `NAME[:ARG][@K]`."""

    entry: DrafterEntry
    arg: str
    k: int | None


def parse(text: str) -> DrafterName | None:
    """Check a drafter name without loading anything (None: no drafter). Raises ValueError
    naming what is wrong and what is valid."""
    if text in (None, "", "none", "ar"):
        return None
    for combined in (CASCADE, HYBRID, HYBRID_MERGE, HORIZONTAL):  # their parts carry their own @K
        if text.startswith(combined + ":"):
            entry, arg = REGISTRY[combined], text[len(combined) + 1 :]
            try:
                entry.arg_type(arg)
            except ValueError as e:
                raise ValueError(f"bad {combined} {text!r}: {e} (usage: {entry.usage})") from None
            return DrafterName(entry, arg, None)
    name, at, k_text = text.partition("@")
    k = None
    if at:
        if not k_text.isdigit() or int(k_text) <= 0:
            raise ValueError(f"bad draft size in {text!r}: use NAME@K with K a positive int")
        k = int(k_text)
    base, colon, arg = name.partition(":")
    entry = REGISTRY.get(base)
    if entry is None:
        raise ValueError(f"unknown drafter {base!r}; valid: {', '.join(names())}, none")
    if colon and not entry.arg:
        raise ValueError(f"drafter {base!r} takes no ':{arg}' (usage: {entry.usage})")
    if entry.arg_required and not arg:
        raise ValueError(f"drafter {base!r} needs an argument: {entry.usage}")
    if arg:
        try:
            entry.arg_type(arg)
        except ValueError as e:
            why = f": {e}" if str(e) and str(e) != arg else ""  # int() and friends repeat it
            raise ValueError(
                f"bad {entry.arg} {arg!r} in drafter {text!r}{why} (usage: {entry.usage})"
            ) from None
    return DrafterName(entry, arg, k)


def make(
    text: str,
    k: int | None = None,
    model: Model | None = None,
    tree: DynamicTree | None = None,
    temperature: float = 0.0,
    batch: int = 1,
) -> Drafter | None:
    """Build the drafter `text` names for target `model`. `@K` in the name overrides `k`;
    `temperature` and `batch` (the decode's, in rows) reach the entries that choose by them
    ("auto")."""
    parsed = parse(text)
    if parsed is None:
        return None
    if tree is not None and not parsed.entry.tree:
        raise ValueError(
            f"drafter {parsed.entry.name!r} drafts no dynamic tree; tree drafters: "
            f"{', '.join(e.usage for e in REGISTRY.values() if e.tree)}"
        )
    k = parsed.k if parsed.k is not None else k
    if parsed.entry.per_decode:
        return parsed.entry.make(parsed.arg, k, model, tree, temperature=temperature, batch=batch)
    return parsed.entry.make(parsed.arg, k, model, tree)


# ----------------------------------------------------------------------------- built-ins


def _or(k: int | None, default: int) -> int:
    """`k` when given (0 stays 0 and is refused by the drafter), else the default."""
    return default if k is None else k


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def bundled_for(kind: str, model: Model | None) -> str:
    """The bundled drafter of `model` for eagle / eagle3 / medusa names without a PATH."""
    from specjax.drafters.bundled import BUNDLED_DRAFTERS

    name = f"{getattr(model, 'name', '')}-{kind}"
    if name not in BUNDLED_DRAFTERS:
        raise ValueError(
            f"no bundled {kind} drafter for model {getattr(model, 'name', '?')!r} "
            f"(bundled: {sorted(BUNDLED_DRAFTERS)}); give one as {kind}:PATH or "
            f"train one with `specjax train-drafter`"
        )
    return name


def _ngram(arg: str, k: int | None, model: Model | None, tree: DynamicTree | None) -> Drafter:
    from specjax.drafters import ngram

    if tree is not None:  # a tune-tree candidate of N nodes, top_k K: K branches of N // K
        return ngram(k=max(1, tree.nodes // tree.top_k), branches=tree.top_k)
    branches = int(arg) if arg else 1
    return ngram(k=_or(k, 7 if branches == 1 else 4), branches=branches)


def _ngram_fixed(  # always verifies k tokens after a match
    arg: str, k: int | None, model: Model | None, tree: DynamicTree | None
) -> Drafter:
    from specjax.drafters import ngram

    return ngram(k=_or(k, 8), adaptive=False)


def _existing_path(text: str) -> str:
    import os

    if not os.path.exists(text):
        raise ValueError(f"no such file or directory: {text!r}")
    return text


def _ngram_store(arg: str, k: int | None, model: Model | None, tree: DynamicTree | None) -> Drafter:
    """ngram_store:PATH: the n-gram chain that also retrieves from the documents at PATH
    (`ngram.read_documents`), tokenized with the target's tokenizer."""
    from specjax.drafters import ngram
    from specjax.drafters.ngram import read_documents

    if model is None or getattr(model, "tokenizer", None) is None:
        raise ValueError("ngram_store needs a target with a tokenizer to tokenize its documents")
    docs = [model.encode(text, chat=False) for text in read_documents(arg)]
    return ngram(k=_or(k, 7), datastore=docs)


def _dynamic(tree: DynamicTree | None, k: int | None, default: dict | None = None) -> DynamicTree:
    default = default or {}
    return tree or DynamicTree(**dict(default, nodes=_or(k, default.get("nodes", 8))))


def eagle_tree(tree: DynamicTree | None, k: int | None) -> DynamicTree:
    """The dynamic tree an EAGLE tree entry drafts: `tree` when given, else `EAGLE_TREE` with
    `k` nodes when given (`eagle3_tree@7`)."""
    return _dynamic(tree, k, EAGLE_TREE)


def _layer_skip(is_tree: bool) -> Callable[..., Drafter]:
    def make(arg: str, k: int | None, model: Model | None, tree: DynamicTree | None) -> Drafter:
        from specjax.drafters import layer_skip

        return layer_skip(
            layers=int(arg) if arg else 8, k=_or(k, 4), tree=_dynamic(tree, k) if is_tree else None
        )

    return make


def _small_model(is_tree: bool) -> Callable[..., Drafter]:
    def make(arg: str, k: int | None, model: Model | None, tree: DynamicTree | None) -> Drafter:
        from specjax import load_model
        from specjax.drafters import small_model

        draft = load_model(arg, dtype=None if model is None else model.dtype)
        return small_model(draft, k=_or(k, 5), tree=_dynamic(tree, k) if is_tree else None)

    return make


def _eagle(kind: str, is_tree: bool) -> Callable[..., Drafter]:
    def make(arg: str, k: int | None, model: Model | None, tree: DynamicTree | None) -> Drafter:
        from specjax.drafters import eagle

        src = arg or bundled_for(kind, model)
        return eagle(src, k=_or(k, 4), tree=eagle_tree(tree, k) if is_tree else None, name=src)

    return make


def _eagle_static(kind: str) -> Callable[..., Drafter]:
    def make(arg: str, k: int | None, model: Model | None, tree: DynamicTree | None) -> Drafter:
        from specjax.drafters import eagle

        shape = StaticTree(EAGLE_STATIC_TREE)
        if k is not None and k != shape.nodes:
            raise ValueError(
                f"{kind}_static drafts the {shape.nodes}-node tree {EAGLE_STATIC_TREE!r} "
                f"(specjax/configs/trees/), got @{k}; for another shape use "
                f"drafters.eagle(..., tree=drafters.StaticTree(choices))"
            )
        src = arg or bundled_for(kind, model)
        return eagle(src, tree=shape, name=src)

    return make


def _medusa(is_tree: bool) -> Callable[..., Drafter]:
    def make(arg: str, k: int | None, model: Model | None, tree: DynamicTree | None) -> Drafter:
        from specjax.drafters import medusa

        src = arg or bundled_for("medusa", model)
        return medusa(src, k=k, tree=StaticTree(MEDUSA_TREE) if is_tree else None)

    return make


register(DrafterEntry("ngram", _ngram, arg="BRANCHES", arg_type=_positive_int, tree=True))
register(DrafterEntry("ngram_fixed", _ngram_fixed))
register(
    DrafterEntry(
        "ngram_store", _ngram_store, arg="PATH", arg_required=True, arg_type=_existing_path
    )
)
register(DrafterEntry("layer_skip", _layer_skip(False), arg="LAYERS", arg_type=_positive_int))
register(
    DrafterEntry(
        "layer_skip_tree", _layer_skip(True), arg="LAYERS", arg_type=_positive_int, tree=True
    )
)
register(DrafterEntry("model", _small_model(False), arg="PATH", arg_required=True))
register(DrafterEntry("model_tree", _small_model(True), arg="PATH", arg_required=True, tree=True))
register(DrafterEntry("eagle3", _eagle("eagle3", False), arg="PATH"))
register(DrafterEntry("eagle3_tree", _eagle("eagle3", True), arg="PATH", tree=True))
register(DrafterEntry("eagle3_static", _eagle_static("eagle3"), arg="PATH"))
register(DrafterEntry("eagle", _eagle("eagle", False), arg="PATH"))
register(DrafterEntry("eagle_tree", _eagle("eagle", True), arg="PATH", tree=True))
register(DrafterEntry("medusa", _medusa(False), arg="PATH"))
register(DrafterEntry("medusa_tree", _medusa(True), arg="PATH"))
# The entries that measure on the device ("auto", "eagle3_tree_sized") are registered by
# `specjax.autotune`, which measures (imported with the package).

CASCADE = "cascade"


def _cascade_arg(arg: str) -> tuple[list[str], float]:
    """'A>B[>C...][~L]' -> (the level names, each checked, smallest first; the leniency L,
    1 when absent: every level accepts the draft below it within a factor L, see
    `drafters.cascade`). A '~' followed by a path or another level is part of a name."""
    levels_text, tilde, tail = arg.rpartition("~")
    if not tilde or any(c in tail for c in "/>:@"):
        levels_text, tilde = arg, ""
    leniency = _leniency(tail) if tilde else 1.0
    levels = levels_text.split(">")
    if len(levels) < 2:
        raise ValueError("a cascade needs >= 2 levels joined by '>', smallest first")
    return _check_parts(levels, "level", "inside a cascade"), leniency


def _leniency(text: str) -> float:
    """The L of 'cascade:...~L', checked as `drafters.cascade` checks it."""
    from specjax.drafters.cascade import check_leniency

    try:
        return check_leniency(float(text))
    except ValueError:
        raise ValueError(
            f"the leniency after '~' must be a finite number >= 1, got {text!r}"
        ) from None


def _check_parts(parts: list[str], what: str, where: str) -> list[str]:
    """Each part of a combined drafter name names a plain drafter (not auto, a cascade or a
    hybrid), checked as `parse` checks it."""
    for part in parts:
        if part.split(":")[0].split("@")[0] in (CASCADE, HYBRID, HYBRID_MERGE, HORIZONTAL, "auto"):
            raise ValueError(f"{what} {part!r} cannot be {where}")
        if parse(part) is None:
            raise ValueError(f"{what} {part!r} names no drafter")
    return parts


def _cascade(arg: str, k: int | None, model: Model | None, tree: DynamicTree | None) -> Drafter:
    """cascade:A>B>C[~L]: A drafts for B, B for C, C for the target; `k` (--k) sizes the top
    level when its name has no @K; `~L` makes every level lenient by the factor L."""
    from specjax.drafters import cascade

    levels, leniency = _cascade_arg(arg)
    made = [make(t, None, model) for t in levels[:-1]] + [make(levels[-1], k, model)]
    return cascade(made, leniency=leniency)


register(
    DrafterEntry(
        CASCADE, _cascade, arg="A>B[>C...][~LENIENCY]", arg_required=True, arg_type=_cascade_arg
    )
)

HYBRID = "hybrid"
HYBRID_MERGE = "hybrid_merge"
HORIZONTAL = "horizontal"
# Suffix match length from which a hybrid row takes the retrieval chain.
HYBRID_MIN_MATCH = 2


def _hybrid_parts(arg: str) -> list[str]:
    """'RETRIEVAL+MODEL' -> the two names, each checked: an n-gram chain and an EAGLE tree."""
    parts = arg.split("+")
    if len(parts) != 2:
        raise ValueError("a hybrid is RETRIEVAL+MODEL, e.g. ngram@6+eagle3_tree")
    return _check_parts(parts, "part", "a part of a hybrid")


def _hybrid_maker(mode: str) -> Callable[..., Drafter]:
    def make_hybrid(
        arg: str, k: int | None, model: Model | None, tree: DynamicTree | None
    ) -> Drafter:
        from specjax.drafters import hybrid

        retrieval, drafter = _hybrid_parts(arg)
        r, m = make(retrieval, None, model), make(drafter, k, model)
        return hybrid(r, m, mode, HYBRID_MIN_MATCH)

    return make_hybrid


# hybrid:R+M (SAM-style switch): R's chain when its match is long enough, else M's tree.
# hybrid_merge:R+M: M's tree with R's chain grafted onto it, one verify forward.
for _name, _mode in ((HYBRID, "switch"), (HYBRID_MERGE, "merge")):
    register(
        DrafterEntry(
            _name,
            _hybrid_maker(_mode),
            arg="RETRIEVAL+MODEL",
            arg_required=True,
            arg_type=_hybrid_parts,
        )
    )


def _horizontal_parts(arg: str) -> list[str]:
    """'FIRST+LATER' -> the two names, each checked: an EAGLE chain, then an n-gram chain."""
    parts = arg.split("+")
    if len(parts) != 2:
        raise ValueError("a horizontal cascade is FIRST+LATER, e.g. eagle3@2+ngram@4")
    return _check_parts(parts, "part", "a part of a horizontal cascade")


def _horizontal(arg: str, k: int | None, model: Model | None, tree: DynamicTree | None) -> Drafter:
    """horizontal:F+L: F's chain for the first positions, L's continuation for the later ones."""
    from specjax.drafters import horizontal

    first, later = _horizontal_parts(arg)
    return horizontal(make(first, None, model), make(later, None, model))


register(
    DrafterEntry(
        HORIZONTAL, _horizontal, arg="FIRST+LATER", arg_required=True, arg_type=_horizontal_parts
    )
)
