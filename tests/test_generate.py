"""`specjax.generate` end to end on tiny random models: greedy parity with HF transformers,
ragged batches, EOS and per-row budgets, lossless speculative decoding with every drafter, one
compilation per shape bucket, the structure of the compiled decode loop, input validation,
streaming, and the statistics.

Compilation dominates the runtime on CPU, so the tests share shape buckets where they can:
most runs use batch 4 (`PROMPTS`), prompt bucket 16 and new-token bucket 32 on one 3-layer
target (`target`), and the plain greedy output of that target is computed once (`ar_out`).
"""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import specjax

# The host API module (`specjax.generate` is its function, re-exported by the package).
from specjax import api as gen
from specjax import drafters, engine
from specjax.drafters.ngram import NgramSpec
from specjax.model import Model

from conftest import RAGGED_PROMPTS, VOCAB, byte_bpe
from test_spec_sampling import sized_drafter

generate, generate_stream, prepare = gen.generate, gen.generate_stream, gen.prepare

NEW = 32
PROMPTS = RAGGED_PROMPTS


def hf_greedy(hf_model, prompt, new_tokens):
    """HF `generate`, greedy, one unpadded prompt. The attention mask is passed explicitly: HF
    would otherwise infer one from a pad token id and hide prompt tokens equal to it."""
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


def first_index(row, token):
    return row.index(token) if token in row else None


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hf_target(make_hf_model):
    # Llama with GQA (4 query heads, 2 KV heads) and 3 layers (layer_skip((0, 2)) needs them);
    # no EOS, so every row runs to its budget.
    return make_hf_model("llama", seed=0, num_hidden_layers=3, eos_token_id=None)


@pytest.fixture(scope="module")
def target(hf_target):
    return specjax.model_from_hf(hf_target, name="tiny-llama")


@pytest.fixture(scope="module")
def hf_qwen(make_hf_model):
    return make_hf_model("qwen2", seed=2, eos_token_id=None)


# `other` (an independent 1-layer draft model) comes from conftest.py.


@pytest.fixture(scope="module")
def ar_out(target):
    return generate(target, PROMPTS, max_new_tokens=NEW)


@pytest.fixture(scope="module")
def tok_model(make_hf_model):
    """A 1-layer model with a real (byte-level BPE) tokenizer; EOS = the tokenizer's <eos>."""
    tok = byte_bpe(
        [
            "hello world, the quick brown fox jumps over the lazy dog. " * 3,
            "héllo wörld 你好 ✓ ünïcödé",
        ]
    )
    hf = make_hf_model("llama", seed=5, vocab_size=len(tok), num_hidden_layers=1, eos_token_id=None)
    return specjax.model_from_hf(hf, tokenizer=tok, name="tiny-tok")


# ------------------------------------------------------------------------ 1. AR greedy vs HF


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2"])
def test_ar_greedy_matches_hf_generate(family, request, ar_out):
    if family == "llama-gqa":
        hf_model, out = request.getfixturevalue("hf_target"), ar_out
    else:
        hf_model = request.getfixturevalue("hf_qwen")
        out = generate(specjax.model_from_hf(hf_model), PROMPTS, max_new_tokens=NEW)
    assert out.lengths == [NEW] * len(PROMPTS)
    assert out.prompt_lengths == [len(p) for p in PROMPTS]
    for i, prompt in enumerate(PROMPTS):
        assert out.tokens[i] == hf_greedy(hf_model, prompt, NEW), f"row {i}"
    # Not a degenerate model: rows differ and are not one token repeated.
    assert len({tuple(t) for t in out.tokens}) == len(PROMPTS)
    assert all(len(set(t)) > 3 for t in out.tokens)


def test_ragged_batch_equals_each_prompt_alone(target, ar_out):
    for i, prompt in enumerate(PROMPTS):
        alone = generate(target, [prompt], max_new_tokens=NEW)
        assert alone.tokens == [ar_out.tokens[i]], f"row {i}"
    # Token ids given as a flat list or a numpy array mean one prompt, the same one.
    assert generate(target, np.asarray(PROMPTS[1]), max_new_tokens=NEW).tokens == [ar_out.tokens[1]]


