"""`specjax.autotune` on a tiny random model: the verify cost table (every size, both masks), the
correctness anchors of the timed verify forward (a chain tree equals causal verification; every
node of a random tree sees exactly its root path), tree-size tuning, and the CLI commands.
No timing assertions: speed is for benchmarks, not unit tests."""

from __future__ import annotations

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax import autotune, bench, cli, drafters
from specjax.engine import tree as tree_lib


@pytest.fixture(scope="module")
def model(make_hf_model):
    return specjax.model_from_hf(make_hf_model("llama", seed=5))


def test_verify_cost_table_is_sane(model):
    sizes = (1, 3, 8)
    table = autotune.verify_cost_table(model, sizes, prompt_len=24, repeats=2, progress=False)
    assert sorted(table) == list(sizes)
    for causal, tree in table.values():
        assert np.isfinite(causal) and np.isfinite(tree) and causal > 0 and tree > 0
    md = autotune.cost_markdown(table).splitlines()
    assert md[0].startswith("| T | causal ms | tree ms | tree/causal |") and len(md) == 2 + len(
        sizes
    )
    assert md[2].endswith("| 1.00x |")  # T=1 relative to itself
    with pytest.raises(ValueError, match="positive"):
        autotune.verify_cost_table(model, (0, 2), progress=False)


def _verify(model, tokens, parents, prefix=10, max_len=40):
    cache = autotune.prefilled_cache(model, tokens.shape[0], prefix, max_len, seed=1)
    logits, _ = autotune.verify_forward(model.params, tokens, parents, cache, cfg=model.config)
    return np.asarray(logits)


def test_chain_tree_verify_equals_causal_verify(model):
    B, T = 2, 7
    tokens = jnp.asarray(
        np.random.default_rng(0).integers(0, model.config.vocab_size, (B, T)), jnp.int32
    )
    chain = jnp.broadcast_to(jnp.asarray(tree_lib.chain_parents(T - 1)), (B, T - 1))
    causal = _verify(model, tokens, None)
    np.testing.assert_array_equal(_verify(model, tokens, chain), causal)
    assert np.abs(causal).max() > 1.0  # a non-degenerate model: the check has teeth


def test_random_tree_nodes_see_their_root_path(model):
    B, N = 2, 6
    rng = np.random.default_rng(1)
    parents = autotune.random_parents(rng, B, N)
    assert ((parents >= -1) & (parents < np.arange(N))).all() and (parents[:, 0] == -1).all()
    tokens = rng.integers(0, model.config.vocab_size, (B, N + 1)).astype(np.int32)
    tree_logits = _verify(model, jnp.asarray(tokens), jnp.asarray(parents))
    for b in range(B):
        for i in range(N):
            path, p = [i], parents[b, i]
            while p >= 0:
                path, p = [p] + path, parents[b, p]
            chain = np.concatenate([tokens[b, :1], tokens[b, 1:][path]])
            # Same B-row cache (row b holds the same prefix K/V), the path as a causal chain.
            ref = _verify(model, jnp.asarray(np.tile(chain, (B, 1))), None)[b, -1]
            np.testing.assert_allclose(tree_logits[b, i + 1], ref, rtol=1e-5, atol=1e-5)


