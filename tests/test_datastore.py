"""REST-style retrieval from a user-given datastore (specjax/drafters/ngram.py): documents of
token ids indexed once on the host, searched on device by binary search, drafted by the n-gram
chain when the store's match is longer than the history's.

- The search against brute force on 64 random rows (longest match, a continuation that exists).
- Greedy: identical to plain decoding on a ragged batch, with a store holding the answers of
  other prompts; the store's drafts are accepted (more accepted tokens than the n-gram alone).
- Sampling: test_spec_sampling's chi-square of the (t1, t2, t3) joint (8192 rows, the same
  power), with a random-document store that out-matches the history, and a negative control
  (accept every draft token) that the same fit rejects.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax.drafters.ngram import SEPARATOR, index_datastore, search_datastore

from test_spec_sampling import (  # noqa: F401  (`exact` and `models` are fixtures)
    ALPHA,
    MODES,
    V,
    assert_follows_target,
    broken_verify_chain,
    chi_square,
    exact,
    models,
    patched_verify_chain,
    sample_joint,
)


def _brute_force(corpus, query_hist, k, sizes):
    """Longest n with a match followed by a token, and every continuation such a match has."""
    S = len(corpus)
    for n in sorted(sizes, reverse=True):
        q = query_hist[len(query_hist) - n :]
        conts = []
        for p in range(S - n):
            if np.array_equal(corpus[p : p + n], q) and corpus[p + n] != SEPARATOR:
                c = corpus[p + n : p + n + k].copy()
                past_end = np.cumsum(c == SEPARATOR) > 0
                conts.append(np.where(past_end, c[0], c).tolist())
        if conts and len(query_hist) >= n:
            return n, conts
    return 0, []


def test_search_matches_brute_force():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 20, rng.integers(0, 30)).tolist() for _ in range(40)]
    store = index_datastore(docs, 3, 4)
    hist = rng.integers(0, 20, (64, 16))
    for b in range(0, 64, 2):  # half the rows end with 3 tokens of some document
        d = docs[b % 40]
        if len(d) >= 4:
            i = rng.integers(0, len(d) - 3)
            hist[b, 10:13] = d[i : i + 3]
    hist[1::8, 12] = 25  # a token no document holds: no match
    hist_len = np.full(64, 13)
    hist_len[3::16], hist_len[5::16] = 1, 2  # histories shorter than the longest n-gram
    search = jax.jit(search_datastore, static_argnums=(3, 4))
    cont, n = search(store, jnp.asarray(hist), jnp.asarray(hist_len), (3, 2, 1), 4)
    corpus = np.asarray(store.tokens)
    seen = set()
    for b in range(64):
        want_n, conts = _brute_force(corpus, hist[b, : hist_len[b]], 4, (1, 2, 3))
        assert int(n[b]) == want_n, b
        if want_n:
            assert np.asarray(cont[b]).tolist() in conts, b
        seen.add(want_n)
    assert seen == {0, 1, 2, 3}  # every outcome was exercised


def test_a_match_that_ends_a_document_does_not_hide_one_that_continues():
    store = index_datastore([[1, 2, 3], [1, 2, 3, 4, 5]], 3, 3)
    hist = jnp.asarray([[9, 1, 2, 3]])
    cont, n = search_datastore(store, hist, jnp.asarray([4]), (3, 2, 1), 3)
    assert int(n[0]) == 3 and cont[0].tolist() == [4, 5, 4]  # past the end: a guess


def test_bad_datastores_are_refused():
    with pytest.raises(ValueError, match="at least one non-empty document"):
        specjax.drafters.ngram(datastore=[[]])
    with pytest.raises(ValueError, match="document 1 holds token id -4"):
        specjax.drafters.ngram(datastore=[[1, 2], [3, -4]])
    with pytest.raises(ValueError, match="token id 2147483647; valid: 0 <= id < 2147483647"):
        specjax.drafters.ngram(datastore=[[2**31 - 1]])
    with pytest.raises(ValueError, match="serves an n-gram chain"):
        specjax.drafters.ngram(branches=2, datastore=[[1, 2, 3]])


@pytest.mark.parametrize("mode", ["switch", "merge"])
def test_hybrid_retrieves_from_a_store(target, mode):
    """A hybrid's retrieval chain reads the store too: greedy output unchanged, and with a store
    of the answers the retrieval branch serves more steps and accepted tokens than without."""
    from test_eagle import random_eagle

    from conftest import RAGGED_PROMPTS

    new = 16
    ar = specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=new)
    docs = [p + t for p, t in zip(RAGGED_PROMPTS, ar.tokens)]
    tree = specjax.drafters.DynamicTree(nodes=6, depth=3, top_k=2)
    eagle = specjax.drafters.eagle(random_eagle(target, 3, seed=2), tree=tree)
    got = {}
    for name, store in (("plain", None), ("store", docs)):
        ret = specjax.drafters.ngram(max_ngram=3, k=4, datastore=store)
        d = specjax.drafters.hybrid(ret, eagle, mode=mode, min_match=2)
        out = specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=new, drafter=d)
        assert out.tokens == ar.tokens, name
        got[name] = out.stats["hybrid"]
    print(mode, got)
    for key in ("retrieval_steps", "retrieval_accepted"):
        assert got["store"][key] > got["plain"][key], (key, got)


def test_datastore_greedy_equals_ar(target):
    from conftest import RAGGED_PROMPTS

    new = 16
    ar = specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=new)
    # The store holds each prompt's own answer, so its continuations are right.
    docs = [p + t for p, t in zip(RAGGED_PROMPTS, ar.tokens)]
    plain = specjax.drafters.ngram(max_ngram=3, k=4, adaptive=False)
    store = specjax.drafters.ngram(max_ngram=3, k=4, adaptive=False, datastore=docs)
    got = {}
    for name, d in (("plain", plain), ("store", store)):
        out = specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=new, drafter=d)
        assert out.tokens == ar.tokens, name
        hist = np.asarray(out.stats["acceptance_histogram"])
        got[name] = (hist * np.arange(len(hist))).sum()  # accepted draft tokens
        one = specjax.generate(target, RAGGED_PROMPTS[2:3], max_new_tokens=new, drafter=d)
        assert one.tokens == ar.tokens[2:3], name
    print(got)
    assert got["store"] > got["plain"], got


def _store_drafter():
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, V, 40).tolist() for _ in range(60)]  # most 3-grams occur
    return specjax.drafters.ngram(max_ngram=3, k=2, adaptive=False, datastore=docs)


def test_the_store_outmatches_the_history():
    """In the sampling test's setting the store drafts most steps: after the prompt and any two
    sampled tokens its match is longer than the history's for most pairs (the history wins
    ties)."""
    from specjax.drafters.ngram import NgramState

    from test_spec_sampling import PROMPT

    spec, store = _store_drafter().binder(None)
    pairs = np.array([(a, b) for a in range(V) for b in range(V)])
    hist = jnp.asarray([PROMPT + list(p) + [0] * 4 for p in pairs], jnp.int32)
    state = NgramState(hist=hist, hist_len=jnp.full((len(pairs),), len(PROMPT) + 2, jnp.int32))
    _, n_both, _ = spec.match(store, state, hist[:, 0])
    alone = dataclasses.replace(spec, datastore=False)
    _, n_hist, _ = alone.match(None, state, hist[:, 0])
    wins = float(np.mean(np.asarray(n_both) > np.asarray(n_hist)))
    print(f"the store's match is longer for {wins:.0%} of the (t1, t2) pairs")
    assert wins > 0.5, wins


def test_datastore_sampling_matches_target(models, exact):
    target, _ = models
    counts, st = sample_joint(target, _store_drafter(), MODES["plain"], seed=6161)
    hist = np.asarray(st["acceptance_histogram"])
    assert_follows_target(counts, exact["plain"]["joint"], hist, "ngram+datastore/plain")
    assert hist[0] >= 0.05 * hist.sum() and hist[1:].sum() >= 0.05 * hist.sum(), hist


def test_datastore_broken_rule_is_detected(models, exact, monkeypatch):
    target, _ = models
    broken = broken_verify_chain("accept_all")
    with patched_verify_chain(monkeypatch, broken):
        counts, _ = sample_joint(target, _store_drafter(), MODES["plain"], seed=6162)
    assert broken.traced > 0
    fit = chi_square(counts, exact["plain"]["joint"])
    print(f"datastore with accept_all: {fit}")
    assert fit.pvalue < ALPHA, fit


def test_documents_from_files(tmp_path):
    from specjax.drafters.ngram import read_documents

    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "a.txt").write_text("the cat sat")
    (tmp_path / "store" / "b.jsonl").write_text('"the dog"\n\n{"text": "on the log"}\n')
    (tmp_path / "store" / ".hidden").write_text("skipped")
    assert read_documents(str(tmp_path / "store")) == ["the cat sat", "the dog", "on the log"]
    (tmp_path / "bad.jsonl").write_text('"ok"\n{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected a JSON string"):
        read_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1: not JSON"):
        read_documents(str(tmp_path / "broken.jsonl"))


def test_cli_name_reads_a_store(tiny_dir, tmp_path):
    """`--drafter ngram_store:PATH`: the documents at PATH, tokenized with the target's
    tokenizer, drafted from (greedy output unchanged, more tokens accepted than without)."""
    from specjax.drafters import registry

    model = specjax.load_model(tiny_dir)
    prompt = "the cat"
    ar = specjax.generate(model, prompt, max_new_tokens=12)
    store = tmp_path / "answers.jsonl"
    store.write_text(json.dumps(prompt + ar.text[0]) + "\n")
    with pytest.raises(ValueError, match="no such file or directory"):
        registry.parse(f"ngram_store:{tmp_path / 'missing'}")
    d = registry.make(f"ngram_store:{store}@4", model=model)
    out = specjax.generate(model, prompt, max_new_tokens=12, drafter=d)
    assert out.tokens == ar.tokens
    assert sum(out.stats["acceptance_histogram"][1:]) > 0, out.stats