# ------------------------------------------------------------------- 2. EOS and row budgets


@pytest.fixture(scope="module")
def eos_case(target, ar_out):
    """The target with two EOS ids chosen from its own greedy output: a token that row 0 first
    emits mid-way, and the first token of another row (EOS straight from the prefill); some
    row emits neither. -> (model, eos ids, expected tokens per row)."""
    rows = ar_out.tokens

    def cut(eos):
        out = []
        for r in rows:
            hits = [r.index(t) for t in eos if t in r]
            out.append(r[: min(hits) + 1] if hits else r)
        return out

    choice = None
    for j in range(3, NEW - 8):
        for i in range(1, len(rows)):
            eos = (rows[0][j], rows[i][0])
            lengths = [len(r) for r in cut(eos)]
            if (
                first_index(rows[0], eos[0]) == j
                and lengths[0] == j + 1
                and lengths[i] == 1
                and any(eos[0] not in r and eos[1] not in r for r in rows)
            ):
                choice = eos
                break
        if choice:
            break
    assert choice is not None
    cfg = dataclasses.replace(target.config, eos_token_ids=tuple(sorted(set(choice))))
    model = Model(params=target.params, config=cfg, name="tiny-llama-eos")
    assert model.eos_token_ids == cfg.eos_token_ids
    return model, choice, cut(choice)


def test_rows_stop_at_eos(eos_case):
    model, eos, expected = eos_case
    out = generate(model, PROMPTS, max_new_tokens=NEW)
    assert out.tokens == expected
    assert out.lengths == [len(e) for e in expected]
    stopped = [i for i, t in enumerate(out.tokens) if t[-1] in eos]
    # Every kind of row is present: EOS first, EOS mid-way, no EOS at all.
    assert 1 in out.lengths and len(stopped) < len(PROMPTS)
    assert any(1 < len(out.tokens[i]) < NEW for i in stopped)
    for i, row in enumerate(out.tokens):
        # EOS is the last token of a stopped row and appears nowhere else.
        assert sum(t in eos for t in row) == (i in stopped)
        # A finished row stops costing verify forwards.
        assert out.stats["target_forwards"][i] == len(row)
    # Prefix property: a shorter budget (same bucket) gives prefixes; rows that finished
    # before it are unchanged.
    short = generate(model, PROMPTS, max_new_tokens=20)
    for i, row in enumerate(out.tokens):
        assert short.tokens[i] == row[:20]


@pytest.mark.parametrize("which", ["ar", "self-k4"])
def test_per_row_budgets(eos_case, which):
    """`generate(max_new_tokens=[...])`: each row stops at its own budget, the tokens a prefix
    of the row's output with the largest budget (a budget smaller than the draft length cuts
    an accepted block; a row at EOS before its budget stops there)."""
    model, eos, expected = eos_case
    d = None if which == "ar" else drafters.small_model(model, k=4)
    budgets = [3, 1, NEW, 10]
    out = generate(model, PROMPTS, max_new_tokens=budgets, drafter=d)
    for i, (b, exp) in enumerate(zip(budgets, expected)):
        assert out.tokens[i] == exp[:b], f"row {i}"
    assert [len(t) for t in out.tokens] != [min(NEW, len(e)) for e in expected]  # budgets bit
    if d is None:
        assert out.stats["target_forwards"] == [len(t) for t in out.tokens]


