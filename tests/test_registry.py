"""The drafter registry: CLI names come from it, and a new drafter is one file plus one line."""

from __future__ import annotations

import numpy as np
import pytest

import specjax
from specjax import cli
from specjax.drafters import registry

from conftest import RAGGED_PROMPTS
from repeat_drafter import repeat_last


def test_new_drafter_is_one_file_and_one_registry_line(target, monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "repeat_last", None)  # restored after the test
    # The one registry line:
    registry.register(
        registry.DrafterEntry("repeat_last", lambda arg, k, model, tree: repeat_last(k=k or 3))
    )
    assert "repeat_last" in registry.names()
    d = cli.make_drafter("repeat_last@4", None, target)
    assert d.k == 4
    ar = specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=20)
    out = specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=20, drafter=d)
    assert out.tokens == ar.tokens
    # It verified real drafts (the target repeats tokens sometimes: some were accepted).
    hist = np.asarray(out.stats["acceptance_histogram"])
    assert len(hist) == 5 and hist.sum() > 0


def test_cli_names_come_from_the_registry():
    for entry in registry.REGISTRY.values():
        assert entry.usage in cli._drafter_usage()
    with pytest.raises(ValueError, match="unknown drafter 'nope'; valid: ngram"):
        registry.parse("nope")
    with pytest.raises(ValueError, match="bad LAYERS 'abc'"):
        registry.parse("layer_skip:abc")
    with pytest.raises(ValueError, match="needs an argument: model:PATH"):
        registry.parse("model")
    with pytest.raises(ValueError, match="takes no ':3'"):
        registry.parse("ngram_fixed:3")
    with pytest.raises(ValueError, match="NAME@K with K a positive int"):
        registry.parse("ngram@0")
    assert registry.parse("none") is None
    parsed = registry.parse("layer_skip_tree:4@6")
    assert (parsed.entry.name, parsed.arg, parsed.k) == ("layer_skip_tree", "4", 6)