def test_tune_tree_rotates_which_candidate_runs_first(model, monkeypatch):
    """The first decode after a prompt change ran slower on the 2-core VM: prompt p starts with
    candidate p mod n, so that cost is spread over the candidates, not always plain decoding's."""
    import types

    from specjax import api

    order = []

    def fake_generate(model, prompts, *, drafter=None, **kw):
        order.append(drafter.name)
        return types.SimpleNamespace(stats={"new_tokens": 4, "total_s": 1.0, "tau": 1.0})

    monkeypatch.setattr(api, "generate", fake_generate)
    make = lambda c: types.SimpleNamespace(name=c)  # noqa: E731
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]  # one prompt-length bucket
    _, table = autotune.tune_tree(model, make, prompts, candidates=["a", "b", "c"], progress=False)
    assert order[:3] == ["a", "b", "c"]  # compiling, once per bucket
    assert order[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [r["prompt_tokens_per_s"] for r in table] == [[4.0] * 3] * 3


def test_tune_tree_decodes_prompts_in_batches(model, monkeypatch):
    """`tune_tree(batch=B)`: each call decodes B consecutive prompts; a "prompt" of the table
    (its per-prompt speeds, its keys) is one such group, and prompts that do not fill whole
    batches are refused."""
    import types

    from specjax import api

    calls = []

    def fake_generate(model, prompts, *, drafter=None, key=None, **kw):
        calls.append((drafter.name, [p[0] for p in prompts], key))
        stats = {"new_tokens": 4 * len(prompts), "total_s": 1.0, "tau": 1.0}
        return types.SimpleNamespace(stats=stats)

    monkeypatch.setattr(api, "generate", fake_generate)
    make = lambda c: types.SimpleNamespace(name=c)  # noqa: E731
    prompts = [[i, 2, 3] for i in range(1, 7)]  # one prompt-length bucket
    kw = dict(candidates=["a", "b"], progress=False, seed=10)
    _, table = autotune.tune_tree(model, make, prompts, batch=2, **kw)
    assert calls[:2] == [("a", [5, 6], 10), ("b", [5, 6], 10)]  # compiling, at batch 2
    assert calls[2:] == [
        ("a", [1, 2], 10),
        ("b", [1, 2], 10),
        ("b", [3, 4], 11),
        ("a", [3, 4], 11),
        ("a", [5, 6], 12),
        ("b", [5, 6], 12),
    ]
    assert [r["prompt_tokens_per_s"] for r in table] == [[8.0] * 3] * 2
    for bad, match in ((4, "6 prompts do not fill batches of 4"), (0, "positive int")):
        with pytest.raises(ValueError, match=match):
            autotune.tune_tree(model, make, prompts, batch=bad, **kw)


def test_tune_tree_returns_a_candidate(model):
    cands = (
        drafters.DynamicTree(nodes=2, depth=2, top_k=2),
        drafters.DynamicTree(nodes=4, depth=2, top_k=2),
    )
    prompts = [[1, 2, 3, 4, 5] * 3, [7, 8, 9, 10]]
    best, table = autotune.tune_tree(
        model,
        lambda t: drafters.layer_skip(1, tree=t),
        prompts,
        cands,
        max_new_tokens=8,
        progress=False,
    )
    assert best in cands
    assert [r["candidate"] for r in table] == list(cands)
    for r, c in zip(table, cands):
        assert r["tokens_per_s"] > 0 and 0 < r["new_tokens"] <= 2 * 8 and r["seconds"] > 0
        assert 1.0 <= r["tau"] <= c.depth + 1
    assert best == max(table, key=lambda r: r["tokens_per_s"])["candidate"]
    md = autotune.tune_markdown(table, best)
    assert md.count("<-") == 1 and len(md.splitlines()) == 2 + len(cands)


def test_cli_bench_verify(tiny_dir, capsys):
    cli.main(
        [
            "bench-verify",
            "--model",
            tiny_dir,
            "--sizes",
            "1,4",
            "--prompt-len",
            "16",
            "--repeats",
            "2",
        ]
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "4"]
    for r in rows:
        causal, tree, ratio = (float(x) for x in r.split("|")[2:5])
        assert causal > 0 and tree > 0 and ratio > 0
    assert "Plain-step floor:" in out and "x the floor" in out


def test_step_bytes_counts_every_weight_and_the_cache(target):
    """The floor's byte count: all params (here the untied embedding table only for the rows
    it looks up) plus K and V of every layer for the prefix."""
    cfg, item = target.config, 4
    b = autotune.step_bytes(target, prefix=10, batch=2)
    everything = sum(x.size for x in jax.tree.leaves(target.params)) * item
    embed = target.params["embed"]
    assert not cfg.tie_word_embeddings
    assert b["weights"] == everything - embed.size * item + 2 * embed.shape[1] * item
    assert b["kv"] == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 10 * 2 * item
    assert b["total"] == b["weights"] + b["kv"]
    assert autotune.read_bandwidth(nbytes=1 << 20, repeats=2) > 0


def test_cli_tune_tree(tiny_dir, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text(
        "\n".join(
            json.dumps({"question_id": i, "category": c, "turns": [t]})
            for i, (c, t) in enumerate(
                [("a", "the cat sat on"), ("b", "the dog"), ("a", "on the mat the")]
            )
        )
    )
    cli.main(
        [
            "tune-tree",
            "--model",
            tiny_dir,
            "--drafter",
            "ngram",
            "--candidates",
            "4:2:2",
            "--questions",
            str(q),
            "--limit",
            "2",
            "--max-new-tokens",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert "on 2 prompts" in out and out.count("k=2, branches=2) |") == 1 and out.count("<-") == 1
    assert "chosen: DynamicTree(nodes=" in out
    with pytest.raises(SystemExit, match="NODES:DEPTH:TOP_K"):
        cli.main(["tune-tree", "--model", tiny_dir, "--candidates", "8:4", "--questions", str(q)])
    with pytest.raises(SystemExit, match="tree drafter"):
        cli.main(
            ["tune-tree", "--model", tiny_dir, "--drafter", "layer_skip:2", "--questions", str(q)]
        )


def test_tune_questions_are_our_own():
    # Settings are chosen on the package's own questions (tune-tree's default), never on the
    # eval files: every MT-bench category twice, and no 6-word n-gram shared with an eval prompt
    # (checked where the shared eval folder exists, as on the development machine).
    from specjax.paths import data_file
    from specjax.train import magpie

    qs = bench.load_questions(bench.tune_questions())
    cats = [q["category"] for q in qs]
    assert len(qs) == 16 and {cats.count(c) for c in set(cats)} == {2}, cats
    eval_dir = data_file("eval")
    if eval_dir:
        evals = magpie.eval_prompt_texts(eval_dir)
        assert len(evals) > 1000
        assert magpie.leaks([q["prompt"] for q in qs], evals, n=6) == []
    # The check would catch a copied eval prompt.
    assert magpie.leaks(
        ["Write a story about x " + "one two three four five six"],
        ["one two three four five six seven"],
        n=6,
    ) == [0]


# ----------------------------------------------------------------------------- drafter="auto"


def test_auto_measures_once_then_reads_its_cache(tiny_dir, tmp_path, monkeypatch):
    """`drafter="auto"`: measured on the model (plain vs n-gram for a model with no bundled
    drafter), cached per model and device, read back without measuring, and greedy output
    equal to plain decoding."""
    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
    model = specjax.load_model(tiny_dir)
    assert autotune.auto_candidates(model) == ["none", "ngram"]
    prompts = ["the cat sat on the mat. the cat sat on", "the dog"]
    choice, table = autotune.choose_drafter(
        model, prompts=prompts, max_new_tokens=12, progress=False
    )
    assert [r["candidate"] for r in table] == ["none", "ngram"]
    assert choice in ("none", "ngram") and all(r["tokens_per_s"] > 0 for r in table)
    (path,) = (tmp_path / "auto").iterdir()
    assert json.loads(path.read_text())["choice"] == choice

    def no_measuring(*a, **k):
        raise AssertionError("measured again although the choice is cached")

    monkeypatch.setattr(autotune, "tune_tree", no_measuring)
    assert autotune.choose_drafter(model)[0] == choice
    ar = specjax.generate(model, prompts, max_new_tokens=12)
    for i, p in enumerate(prompts):  # batch 1: the cached choice (a batch of 2 is raced apart)
        auto = specjax.generate(model, [p], max_new_tokens=12, drafter="auto")
        assert auto.tokens == ar.tokens[i : i + 1]
    named = specjax.generate(model, prompts, max_new_tokens=12, drafter="ngram@3")
    assert named.tokens == ar.tokens


def _fake_tune(speeds: dict, calls: list):
    """A `tune_tree` stand-in: candidate -> tokens/s from `speeds` (a number, or a pair: its
    speed in the first and in the second round), 100 new tokens per prompt."""

    def tune(model, factory, prompts, candidates, **kw):
        second = bool(calls) and calls[-1][1] == autotune.AUTO_SCREEN_PROMPTS
        calls.append((list(candidates), len(prompts)))
        rows = []
        for c in candidates:
            v = speeds[c]
            tps = v[int(second)] if isinstance(v, tuple) else v
            toks = 100.0 * len(prompts)
            tau = 1.0 if c == "none" else 1.5
            row = dict(candidate=c, drafter=c, tokens_per_s=tps, tau=tau, new_tokens=toks)
            rows.append(dict(row, seconds=toks / tps, prompt_tokens_per_s=[tps] * len(prompts)))
        return None, rows

    return tune


@pytest.mark.parametrize(
    "speeds, want", [((100.0, 103.0), "none"), ((100.0, 110.0), "ngram"), ((100.0, 90.0), "none")]
)
def test_auto_needs_a_margin_over_plain_decoding(model, tmp_path, monkeypatch, speeds, want):
    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
    speeds = dict(zip(("none", "ngram"), speeds))
    monkeypatch.setattr(autotune, "tune_tree", _fake_tune(speeds, []))
    assert autotune.choose_drafter(model, progress=False)[0] == want


def test_auto_says_why_it_waits_only_when_it_measures(model, tmp_path, monkeypatch, capsys):
    """The first `auto` call (minutes on a small CPU) says on stderr what it measures, where it
    caches the choice and how to skip it; a cached choice and `progress=False` say nothing."""
    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "tune_tree", _fake_tune({"none": 100.0, "ngram": 120.0}, []))
    assert autotune.choose_drafter(model)[0] == "ngram"
    err = capsys.readouterr().err
    assert "drafter='auto' is timing ngram against plain decoding" in err
    assert "greedy, batch 1" in err
    assert str(tmp_path / "auto") in err and "drafter='ngram'" in err
    assert autotune.choose_drafter(model)[0] == "ngram"  # cached: nothing to say
    autotune.choose_drafter(model, progress=False, temperature=0.7)  # measured, but quiet
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "ngram, slow, want",
    [
        ((130.0, 100.0), 70.0, "ngram"),  # both rounds: 107 tok/s against 100
        ((120.0, 95.0), 70.0, "none"),  # ahead on the screen only: 101 against 100
        ((100.0, 50.0), 84.0, "none"),  # screened out, though faster than plain over all
    ],
)
def test_auto_measures_in_two_rounds(model, tmp_path, monkeypatch, ngram, slow, want):
    """The screening round measures every candidate on `AUTO_SCREEN_PROMPTS` prompts; the second
    only plain decoding and those at least `AUTO_SCREEN` times its speed, on the rest; the choice
    is made on both rounds together, never for a screened-out candidate."""
    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "auto_candidates", lambda m, **kw: ["none", "ngram", "slow"])
    calls = []
    plain = (100.0, 100.0) if slow == 70.0 else (100.0, 50.0)
    speeds = {"none": plain, "ngram": ngram, "slow": slow}
    monkeypatch.setattr(autotune, "tune_tree", _fake_tune(speeds, calls))
    choice, table = autotune.choose_drafter(model, progress=False)
    assert choice == want
    n = len(autotune.auto_prompts())
    assert n > autotune.AUTO_SCREEN_PROMPTS + 10  # the tuning questions joined the six
    six = autotune.AUTO_SCREEN_PROMPTS
    assert calls == [(["none", "ngram", "slow"], six), (["none", "ngram"], n - six)]
    rows = {r["candidate"]: r for r in table}
    assert rows["slow"]["screened_out"] and rows["slow"]["prompts"] == six
    assert not rows["ngram"]["screened_out"] and rows["ngram"]["prompts"] == n
    want_tps = 100.0 * n / (100.0 * six / ngram[0] + 100.0 * (n - six) / ngram[1])
    assert rows["ngram"]["tokens_per_s"] == pytest.approx(want_tps)
    # each prompt's speed, both rounds in order (what `_holds_up` compares with plain's)
    assert rows["ngram"]["prompt_tokens_per_s"] == [ngram[0]] * six + [ngram[1]] * (n - six)
    assert len(rows["slow"]["prompt_tokens_per_s"]) == six


def _noisy(speed: float, n: int, sd: float, seed: int) -> list[float]:
    """`n` per-prompt speeds around `speed`, log-normal noise of standard deviation `sd`."""
    rng = np.random.default_rng(seed)
    return (speed * np.exp(rng.normal(0.0, sd, n))).tolist()


@pytest.mark.parametrize(
    "gain, sd, want",
    [
        (1.20, 0.05, "ngram"),  # 20% faster on every prompt, a little noise
        (1.20, 0.0, "ngram"),  # exactly 20% faster everywhere
        (1.00, 0.28, "none"),  # the same speed: the noise measured between two plain runs
        (0.90, 0.05, "none"),
    ],
)
def test_auto_takes_only_a_lead_beyond_per_prompt_noise(gain, sd, want):
    plain = _noisy(10.0, 21, 0.0, 0)
    mine = [v * gain for v in _noisy(10.0, 21, sd, 1)]
    # the total alone would take it: a lucky lead of 10% (two or three prompts' noise)
    table = [
        {"candidate": "none", "tokens_per_s": 10.0, "prompt_tokens_per_s": plain},
        {"candidate": "ngram", "tokens_per_s": 11.0, "prompt_tokens_per_s": mine},
    ]
    assert autotune._choose(table) == want
    # where the per-prompt speeds are missing (hand-made tables), the margin decides
    bare = [{k: v for k, v in r.items() if k != "prompt_tokens_per_s"} for r in table]
    assert autotune._choose(bare) == "ngram"


def test_auto_lead_test_on_measured_speeds():
    """Per-prompt speeds measured on auto's 21 prompts (2026-12-06 10:07, greedy, 96 tokens):
    the n-gram chain's lead over plain decoding is clear (t 3.3), the hybrid's over the chain
    is not (t 0.55), and plain decoding against itself shows none (t -0.54). The ratios are
    each prompt's speed over plain decoding's, as printed by that run (README, `auto`)."""
    plain = [10.0] * 21  # the test reads ratios only: each prompt's speed over plain's
    again = [1.85, 0.94, 0.93, 1.13, 0.94, 1.40, 0.65, 1.01, 1.05, 0.98, 1.04]
    again += [0.89, 1.04, 1.00, 0.98, 0.80, 0.42, 1.12, 1.09, 0.93, 0.87]
    ngram = [1.65, 0.97, 1.06, 2.60, 1.19, 1.17, 1.86, 1.28, 1.62, 1.05, 1.18]
    ngram += [0.94, 0.95, 1.02, 1.02, 2.17, 1.55, 1.11, 0.98, 0.88, 1.05]
    hybrid = [1.39, 0.90, 1.19, 2.41, 1.26, 0.81, 2.88, 1.25, 1.45, 0.95, 1.49]
    hybrid += [1.04, 1.11, 1.71, 1.54, 1.78, 1.17, 0.94, 0.96, 0.95, 1.10]

    def row(name, ratios):
        return {"candidate": name, "prompt_tokens_per_s": [p * r for p, r in zip(plain, ratios)]}

    base = row("none", [1.0] * 21)
    assert autotune._clearly_faster(row("ngram", ngram), base)
    assert not autotune._clearly_faster(row("none", again), base)
    assert not autotune._clearly_faster(row("hybrid", hybrid), row("ngram", ngram))
    assert autotune._clearly_faster(row("hybrid", hybrid), base)


@pytest.mark.parametrize(
    "speeds, want",
    [
        ((100.0, 106.0, 108.0, 112.0), "hybrid"),  # 112 >= 1.05 x 106
        ((100.0, 106.0, 108.0, 110.0), "ngram"),  # neither costlier one beats 106 by 5%
        ((100.0, 103.0, 101.0, 104.0), "none"),
        ((100.0, 103.0, 101.0, 106.0), "hybrid"),  # against plain: the n-gram was not taken
    ],
)
def test_a_costlier_drafter_must_beat_the_cheaper_one_by_the_margin(speeds, want):
    names = ("none", "ngram", "eagle3_tree_sized", "hybrid")
    table = [{"candidate": n, "tokens_per_s": v} for n, v in zip(names, speeds)]
    assert autotune._choose(table) == want


def test_the_cached_table_is_read_by_this_releases_rule(model, tmp_path, monkeypatch):
    """A cached measurement is chosen from again (its `choice` field is what an older rule
    took): a rule change needs no new measurement."""
    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "auto_candidates", lambda m, **kw: ["none", "ngram", "hybrid"])
    speeds = {"none": 100.0, "ngram": 108.0, "hybrid": 110.0}
    monkeypatch.setattr(autotune, "tune_tree", _fake_tune(speeds, []))
    assert autotune.choose_drafter(model, progress=False)[0] == "ngram"
    (path,) = (tmp_path / "auto").iterdir()
    rec = json.loads(path.read_text())
    path.write_text(json.dumps(dict(rec, choice="hybrid")))
    monkeypatch.setattr(autotune, "tune_tree", None)  # no measuring
    assert autotune.choose_drafter(model, progress=False)[0] == "ngram"