def test_per_row_budgets_are_checked(target):
    _raises(
        ValueError,
        "max_new_tokens has 2 budgets for 4 prompts: give one int for every "
        "prompt or one per prompt",
        generate,
        target,
        PROMPTS,
        max_new_tokens=[4, 4],
    )
    _raises(
        ValueError,
        r"max_new_tokens\[1\] must be a positive int, got 0",
        generate,
        target,
        PROMPTS,
        max_new_tokens=[4, 0, 4, 4],
    )
    ctx = target.config.max_position_embeddings
    _raises(
        ValueError,
        f"prompt 2 has 16 tokens; with max_new_tokens={ctx} that exceeds",
        generate,
        target,
        PROMPTS,
        max_new_tokens=[4, 4, ctx, 4],
    )
    stream = lambda *a, **k: list(generate_stream(*a, **k))  # noqa: E731 (a generator)
    for name, fn in (("generate_stream", stream), ("generate_pmap", gen.generate_pmap)):
        _raises(
            ValueError,
            f"{name} takes one max_new_tokens",
            fn,
            target,
            PROMPTS[0],
            max_new_tokens=[4],
        )
    _raises(
        ValueError,
        "decode_fn takes one max_new_tokens",
        gen.decode_fn,
        target,
        max_new_tokens=(4, 4),
    )


@pytest.mark.parametrize("which", ["self-k4", "ngram-k4"])
def test_speculative_stops_at_eos_inside_a_block(eos_case, which):
    """With the target as its own drafter every block is accepted in full, so EOS falls inside
    an accepted block and the tokens drafted after it must be dropped."""
    model, eos, expected = eos_case
    d = drafters.small_model(model, k=4) if which == "self-k4" else drafters.ngram(k=4)
    out = generate(model, PROMPTS, max_new_tokens=NEW, drafter=d)
    assert out.tokens == expected
    if which == "self-k4":
        assert out.stats["acceptance_histogram"][:4] == [0, 0, 0, 0]


# ---------------------------------------------------- 3. speculative greedy == AR greedy

DRAFTERS = {
    "ngram-k4": lambda target, other: drafters.ngram(k=4),
    "ngram-n2-k6": lambda target, other: drafters.ngram(max_ngram=2, k=6),
    "small_model-other-k3": lambda target, other: drafters.small_model(other, k=3),
    "small_model-self-k4": lambda target, other: drafters.small_model(target, k=4),
    "layer_skip-1-k3": lambda target, other: drafters.layer_skip(layers=1, k=3),
    "layer_skip-0,2-k2": lambda target, other: drafters.layer_skip(layers=(0, 2), k=2),
    "ngram-fixed-k4": lambda target, other: drafters.ngram(k=4, adaptive=False),
    # Verify 0, 1, 3 or 5 of 5 draft tokens, as the rows' requests differ step by step.
    "sized-other-k5": lambda target, other: sized_drafter(other, k=5, sizes=(1, 3)),
}


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_speculative_greedy_equals_ar(name, target, other, ar_out):
    d = DRAFTERS[name](target, other)
    k = d.k
    out = generate(target, PROMPTS, max_new_tokens=NEW, drafter=d)
    assert out.tokens == ar_out.tokens
    s = out.stats
    hist = s["acceptance_histogram"]
    fwd = s["target_forwards"]
    assert len(hist) == k + 1
    # One histogram entry per verify forward of an active row (the prefill forward is extra).
    assert sum(hist) == sum(fwd) - len(PROMPTS)
    assert s["steps"] == max(fwd) - 1
    assert s["tau"] == pytest.approx(len(PROMPTS) * (NEW - 1) / (sum(fwd) - len(PROMPTS)))
    assert s["tau"] >= 1.0
    if name == "small_model-self-k4":
        # The target drafting for itself is always right: k + 1 tokens per verify forward
        # until the budget cuts the last block.
        assert hist[:k] == [0] * k
        assert fwd == [1 + math.ceil((NEW - 1) / (k + 1))] * len(PROMPTS)
        assert s["tau"] > k
    elif name.startswith("ngram"):
        assert sum(hist[1:]) > 0, "prompt lookup never got a draft token accepted"
        assert s["tau"] > 1.0


# ---------------------------------------------------------- 4. one compilation per bucket


def _delta(before):
    now = engine.TRACE_COUNTS
    return {k: now[k] - before.get(k, 0) for k in ("prefill", "decode")}


