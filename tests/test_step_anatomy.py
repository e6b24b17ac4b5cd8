"""Step anatomy: no copy of a KV-cache buffer in the compiled decode loop, and `bench-step`.

A per-layer cache buffer [B, KV, S, hd] (or the stacked [L, B, KV, S, hd]) copied inside the
while loop costs a pass over the whole cache per step; XLA inserts such copies when it cannot
update the loop carry in place (e.g. when a layer reads its cache after writing it, see
`attention_split`). The step anatomy (`specjax bench-step`) shows the cost as remainder; this
test catches the copy itself in the optimized HLO.
"""

from __future__ import annotations

import dataclasses

import jax
import pytest
from test_eagle import random_eagle

import specjax
from specjax import anatomy, cli, drafters, engine
from specjax.api import prepare

from conftest import byte_bpe

PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [40, 41, 42, 40, 41, 42, 40, 41]]


@pytest.fixture(scope="module")
def small_target(make_hf_model):
    """A 2-layer GQA Llama without EOS (compiles fast)."""
    return specjax.model_from_hf(
        make_hf_model("llama", seed=0, num_hidden_layers=2, eos_token_id=None), name="tiny-2l"
    )


def compiled_decode(model, drafter):
    """Optimized HLO of `engine.decode` for PROMPTS -> (HLO text, KV-cache buffer shapes)."""
    ec, args, _ = prepare(model, PROMPTS, max_new_tokens=8, drafter=drafter)
    dparams, max_len, sp = args.pop("dparams"), args.pop("max_len"), args["sp"]
    state = jax.eval_shape(
        lambda p, dp, a: engine.prefill(p, dp, **a, ec=ec, max_len=max_len),
        model.params,
        dparams,
        args,
    )
    hlo = engine.decode.lower(model.params, dparams, state, sp, ec=ec).compile().as_text()
    return hlo, anatomy.cache_shapes(state)


DRAFTERS = {
    "ar": lambda: None,
    # a chain drafter with its own KV cache (written in propose, rolled back in commit)
    "layer_skip": lambda: drafters.layer_skip(1, k=3),
    # a tree: the accepted path is compacted in the target cache (gather_slots)
    "layer_skip_tree": lambda: drafters.layer_skip(
        1, tree=drafters.DynamicTree(nodes=3, depth=2, top_k=2)
    ),
    # sized drafts: the engine verifies them through a `lax.switch` over verify sizes (chains:
    # 1 or k tokens, or a plain step; trees: the whole tree or a plain step)
    "ngram_sized": lambda: drafters.ngram(k=4),
    "ngram_tree_sized": lambda: drafters.ngram(k=3, branches=2),
}
# EAGLE drafters whose propose may skip drafting: each skip is one `lax.cond` inside the draft
# (the tree's early exit, a closed gate, a hybrid step where every row takes the chain); a
# second cond around the whole propose made XLA copy the drafter's cache every step.
SIZING = drafters.VerifySizing((2, 4), (1.0, 1.1, 1.2))
GATE = drafters.DraftGate(plain=1.0)
TREE = drafters.DynamicTree(nodes=4, depth=2, top_k=2)
EAGLE = {
    "eagle_tree_early_exit": dict(
        tree=dataclasses.replace(TREE, sizing=dataclasses.replace(SIZING, early_exit=True))
    ),
    "eagle_tree_gated": dict(
        tree=dataclasses.replace(TREE, sizing=dataclasses.replace(SIZING, gate=GATE))
    ),
    "eagle_chain_gated": dict(k=4, sizing=dataclasses.replace(SIZING, gate=GATE)),
    "hybrid": dict(tree=TREE),
}


def eagle_drafter(target, which):
    d = drafters.eagle(random_eagle(target, 3, seed=1, draft_vocab=12), **EAGLE[which])
    return drafters.hybrid(drafters.ngram(max_ngram=3, k=3), d) if which == "hybrid" else d