def test_auto_candidates_when_sampling():
    """A model with a bundled EAGLE-3 drafter: the drawn static tree joins the candidates only
    when sampling (greedy, its children would be top-k candidates like the sized tree's)."""
    import types

    smol = types.SimpleNamespace(name="smollm2-135m")
    greedy = ["none", "ngram", "eagle3_tree_sized", "hybrid:ngram+eagle3_tree_sized"]
    assert autotune.auto_candidates(smol) == greedy
    sampled = autotune.auto_candidates(smol, temperature=0.7)
    assert sampled == greedy[:3] + ["eagle3_static"] + greedy[3:]


def test_auto_chooses_per_temperature(model, tmp_path, monkeypatch):
    """Greedy and sampled decoding are measured apart (a copy pays when greedy and may not when
    sampling), each cached in its own file; nearby temperatures share one measurement, and
    `generate(drafter="auto", temperature=T)` and the CLI take the choice for T."""
    from specjax import api, cli

    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
    temps = []

    def tune(model, factory, prompts, candidates, temperature=0.0, **kw):
        temps.append(temperature)
        speeds = {"none": 100.0, "ngram": 120.0 if temperature == 0 else 90.0}
        return _fake_tune(speeds, [])(model, factory, prompts, candidates, **kw)

    monkeypatch.setattr(autotune, "tune_tree", tune)
    assert autotune.choose_drafter(model, progress=False)[0] == "ngram"
    assert set(temps) == {0.0}
    assert autotune.choose_drafter(model, progress=False, temperature=0.97)[0] == "none"
    assert set(temps) == {0.0, 1.0}  # measured at 1.0, the rounded temperature
    greedy = autotune.auto_key(model) + ".json"
    files = {p.name for p in (tmp_path / "auto").iterdir()}
    assert files == {greedy, greedy.replace(".json", "-t1.0.json")}
    sampled = json.loads((tmp_path / "auto" / greedy.replace(".json", "-t1.0.json")).read_text())
    assert sampled["temperature"] == 1.0 and sampled["choice"] == "none"

    def no_measuring(*a, **k):
        raise AssertionError("measured again although the choice is cached")

    monkeypatch.setattr(autotune, "tune_tree", no_measuring)
    assert autotune.choose_drafter(model, progress=False, temperature=1.04)[0] == "none"
    assert api.resolve_drafter(model, "auto", 1.0) is None
    assert api.resolve_drafter(model, "auto").name.startswith("ngram")
    assert cli.make_drafter("auto", None, model, 1.0) is None
    assert cli.make_drafter("auto", None, model).name.startswith("ngram")
    out = specjax.generate(model, [[5, 6, 7]], max_new_tokens=4, drafter="auto", temperature=1.0)
    assert out.stats["new_tokens"] == 4
    with pytest.raises(AssertionError, match="measured again"):  # 0.5: not measured yet
        specjax.generate(model, [[5, 6, 7]], max_new_tokens=4, drafter="auto", temperature=0.5)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            autotune.auto_temperature(bad)
    assert [autotune.auto_temperature(t) for t in (0, 0.01, 0.24, 0.7, 1.5)] == [
        0.0,
        0.1,
        0.2,
        0.7,
        1.5,
    ]
    # A release whose sampling candidates differ (`eagle3_static` joined them in stop 60)
    # measures a cached sampling table of other candidates again; the greedy one still holds.
    more = lambda m, temperature=0.0: ["none", "ngram"] + (["x"] if temperature else [])  # noqa: E731
    monkeypatch.setattr(autotune, "auto_candidates", more)
    with pytest.raises(AssertionError, match="measured again"):
        autotune.choose_drafter(model, progress=False, temperature=1.0)
    assert autotune.choose_drafter(model, progress=False)[0] == "ngram"