def test_one_compilation_per_shape_bucket(target, other):
    # A config no other test uses, so nothing is compiled for it yet.
    cfg = dataclasses.replace(target.config, max_position_embeddings=255)
    model = Model(params=target.params, config=cfg, name="tiny-llama-trace")
    rng = np.random.default_rng(7)
    # Batch sizes 3 and 4 (bucket 4), prompt lengths 1..16 (bucket 16), max_new_tokens 17..32
    # (bucket 32), different temperatures, top-p values and seeds.
    runs = [
        (4, 1, 17, 0.7, 0.9),
        (3, 16, 32, 1.0, 0.5),
        (4, 9, 25, 1.3, 0.95),
        (3, 4, 20, 0.5, 0.3),
        (4, 12, 30, 0.9, 0.8),
    ]
    for drafter_fn in (lambda: None, lambda: drafters.small_model(other, k=3)):
        before = dict(engine.TRACE_COUNTS)
        for seed, (b, plen, new, temp, top_p) in enumerate(runs):
            prompts = [
                rng.integers(0, VOCAB, rng.integers(1, plen + 1)).tolist() for _ in range(b - 1)
            ] + [rng.integers(0, VOCAB, plen).tolist()]
            out = generate(
                model,
                prompts,
                max_new_tokens=new,
                temperature=temp,
                top_p=top_p,
                key=seed,
                drafter=drafter_fn(),
            )
            assert out.lengths == [new] * b
            assert out.stats["compiled"] == (seed == 0)
        assert _delta(before) == {"prefill": 1, "decode": 1}
        # A prompt of 17 tokens puts the batch in the next prompt bucket (24): one more of each
        # (batch and new-token buckets unchanged); a second batch in that bucket compiles nothing.
        for plen, new, temp in ((17, 20, 0.8), (24, 24, 1.1)):
            prompts = [list(range(plen)), [5, 6], [7]]
            generate(
                model,
                prompts,
                max_new_tokens=new,
                temperature=temp,
                top_p=0.9,
                drafter=drafter_fn(),
            )
            assert _delta(before) == {"prefill": 2, "decode": 2}


# ------------------------------------------------------- 5. the compiled decode program


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def _walk(jaxpr, path=()):
    """Yield (eqn, names of the enclosing primitives) for every equation, recursively."""
    for eqn in jaxpr.eqns:
        yield eqn, path
        for sub in _sub_jaxprs(eqn):
            yield from _walk(sub, path + (eqn.primitive.name,))


@pytest.mark.parametrize("which", ["ar", "ngram", "small_model"])
def test_decode_is_one_while_loop_without_callbacks(which, target, other):
    d = {"ar": None, "ngram": drafters.ngram(k=4), "small_model": drafters.small_model(other, k=3)}[
        which
    ]
    ec, args, _ = prepare(target, PROMPTS, max_new_tokens=NEW, drafter=d)
    dparams, max_len, sp = args.pop("dparams"), args.pop("max_len"), args["sp"]
    state = jax.eval_shape(
        lambda p, dp, a: engine.prefill(p, dp, **a, ec=ec, max_len=max_len),
        target.params,
        dparams,
        args,
    )
    closed = jax.make_jaxpr(lambda p, dp, s, q: engine.decode(p, dp, s, q, ec=ec))(
        target.params, dparams, state, sp
    )
    # The top level is the one call of the jitted `decode`.
    top = [e.primitive.name for e in closed.jaxpr.eqns]
    assert top in (["jit"], ["pjit"]), top
    eqns = list(_walk(closed.jaxpr))
    names = collections.Counter(e.primitive.name for e, _ in eqns)
    # Exactly one while loop, directly in decode's body; the model's layers are unrolled (the
    # default layout) and the small model's draft steps are `scan`s inside the loop, never
    # nested while loops.
    whiles = [(e, path) for e, path in eqns if e.primitive.name == "while"]
    assert len(whiles) == 1, names
    assert len(whiles[0][1]) == 1  # path == (jit,)
    scans = [path for e, path in eqns if e.primitive.name == "scan"]
    assert all("while" in path for path in scans)
    assert bool(scans) == (which == "small_model")
    assert [p for p in names if "callback" in p] == []
    # Nothing leaves the device inside the loop.
    assert not any(
        n in names
        for n in ("io_callback", "pure_callback", "debug_callback", "debug_print", "outside_call")
    )