@pytest.mark.parametrize("which", list(DRAFTERS) + list(EAGLE))
def test_no_cache_copy_in_the_decode_loop(small_target, which):
    d = eagle_drafter(small_target, which) if which in EAGLE else DRAFTERS[which]()
    hlo, shapes = compiled_decode(small_target, d)
    assert all(len(s) == 4 for s in shapes)  # unrolled layers: per-layer [B, KV, S, hd]
    copies = anatomy.loop_body_copies(hlo)
    assert copies, "the parser found no copy at all in the loop: it reads the wrong thing"
    found = anatomy.cache_copies(hlo, shapes)
    assert not found, f"{len(found)} cache-sized copies in the loop body, e.g. {found[0].line}"


def test_cache_copies_parser():
    """A hand-written program: a copy of the cache shape in the loop body is found; the same
    copy outside the loop, or a copy of another shape, is not."""
    hlo = "\n".join(
        [
            "%body (p: (f32[2,3,4,5], s32[])) -> (f32[2,3,4,5], s32[]) {",
            "  %c = f32[2,3,4,5]{3,2,1,0} copy(%x)",
            "  %f = f32[2,3] fusion(%y), kind=kLoop, calls=%fused",
            "}",
            "%fused (a: f32[2,3]) -> f32[2,3] {",
            "  ROOT %s = (f32[2,3,4,5]{3,2,1,0}, f32[2,3,4,5]{3,2,1,0}, u32[]) copy-start(%a)",
            "}",
            "%cond (p: (f32[2,3,4,5], s32[])) -> pred[] {",
            "  ROOT %t = pred[] constant(true)",
            "}",
            "ENTRY %main (a: f32[2,3,4,5]) -> f32[2,3,4,5] {",
            "  %o = f32[2,3,4,5]{3,2,1,0} copy(%a)",
            "  %w = (f32[2,3,4,5], s32[]) while(%t), condition=%cond, body=%body",
            "  %k = f32[7]{0} copy(%a)",
            "}",
        ]
    )
    found = anatomy.cache_copies(hlo, [(2, 3, 4, 5)])
    assert [(c.computation, c.line.split(" =")[0]) for c in found] == [
        ("body", "%c"),
        ("fused", "ROOT %s"),
    ]
    assert anatomy.cache_copies(hlo, [(9, 9)]) == []


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, make_hf_model):
    tok = byte_bpe(["the cat sat on the mat. the dog sat on the log. " * 4])
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    hf = make_hf_model("llama", seed=3, vocab_size=len(tok), num_hidden_layers=2, eos_token_id=None)
    path = str(tmp_path_factory.mktemp("tiny") / "hf")
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_bench_step(tiny_dir, capsys):
    cli.main(
        [
            "bench-step",
            "--model",
            tiny_dir,
            "--drafters",
            "layer_skip:1@2",
            "--prompt",
            "the cat sat on the mat",
            "--max-new-tokens",
            "16",
            "--warm-steps",
            "1",
            "--loop-steps",
            "2",
            "--repeats",
            "3",
        ]
    )
    out = capsys.readouterr().out
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].split()[0]
        for line in out.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    assert rows.pop("ms per step") == "layer_skip:1@2"
    assert list(rows) == list(anatomy.ROWS)
    ms = {k: float(v) for k, v in rows.items()}
    for name in ("plain step",) + anatomy.PARTS + ("spec step", "loop step", "call overhead"):
        assert ms[name] > 0, name
    assert abs(ms["sum of parts"] - sum(ms[p] for p in anatomy.PARTS)) < 0.02
    assert abs(ms["remainder"] - (ms["spec step"] - ms["sum of parts"])) < 0.02
    assert "(T=3)" in out  # last + 2 draft tokens: a chain drafter's block is verified whole
    assert ms["cache copies in loop"] == 0
    assert "remainder > 10% of the step:" in out
