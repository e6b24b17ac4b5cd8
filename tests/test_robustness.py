"""Every public entry point checks its inputs at the edge and names the argument and what it
accepts (issue 17, findings 5-8). All of these fail before anything is compiled: fast."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax import bench, cli, drafters
from specjax.api import prepare
from specjax.sampling import make_sampling

from conftest import byte_bpe


@pytest.fixture(scope="module")
def tok_model(make_hf_model):
    tok = byte_bpe(["hello world, the quick brown fox jumps over the lazy dog. " * 3])
    hf = make_hf_model("llama", seed=5, vocab_size=len(tok), num_hidden_layers=1)
    return specjax.model_from_hf(hf, tokenizer=tok, name="tiny-tok")


def _rows(model, prompts, **kw):
    return prepare(model, prompts, max_new_tokens=4, **kw)[2]


# ---------------------------------------------------------------------- 5-6. prompts


@pytest.mark.parametrize(
    "prompts, match",
    [
        (b"hello", r"got bytes b'hello' \(decode bytes to str first\)"),
        (bytearray(b"hi"), "got bytearray"),
        ({"a": 1}, "got dict"),
        ({1, 2}, "got set"),
        (3.5, "got float 3.5"),
        (None, "got NoneType None"),
        ([[1, 2], None], "prompt 1 is NoneType None"),
        ([b"x"], "prompt 0 is bytes"),
        ([[1, 2.5]], "prompt 0: token ids must be integers, got float 2.5"),
        ([[1, True]], "prompt 0: token ids must be integers, got bool"),
        (np.zeros((1, 2, 3), np.int32), r"shape \[T\] or \[B, T\], got shape \(1, 2, 3\)"),
    ],
)
def test_prompts_of_the_wrong_type_are_named(target, prompts, match):
    with pytest.raises(ValueError, match=match):
        _rows(target, prompts)


def test_prompts_in_every_accepted_form(target, tok_model):
    ids = [[3, 4, 5], [6, 7, 8]]
    for form in (
        ids,
        np.asarray(ids),
        jnp.asarray(ids, jnp.int32),
        [np.asarray(r) for r in ids],
        [[np.int64(t) for t in r] for r in ids],
        tuple(map(tuple, ids)),
    ):
        assert _rows(target, form) == ids
    assert _rows(target, np.asarray(ids[0])) == [ids[0]]
    assert len(_rows(tok_model, ["hello", "world"])) == 2


def test_lone_surrogate_is_named(tok_model):
    with pytest.raises(
        ValueError,
        match=r"prompt 1 contains a lone surrogate '\\ud800' at "
        r"character 2",
    ):
        _rows(tok_model, ["fine", "ab\ud800cd"])


# ------------------------------------------------------------------------------ 6. keys


@pytest.mark.parametrize(
    "key, match",
    [
        ("abc", "key must be an int seed or a JAX PRNG key.*got str 'abc'"),
        (3.7, "got float 3.7"),
        ([1, 2], r"got list \[1, 2\]"),
        (True, "got bool True"),
        (2**70, "must fit in 64 bits"),
        (np.zeros(3, np.uint32), "got ndarray"),
    ],
)
def test_bad_keys_are_named(target, key, match):
    with pytest.raises(ValueError, match=match):
        prepare(target, [[1, 2]], max_new_tokens=4, temperature=1.0, key=key)


def test_accepted_keys(target):
    def key_of(k):
        return jax.random.key_data(prepare(target, [[1]], max_new_tokens=4, key=k)[1]["key"])

    same = [key_of(k) for k in (7, np.int64(7), jax.random.key(7), jax.random.PRNGKey(7))]
    for k in same[1:]:
        np.testing.assert_array_equal(k, same[0])
    np.testing.assert_array_equal(key_of(None), key_of(0))


# ------------------------------------------------------------------- 6. sampling settings


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature="0.5"), "temperature must be >= 0 .*got str '0.5'"),
        (dict(temperature=True), "temperature must be >= 0 .*got bool True"),
        (dict(temperature=1.0, top_k=True), "top_k must be a positive int, got bool True"),
        (dict(temperature=1.0, top_k="3"), "top_k must be a positive int, got str '3'"),
        (dict(temperature=1.0, top_p="0.9"), "top_p must be a number, got str '0.9'"),
        (dict(temperature=1.0, top_p=np.bool_(True)), "top_p must be a number, got bool"),
    ],
)
def test_bad_sampling_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sampling(**{"top_k": None, "top_p": None, **kwargs})


def test_numpy_scalars_are_numbers():
    mode, sp = make_sampling(np.float32(0.7), np.int64(3), np.float64(0.9))
    assert mode.top_k == 3 and type(mode.top_k) is int and mode.use_top_p
    assert float(sp["temperature"]) == pytest.approx(0.7)
    assert make_sampling(np.int64(0), None, None)[0].greedy


# ------------------------------------------------------------- 6. drafters, dtypes, files


def test_drafter_arguments_are_named():
    with pytest.raises(ValueError, match="layer_skip layers must be .*got float 2.5"):
        drafters.layer_skip(layers=2.5)
    with pytest.raises(ValueError, match="layer_skip layers must be .*got str '8'"):
        drafters.layer_skip(layers="8")
    with pytest.raises(ValueError, match=r"got list \[0, 1.5\]"):
        drafters.layer_skip(layers=[0, 1.5])
    for field in ("nodes", "depth", "top_k"):
        with pytest.raises(ValueError, match=f"DynamicTree {field} must be a positive int, got 0"):
            drafters.DynamicTree(**{field: 0})
    with pytest.raises(ValueError, match="DynamicTree nodes must be a positive int, got 2.0"):
        drafters.DynamicTree(nodes=2.0)


def test_astype_takes_float_dtypes_only(target):
    for bad in (jnp.int8, np.bool_, "int32"):
        with pytest.raises(TypeError, match="astype.*must be a floating dtype"):
            target.astype(bad)
    with pytest.raises(TypeError, match="floating dtype.*got 'nope'"):
        target.astype("nope")
    assert target.astype(jnp.bfloat16).dtype == jnp.bfloat16


def test_truncated_safetensors_is_named(make_hf_model, tmp_path):
    make_hf_model("llama", num_hidden_layers=1).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    os.truncate(f, os.path.getsize(f) // 2)
    with pytest.raises(ValueError, match=f"cannot read '{f}'.*truncated or damaged"):
        specjax.load_model(str(tmp_path))


# -------------------------------------------------------------------------------- 7. CLI


@pytest.mark.parametrize(
    "argv, match",
    [
        (["generate", "hi", "--max-new-tokens", "-5"], "--max-new-tokens: expected a positive int"),
        (
            ["generate", "hi", "--drafter", "layer_skip:abc"],
            "bad LAYERS 'abc' in drafter 'layer_skip:abc'",
        ),
        (["generate", "hi", "--drafter", "ngram:0"], "bad BRANCHES"),
        (["generate", "hi", "--drafter", "nope"], "unknown drafter 'nope'"),
        (["generate", "hi", "--drafter", "ngram@0"], "bad draft size"),
        (["generate", "hi", "--drafter", "model"], "needs an argument: model:PATH"),
        (["generate", "hi", "--k", "0"], "--k: expected a positive int, got 0"),
        (["generate", "hi", "--temperature", "-1"], "--temperature: expected a number >= 0"),
        (["generate", "hi", "--top-p", "1.5"], r"--top-p: expected a number in \(0, 1\]"),
        (["generate", "hi", "--top-k", "x"], "--top-k: expected a positive int, got 'x'"),
        (["bench", "--drafters", "ngram,layer_skip:x"], "bad LAYERS"),
        (["bench-verify", "--impl", "cuda"], "invalid choice: 'cuda'"),
    ],
)
def test_cli_arguments_are_checked_before_the_model_loads(argv, match, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(specjax, "load_model", no_load)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_question_file_errors_name_file_and_line(tmp_path, monkeypatch):
    good = json.dumps({"question_id": 1, "category": "qa", "turns": ["Hi?"]})
    cases = {
        "bad_json": ([good, "", '{"turns": ["a"],}'], r":3: not valid JSON \(.* column 17\)"),
        "no_turns": ([good, json.dumps({"question_id": 2})], r':2: no "turns"'),
        "not_list": ([json.dumps({"turns": "Hi"})], r':1: "turns" must be a non-empty list'),
        "not_obj": ([good, "[1, 2]"], ":2: expected a JSON object, got list"),
    }
    monkeypatch.setattr(specjax, "load_model", lambda *a, **k: 1 / 0)
    for name, (lines, match) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=f"^{path}{match}"):
            bench.load_questions(str(path))
        with pytest.raises(SystemExit, match=f"{path}{match}"):  # before the model loads
            cli.main(["bench", "--questions", str(path)])


# ---------------------------------------------------------------------- 8. training messages


def test_all_prompts_too_long_says_so(tok_model, tmp_path):
    from specjax.train.data import build_dataset

    prompts = [{"prompt": "the quick brown fox jumps over the lazy dog " * 2}] * 3
    with pytest.raises(
        ValueError,
        match=r"every one of the 3 prompts is too long for seq_len "
        r"24: .* at most .* 8 tokens.*the shortest has \d+",
    ):
        build_dataset(tok_model, prompts, tmp_path, seq_len=24, progress=False)


def test_run_config_mismatch_names_only_the_differing_fields(tmp_path):
    from specjax.train import trainer

    record = {"train": {"lr": 1e-3, "steps": 100, "batch": 8}, "target": "t", "rows": 64}
    trainer._check_run_config(tmp_path, record)
    with pytest.raises(trainer.CheckpointError) as e:
        trainer._check_run_config(tmp_path, dict(record, train=dict(record["train"], lr=2e-3)))
    msg = str(e.value)
    assert "'train.lr': (0.001, 0.002)" in msg
    assert "steps" not in msg and "batch" not in msg and "rows" not in msg