# ------------------------------------------------------------------------ 6. bad input


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_bad_prompts_are_rejected(target, tok_model):
    ctx = target.config.max_position_embeddings
    _raises(ValueError, "prompts is empty", generate, target, [])
    _raises(ValueError, "prompt 0 is empty", generate, target, [[]])
    _raises(ValueError, "prompt 1 is empty", generate, target, [[1, 2], []])
    _raises(ValueError, "prompt 0 is empty", generate, tok_model, "", chat=False)
    _raises(ValueError, "prompt 0 is empty", generate, tok_model, [""], chat=False)
    _raises(ValueError, "prompt 1 is float", generate, target, [[1, 2], 3.5])
    _raises(ValueError, "token ids must be integers", generate, target, [[1, 2], [1.5, 2.0]])
    _raises(ValueError, "no tokenizer", generate, target, "hello")
    _raises(
        ValueError,
        rf"prompt 0 has {ctx + 1} tokens.*context of {ctx}",
        generate,
        target,
        [[1] * (ctx + 1)],
    )
    # Fits alone, but not with the requested new tokens.
    _raises(
        ValueError,
        rf"prompt 1 has {ctx - 4} tokens.*max_new_tokens=8.*context of {ctx}",
        generate,
        target,
        [[1, 2], [3] * (ctx - 4)],
        max_new_tokens=8,
    )
    _raises(
        ValueError,
        rf"token ids outside \[0, {VOCAB}\): \[{VOCAB}\]",
        generate,
        target,
        [[1, 2], [3, VOCAB]],
    )
    _raises(ValueError, r"prompt 0 has token ids outside .*\[-1\]", generate, target, [[-1, 5]])
    _raises(ValueError, "one prompt", generate_stream(target, [[1, 2], [3]]).__next__)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive int, got 0"),
        (dict(max_new_tokens=-3), "max_new_tokens must be a positive int, got -3"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be a positive int, got 2.5"),
        (dict(max_new_tokens="8"), "max_new_tokens must be a positive int, got '8'"),
        (dict(max_new_tokens=None), "max_new_tokens must be a positive int, got None"),
        (dict(max_new_tokens=True), "max_new_tokens must be a positive int, got True"),
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(temperature=None), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(temperature=1.0, top_k=0), "top_k must be a positive int"),
        (dict(temperature=1.0, top_k=-2), "top_k must be a positive int"),
        (dict(temperature=1.0, top_k=2.5), "top_k must be a positive int"),
        (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(temperature=1.0, top_p=-0.1), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_generation_settings_are_rejected(kwargs, match, target):
    kwargs = {"max_new_tokens": 4, **kwargs}
    _raises(ValueError, match, generate, target, PROMPTS, **kwargs)


def test_mesh_without_data_axis_is_rejected(target):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("model",))
    _raises(
        ValueError,
        "mesh needs a 'data' axis",
        generate,
        target,
        PROMPTS,
        max_new_tokens=4,
        mesh=mesh,
    )