def test_auto_chooses_per_batch(model, tmp_path, monkeypatch):
    """A batch verifies the largest block any row asks for, so a drafter that pays at batch 1
    can lose at 4 (measured: the n-gram chain 1.30x plain at batch 1, 0.73x at 4). `auto`
    races its batch-1 choice against plain decoding again at the decode's batch bucket (the
    next power of two), cached apart; a batch-1 choice of plain decoding is kept without
    measuring; `generate`, `resolve_drafter` and the CLI pass the batch."""
    from specjax import api

    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
    calls = []

    def tune(model, factory, prompts, candidates, batch=1, **kw):
        calls.append((list(candidates), len(prompts), batch))
        ngram = {1: 120.0, 2: 130.0, 4: 80.0}[batch]  # per call of `batch` rows
        n = len(prompts) // batch
        rows = [dict(candidate=c, drafter=c, tau=1.0, new_tokens=100.0 * n) for c in candidates]
        for r in rows:
            tps = 100.0 if r["candidate"] == "none" else ngram
            r.update(tokens_per_s=tps, seconds=100.0 * n / tps, prompt_tokens_per_s=[tps] * n)
        return None, rows

    monkeypatch.setattr(autotune, "tune_tree", tune)
    assert [autotune.auto_batch(b) for b in (1, 2, 3, 4, 5, 16, 17)] == [1, 2, 4, 4, 8, 16, 32]
    assert autotune.choose_drafter(model, progress=False)[0] == "ngram"
    n = len(autotune.auto_prompts())
    assert calls[-1][2] == 1
    assert autotune.choose_drafter(model, progress=False, batch=3)[0] == "none"
    # one round: plain decoding and the batch-1 choice, the prompts repeated to whole batches
    assert calls[-1] == (["none", "ngram"], 4 * -(-n // 4), 4)
    assert autotune.choose_drafter(model, progress=False, batch=2)[0] == "ngram"
    assert calls[-1] == (["none", "ngram"], 2 * -(-n // 2), 2)
    few = ["a b c", "d e f"]  # at least AUTO_BATCH_CALLS batches, however few the prompts
    table = autotune.choose_drafter(model, prompts=few, progress=False, batch=4, refresh=True)[1]
    assert calls[-1] == (["none", "ngram"], 4 * autotune.AUTO_BATCH_CALLS, 4)
    assert all(len(r["prompt_tokens_per_s"]) == autotune.AUTO_BATCH_CALLS for r in table)
    greedy = autotune.auto_key(model) + ".json"
    files = {p.name for p in (tmp_path / "auto").iterdir()}
    assert files == {greedy} | {greedy.replace(".json", f"-b{b}.json") for b in (2, 4)}
    rec = json.loads((tmp_path / "auto" / greedy.replace(".json", "-b4.json")).read_text())
    assert rec["batch"] == 4 and rec["choice"] == "none"

    measured = len(calls)
    assert api.resolve_drafter(model, "auto", batch=4) is None  # cached: no measuring
    assert api.resolve_drafter(model, "auto", batch=2).name.startswith("ngram")
    assert cli.make_drafter("auto", None, model, batch=3) is None
    ar = specjax.generate(model, [[5, 6, 7]] * 3, max_new_tokens=4)
    auto = specjax.generate(model, [[5, 6, 7]] * 3, max_new_tokens=4, drafter="auto")
    assert auto.tokens == ar.tokens and auto.stats["verify_size_histogram"] == [auto.stats["steps"]]
    assert len(calls) == measured
    # A batch table that raced another batch-1 choice than today's is measured again.
    b2 = tmp_path / "auto" / greedy.replace(".json", "-b2.json")
    rec = json.loads(b2.read_text())
    rec["table"][1]["candidate"] = "eagle3_tree_sized"
    b2.write_text(json.dumps(rec))
    assert autotune.choose_drafter(model, progress=False, batch=2)[0] == "ngram"
    assert len(calls) == measured + 1 and calls[-1][0] == ["none", "ngram"]
    # A batch-1 choice of plain decoding: nothing races at any batch, nothing is cached for it.
    monkeypatch.setattr(autotune, "auto_candidates", lambda m, **kw: ["none"])
    monkeypatch.setattr(autotune, "candidates_fingerprint", lambda m: "no drafters")
    assert autotune.choose_drafter(model, progress=False)[0] == "none"
    assert autotune.choose_drafter(model, progress=False, batch=16) == ("none", [])
    assert (
        calls[-1][2] == 1
        and not (tmp_path / "auto" / greedy.replace(".json", "-b16.json")).exists()
    )
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="batch must be a positive int"):
            autotune.auto_batch(bad)


def test_auto_measures_again_after_a_damaged_cache_file(model, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(autotune, "tune_tree", _fake_tune({"none": 100.0, "ngram": 120.0}, calls))

    def measured():  # how many times `auto` measured (two rounds each)
        return sum(n == autotune.AUTO_SCREEN_PROMPTS for _, n in calls)

    assert autotune.choose_drafter(model, progress=False)[0] == "ngram"
    (path,) = (tmp_path / "auto").iterdir()
    older = {"key": autotune.auto_key(model), "choice": "none"}  # before AUTO_VERSION
    for damage in ("{not json", json.dumps(dict(older, key="another model")), json.dumps(older)):
        path.write_text(damage)
        assert autotune.choose_drafter(model, progress=False)[0] == "ngram"
    assert measured() == 4 and len(calls) == 8
    assert autotune.choose_drafter(model, progress=False, refresh=True)[0] == "ngram"
    assert measured() == 5
    # A release with retrained bundled drafters: the choice measured on the old ones is stale.
    assert autotune.choose_drafter(model, progress=False)[0] == "ngram"
    assert measured() == 5
    monkeypatch.setattr(autotune, "candidates_fingerprint", lambda m: "retrained")
    assert autotune.choose_drafter(model, progress=False)[0] == "ngram"
    assert measured() == 6


def test_verify_sizing_is_measured_once_per_device(model, tmp_path, monkeypatch):
    """`cached_sizing` measures a tree drafter's step costs once, then reads them back (a
    damaged file is measured again)."""
    from specjax.drafters import DynamicTree, VerifySizing

    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
    calls = []

    def fake(model, make, tree, progress=True):
        calls.append(tree)
        record = {"sizes": [2, 4], "costs_ms": [10.0, 12.5, 15.0]}
        return VerifySizing((2, 4), (10.0, 12.5, 15.0)), record

    monkeypatch.setattr(autotune, "measure_sizing", fake)
    tree = DynamicTree(nodes=4, depth=3, top_k=2)
    want = VerifySizing((2, 4), (10.0, 12.5, 15.0))
    assert autotune.cached_sizing(model, "layer_skip_tree", None, tree, False) == want
    assert autotune.cached_sizing(model, "layer_skip_tree", None, tree, False) == want
    assert len(calls) == 1
    (path,) = (tmp_path / "auto").iterdir()
    path.write_text("{not json")
    assert autotune.cached_sizing(model, "layer_skip_tree", None, tree, False) == want
    assert len(calls) == 2


def test_auto_is_a_registry_name(model):
    from specjax.drafters import registry

    assert "auto" in registry.names()
    assert registry.parse("auto").entry.name == "auto"
    with pytest.raises(ValueError, match="needs the target model"):
        registry.make("auto", None, None)


def test_measure_sizing_on_a_real_drafter(model):
    """`measure_sizing` times the drafter and the verify forwards for real: one cost per verify
    size and the plain step, each a whole step with drafting included."""
    from specjax import drafters

    tree = drafters.DynamicTree(nodes=4, depth=2, top_k=2)
    sizing, rec = autotune.measure_sizing(
        model,
        lambda t: drafters.layer_skip(1, tree=t),
        tree,
        (2, 4),
        prompt=list(range(1, 40)),
        repeats=2,
        progress=False,
    )
    assert sizing.sizes == (2, 4) and len(sizing.costs) == 3
    assert rec["draft_ms"] > 0 and rec["plain_ms"] > 0
    assert sizing.costs[0] == pytest.approx(rec["draft_ms"] + rec["plain_ms"])
    assert all(c >= sizing.costs[0] for c in sizing.costs[1:])  # a verify adds to a plain step
    assert set(rec["verify_ms"]) == {"1", "3", "5"}


def test_frontier_sizes_follow_the_measured_costs():
    """A size gets a verify branch only if it costs clearly less than every larger size: where
    5 tokens cost more than 8 (the 2-core EPYC), 4 of 7 nodes give way to 3."""
    epyc = {2: 1.27, 3: 1.32, 4: 1.37, 5: 1.84, 6: 1.80, 7: 1.75, 8: 1.67}
    assert autotune.frontier_sizes(7, epyc) == (1, 2, 3, 7)
    growing = {T: 1.0 + 0.1 * T for T in range(2, 9)}  # costs that grow with T: the defaults
    assert autotune.frontier_sizes(7, growing) == autotune.default_verify_sizes(7) == (1, 2, 4, 7)
    flat = {T: 1.0 for T in range(2, 9)}  # nothing cheaper than the whole tree: one branch
    assert autotune.frontier_sizes(7, flat) == (7,)
    within_noise = {**growing, 5: growing[6] * 0.99}  # 4 nodes no clear saving over 5
    assert autotune.frontier_sizes(7, within_noise) == (1, 2, 3, 7)


def test_measure_sizing_picks_the_frontier(model, monkeypatch):
    """Without `sizes`, every size is timed and the branches are `frontier_sizes`' (the
    costs a stand-in table: the real timing is the test above)."""
    from specjax import anatomy, drafters

    an = types.SimpleNamespace(ms={"propose": 1.0, "commit": 1.0, "plain step": 10.0})
    monkeypatch.setattr(anatomy, "measure_step", lambda *a, **k: an)
    ms = {1: 10.0, 2: 12.0, 3: 17.0, 4: 14.0, 5: 16.0}  # 2 nodes cost more than 3 and 4
    asked = []

    def table(model, sizes, **kw):
        asked.append(tuple(sizes))
        return {T: (ms[T], ms[T]) for T in sizes}

    monkeypatch.setattr(autotune, "verify_cost_table", table)
    tree = drafters.DynamicTree(nodes=4, depth=2, top_k=2)
    sizing, rec = autotune.measure_sizing(model, lambda t: drafters.layer_skip(1, tree=t), tree)
    assert asked == [(1, 2, 3, 4, 5)]
    assert sizing.sizes == (1, 4) and rec["sizes"] == [1, 4]
    assert sizing.costs == pytest.approx((12.0, 14.0, 18.0))
    assert set(rec["verify_ms"]) == {"1", "2", "3", "4", "5"}


def test_sized_eagle3_tree_by_name(model, tmp_path, monkeypatch):
    """`eagle3_tree_sized` is the EAGLE-3 tree with the cached measured sizing, skipping its
    growth when the first level promises nothing (`early_exit`)."""
    from test_eagle import random_eagle

    from specjax.drafters import DraftGate, VerifySizing, registry

    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
    sizes = autotune.default_verify_sizes(registry.EAGLE_TREE["nodes"])  # the default tree's
    want = VerifySizing(sizes, (10.0, 11.0, 12.0, 13.0, 15.0))
    monkeypatch.setattr(
        autotune,
        "measure_sizing",
        lambda *a, **k: (
            want,
            {"sizes": list(sizes), "costs_ms": list(want.costs), "plain_ms": 8.0},
        ),
    )
    monkeypatch.setattr(
        registry, "bundled_for", lambda kind, m: random_eagle(model, 3, draft_vocab=64)
    )
    d = registry.make("eagle3_tree_sized", None, model)
    spec, _ = d.bind(model)
    assert spec.sizing == dataclasses.replace(want, early_exit=True)
    assert spec.verify_sizes == sizes == (1, 2, 4, 7)
    # `eagle3_tree_gated`: the same sizing (read back from the cache) with a gate at the
    # measured plain step.
    gated, _ = registry.make("eagle3_tree_gated", None, model).bind(model)
    assert gated.sizing == VerifySizing(sizes, want.costs, DraftGate(plain=8.0))
    for name in ("eagle3_tree_sized", "eagle3_tree_gated"):
        with pytest.raises(ValueError, match=f"'{name}' needs the target model"):
            registry.make(name, None, None)