def test_bad_drafters_are_rejected(target, other, tok_model, make_hf_model):
    for k in (0, -1):
        _raises(ValueError, "draft length k must be a positive int", drafters.ngram, k=k)
        _raises(
            ValueError, "draft length k must be a positive int", drafters.small_model, other, k=k
        )
        _raises(ValueError, "draft length k must be a positive int", drafters.layer_skip, 1, k=k)
    _raises(ValueError, "min_ngram <= max_ngram", drafters.ngram, max_ngram=1, min_ngram=2)
    _raises(ValueError, r"short must be an int in \[0, k=4\], got 5", drafters.ngram, k=4, short=5)
    # Not a Drafter, nor a drafter name.
    _raises(
        TypeError,
        "drafter must be a specjax Drafter.*or a drafter name.*got int",
        generate,
        target,
        PROMPTS,
        max_new_tokens=4,
        drafter=3,
    )
    _raises(
        ValueError,
        "unknown drafter 'nope'; valid: ngram",
        generate,
        target,
        PROMPTS,
        max_new_tokens=4,
        drafter="nope",
    )
    _raises(
        TypeError,
        "drafter must be a specjax Drafter.*got NgramSpec",
        generate,
        target,
        PROMPTS,
        max_new_tokens=4,
        drafter=NgramSpec(k=3),
    )
    _raises(
        TypeError,
        "drafter must be a specjax Drafter.*got Model",
        generate,
        target,
        PROMPTS,
        max_new_tokens=4,
        drafter=other,
    )
    # Another vocabulary.
    small_vocab = specjax.model_from_hf(
        make_hf_model("llama", seed=3, vocab_size=97, num_hidden_layers=1)
    )
    _raises(
        ValueError,
        f"drafter vocabulary size 97 differs from the target's {VOCAB}",
        generate,
        target,
        PROMPTS,
        max_new_tokens=4,
        drafter=drafters.small_model(small_vocab, k=2),
    )
    # Another dtype.
    _raises(
        ValueError,
        r"dtype \['bfloat16'\] but the target is float32.*astype",
        generate,
        target,
        PROMPTS,
        max_new_tokens=4,
        drafter=drafters.small_model(other.astype(jnp.bfloat16), k=2),
    )
    # Another tokenizer, same vocabulary size.
    tok_b = byte_bpe(
        ["lorem ipsum dolor sit amet consectetur adipiscing elit " * 3, "日本語 テキスト"],
        size=len(tok_model.tokenizer),
    )
    assert tok_b.get_vocab() != tok_model.tokenizer.get_vocab()
    hf_b = make_hf_model("llama", seed=4, vocab_size=len(tok_b), num_hidden_layers=1)
    draft_b = specjax.model_from_hf(hf_b, tokenizer=tok_b, name="tiny-tok-b")
    _raises(
        ValueError,
        "uses a different tokenizer than the target",
        generate,
        tok_model,
        "hello",
        max_new_tokens=4,
        drafter=drafters.small_model(draft_b, k=2),
    )
    # Layer skip beyond the target's depth (3 layers).
    _raises(ValueError, "at least one layer", drafters.layer_skip, layers=0)
    for layers in (4, (0, 3), (-1, 1)):
        _raises(
            ValueError,
            "not valid for a target with 3 layers",
            generate,
            target,
            PROMPTS,
            max_new_tokens=4,
            drafter=drafters.layer_skip(layers=layers, k=2),
        )


# -------------------------------------------------------------------------- 7. streaming


def test_stream_concatenates_to_generate_text(tok_model):
    kw = dict(chat=False, max_new_tokens=40)
    out = generate(tok_model, "hello world", **kw)
    pieces = list(generate_stream(tok_model, "hello world", **kw))
    assert len(pieces) > 5 and all(pieces)
    assert "".join(pieces) == out.text[0]
    assert out.text[0] == tok_model.decode(out.tokens[0]) and len(out.text[0]) > 10
    # Token ids work too (one prompt as a flat list), and so does a drafter.
    ids = tok_model.encode("hello world", chat=False)
    assert "".join(generate_stream(tok_model, ids, **kw)) == out.text[0]
    spec = list(generate_stream(tok_model, "hello world", drafter=drafters.ngram(k=3), **kw))
    assert "".join(spec) == out.text[0]


# ---------------------------------------------------------------------------- 8. stats


def test_stats(target, ar_out):
    s = ar_out.stats
    n = len(PROMPTS)
    assert s["new_tokens"] == n * NEW
    assert s["steps"] == NEW - 1  # the first token comes from the prefill
    assert s["target_forwards"] == [NEW] * n
    assert s["tau"] == 1.0
    assert s["acceptance_histogram"] == [n * (NEW - 1)]
    for key in ("prefill_s", "decode_s", "total_s", "tokens_per_s", "decode_tokens_per_s"):
        assert s[key] > 0, key
    assert s["total_s"] == pytest.approx(s["prefill_s"] + s["decode_s"])
    assert s["tokens_per_s"] == pytest.approx(n * NEW / s["total_s"])
    again = generate(target, PROMPTS, max_new_tokens=NEW)
    assert again.tokens == ar_out.tokens
    assert again.stats["compiled"] is False
    assert "tau=1.00" in repr(again)


def test_xla_options_compile_a_program_of_their_own(target):
    """`specjax.xla_options` reaches XLA (an unknown option is XLA's error, inside the block
    only), gives the same tokens, and is checked before anything compiles."""
    prompts = [[5, 6, 7, 8]]
    plain = generate(target, prompts, max_new_tokens=6)
    with specjax.xla_options(xla_backend_optimization_level=1):
        optioned = generate(target, prompts, max_new_tokens=6)
    assert optioned.tokens == plain.tokens
    # Repeated prompts: the shared prefill program calls the plain one inside its trace (a
    # nested entry point takes the caller's options; JAX rejects options on a nested jit).
    with specjax.xla_options(xla_backend_optimization_level=1):
        shared = generate(target, prompts * 4, max_new_tokens=6)
    assert shared.tokens == plain.tokens * 4
    with specjax.xla_options(xla_no_such_option=True):
        with pytest.raises(Exception, match="xla_no_such_option"):
            generate(target, prompts, max_new_tokens=6)
    generate(target, prompts, max_new_tokens=6)  # outside the block: compiles as before
    with pytest.raises(ValueError, match="does not start with 'xla_'"):
        with specjax.xla_options(backend_optimization_level=2):
            pass
    with pytest.raises(TypeError, match="expected a bool, int, float or str"):
        with specjax.xla_options(xla_cpu_enable_fast_math=[True]):
            pass


@pytest.mark.parametrize("layout", ["unrolled", "scan"])
def test_repeated_prompts_share_one_prefill(target, monkeypatch, layout):
    """A batch that repeats prompts (n samples of one question) runs the target's prefill once
    per distinct prompt (`engine.target_prefill_shared`) and decodes exactly as with the
    per-row prefill: the same tokens and acceptance statistics, greedy and sampled, with an
    EAGLE-3 tree drafter (it starts from the prefill's hidden states and cache), for both cache
    layouts (per-layer buffers, stacked layers)."""
    from specjax.models import eagle as feature

    model = target if layout == "unrolled" else target.with_layout("scan")
    a, b = PROMPTS[0], PROMPTS[3]
    batch = [a, b, a, a, b, a, a]  # 7 rows: bucket 8 with one padding row; 3 distinct rows
    cfg = feature.make_config(model.config, 3)
    tree = drafters.DynamicTree(nodes=4, depth=2, top_k=2)
    eagle = drafters.eagle((cfg, feature.init_params(cfg, jax.random.key(0))), tree=tree)
    shapes = []
    real = engine.target_prefill_shared

    def spy(params, inp, rows, **kw):
        shapes.append((inp.tokens.shape[0], rows.tolist()))
        return real(params, inp, rows, **kw)

    monkeypatch.setattr(engine, "target_prefill_shared", spy)
    modes = ({}, dict(temperature=1.0, key=4))
    shared = [generate(model, batch, max_new_tokens=12, drafter=eagle, **kw) for kw in modes]
    assert len(shapes) == 2 and shapes[0][0] == 4, shapes  # (a, b, padding) -> bucket 4
    rows = shapes[0][1]
    assert len(set(rows)) == 3 and [rows[i] == rows[0] for i in range(7)] == [p == a for p in batch]
    monkeypatch.setattr(gen, "_distinct_prompts", lambda *args: None)  # the per-row prefill
    plain = [generate(model, batch, max_new_tokens=12, drafter=eagle, **kw) for kw in modes]
    assert len(shapes) == 2
    for s, p in zip(shared, plain):
        assert s.tokens == p.tokens
        assert s.stats["acceptance_histogram"] == p.stats["acceptance_histogram"]
    assert sum(shared[0].stats["acceptance_histogram"][1:]) > 0  # drafts were accepted
    assert len({tuple(t) for t in shared[1].tokens}) > 2  # the samples differ by row
