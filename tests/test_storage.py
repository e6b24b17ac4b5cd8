"""Matrices stored in bfloat16 while the model computes in float32 (`Model.with_storage`): the
products are float32's exactly (`llama.exact_bf16_product`), so a bfloat16 checkpoint runs at
half the bytes with float32's logits and every drafter stays exact against it."""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_eagle import echo_eagle1

import specjax
from specjax import drafters, storage
from specjax.models.llama import exact_bf16_product, split_bf16

from conftest import RAGGED_PROMPTS

NEW = 16


def bf16_checkpoint(hf):
    """The HF model with every parameter rounded to bfloat16 (kept float32): what a bfloat16
    checkpoint is once loaded in float32."""
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return hf


@pytest.fixture(scope="module")
def hf_bf16(make_hf_model):
    return bf16_checkpoint(make_hf_model("llama", seed=5))


@pytest.fixture(scope="module")
def pair(hf_bf16):
    """(float32 model, the same with its matrices stored in bfloat16)."""
    f32 = specjax.model_from_hf(hf_bf16, storage=None)  # float32 storage on every device
    return f32, f32.with_storage(jnp.bfloat16)


def test_split_bf16_is_exact():
    rng = np.random.default_rng(0)
    # Values over a wide exponent range, and the three pieces of each sum back exactly.
    x = (rng.standard_normal((4, 257)) * 10.0 ** rng.integers(-20, 20, (4, 257))).astype(np.float32)
    pieces = split_bf16(jnp.asarray(x))
    assert pieces.dtype == jnp.bfloat16 and pieces.shape == (12, 257)
    p = np.asarray(pieces.astype(jnp.float32)).reshape(3, 4, 257)
    assert np.array_equal((p[0] + p[1]) + p[2], x)


@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_exact_bf16_product_is_float32_accurate(rows):
    """Against a float64 reference, the product errs no more than float32's own (a few ulps
    of the sum of |x w|); one bfloat16 piece of x alone (what bfloat16 activations would do)
    errs ~2^-9 of it and fails the same bound."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 576)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((96, 576)) / 24, jnp.bfloat16)
    w64 = np.asarray(w.astype(jnp.float32), np.float64)
    ref = x.astype(np.float64) @ w64.T
    scale = np.abs(x).astype(np.float64) @ np.abs(w64).T  # error bounds scale with sum |x w|
    bound = 16 * np.finfo(np.float32).eps * scale
    ours = np.asarray(exact_bf16_product(jnp.asarray(x), w), np.float64)
    assert ours.dtype == np.float64 and np.all(np.abs(ours - ref) <= bound)
    # Negative control: the high piece only.
    x_hi = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    assert np.any(np.abs(x_hi @ w64.T - ref) > bound)
    # The [in, out] orientation (another kernel, another summation order) is as accurate.
    io = np.asarray(exact_bf16_product(jnp.asarray(x), w.T, "io"), np.float64)
    assert np.all(np.abs(io - ref) <= bound)


def test_with_storage_keeps_the_computation(pair, hf_bf16):
    f32, b16 = pair
    lp = b16.params["layers"][0]
    assert b16.params["embed"].dtype == jnp.bfloat16
    assert {lp[n].dtype for n in ("wqkv_t", "wo_t", "w_gate_up_t", "w_down_t")} == {
        jnp.dtype(jnp.bfloat16)
    }
    assert lp["attn_norm"].dtype == jnp.float32 and b16.dtype == jnp.float32
    # Half the bytes of the matrices, losslessly: storing back gives the float32 params.
    size = sum(x.nbytes for x in jax.tree.leaves(b16.params))
    assert size < 0.6 * sum(x.nbytes for x in jax.tree.leaves(f32.params))
    back = b16.with_storage(jnp.float32)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(f32.params))
    )
    # float32 logits: HF's and the float32-stored model's, to float32 rounding.
    ids = RAGGED_PROMPTS[2]
    ours = np.asarray(b16.logits(ids))
    np.testing.assert_allclose(ours, np.asarray(f32.logits(ids)), rtol=0, atol=2e-5)
    with torch.no_grad():
        hf = hf_bf16(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, hf, rtol=0, atol=1e-4)


def test_with_storage_refuses_to_round(make_hf_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
    monkeypatch.setattr(storage, "measure", _no_probe)  # float32 weights: nothing to measure
    hf = make_hf_model("llama", seed=6)
    model = specjax.model_from_hf(hf)
    assert _matrix_dtype(model) == jnp.float32 and not (tmp_path / "auto").exists()
    with pytest.raises(ValueError, match=r"storage='int8': valid values are 'auto'"):
        specjax.model_from_hf(hf, storage="int8")
    with pytest.raises(ValueError, match="storage='float32' for a model computing in bfloat16"):
        specjax.model_from_hf(hf, dtype=jnp.bfloat16, storage="float32")
    with pytest.raises(ValueError, match=r"layer 0 \w+ is not exactly representable in bfloat16"):
        model.with_storage(jnp.bfloat16)
    with pytest.raises(TypeError, match="floating dtype"):
        model.with_storage(jnp.int8)


def _own_dicts(model):
    return dataclasses.replace(model, params=model.with_storage(jnp.float32).params)


def test_stored_in_place_equals_with_storage(pair):
    f32, b16 = pair
    # load_model's conversion in the model's own dicts: refused before anything is converted,
    # here with every layer exact and only the last matrix converted (the embedding) inexact.
    bad = _own_dicts(f32)
    bad.params["embed"] = bad.params["embed"].at[0, 0].add(1e-6)
    with pytest.raises(ValueError, match="embed is not exactly representable in bfloat16"):
        storage.stored(bad, jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bad.params)} == {jnp.dtype(jnp.float32)}
    copy = _own_dicts(f32)
    mine = storage.stored(copy, jnp.bfloat16)
    assert mine.params["layers"] is copy.params["layers"]  # converted where it was
    for a, b in zip(jax.tree.leaves(mine.params), jax.tree.leaves(b16.params), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("layout", ["unrolled", "scan"])
def test_bf16_storage_greedy_equals_ar(pair, layout):
    """A token-level drafter and a feature-level tree against the bfloat16-stored target,
    ragged batch: its greedy output is the same target's plain greedy output, and that is the
    float32-stored model's."""
    f32, b16 = pair
    b16 = b16.with_layout(layout)
    ar = specjax.generate(b16, RAGGED_PROMPTS, max_new_tokens=NEW).tokens
    assert ar == specjax.generate(f32, RAGGED_PROMPTS, max_new_tokens=NEW).tokens
    makers = {
        "ngram": lambda: drafters.ngram(k=4),
        # EAGLE-1 reads the target's (bfloat16-stored) embedding and head.
        "eagle_tree": lambda: drafters.eagle(
            echo_eagle1(b16), tree=drafters.DynamicTree(nodes=5, depth=3, top_k=2)
        ),
    }
    for name, make in makers.items():
        out = specjax.generate(b16, RAGGED_PROMPTS, max_new_tokens=NEW, drafter=make())
        assert out.tokens == ar, name
        assert sum(out.stats["acceptance_histogram"][1:]) > 0, name


# ----------------------------------------------------------------------------- load_model's choice


@pytest.fixture
def bf16_dir(tmp_path, hf_bf16, monkeypatch):
    """A bfloat16 checkpoint on disk (saved as torch bfloat16) and an empty $SPECJAX_CACHE."""
    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path / "cache"))
    path = str(tmp_path / "hf")
    copy.deepcopy(hf_bf16).to(torch.bfloat16).save_pretrained(path)  # the fixture stays as is
    return path


def _matrix_dtype(model):
    return model.params["layers"][0]["wqkv_t"].dtype


def _says(choice):
    """A stand-in for the timing probe: bfloat16 storage 30% faster, or 30% slower."""
    fast, slow = [7.0, 14.0], [10.0, 20.0]
    return lambda f32, b16, **kw: {
        "float32": slow if choice == "bfloat16" else fast,
        "bfloat16": fast if choice == "bfloat16" else slow,
    }


def _no_probe(*a, **kw):
    raise AssertionError("the storage probe ran")


def test_load_model_measures_storage_once(bf16_dir, pair, hf_bf16, monkeypatch):
    """A bfloat16 checkpoint: load_model measures once (cached per device and model shape)
    and keeps what measured faster; the output is the float32-stored model's either way.
    model_from_hf (an in-memory HF model) chooses the same way."""
    f32, _ = pair
    monkeypatch.setattr(storage, "measure", _says("bfloat16"))
    b16 = specjax.load_model(bf16_dir)
    assert _matrix_dtype(b16) == jnp.bfloat16 and b16.dtype == jnp.float32
    path = storage.cache_path(b16)
    with open(path) as f:
        assert '"choice": "bfloat16"' in f.read()
    monkeypatch.setattr(storage, "measure", _no_probe)  # read from the cache now
    assert _matrix_dtype(specjax.load_model(bf16_dir)) == jnp.bfloat16
    assert _matrix_dtype(specjax.model_from_hf(hf_bf16)) == jnp.bfloat16  # the same cache entry
    assert _matrix_dtype(specjax.model_from_hf(hf_bf16, storage=None)) == jnp.float32
    ar = specjax.generate(f32, RAGGED_PROMPTS[:2], max_new_tokens=8).tokens
    assert specjax.generate(b16, RAGGED_PROMPTS[:2], max_new_tokens=8).tokens == ar
    # A small-model drafter stored in bfloat16 against the float32-stored target.
    out = specjax.generate(
        f32, RAGGED_PROMPTS[:2], max_new_tokens=8, drafter=drafters.small_model(b16, k=3)
    )
    assert out.tokens == ar and sum(out.stats["acceptance_histogram"][1:]) > 0
    # The slower choice cached: float32 storage, without measuring again.
    storage.store_json(path, {"version": storage.STORAGE_VERSION, "choice": "float32"})
    assert _matrix_dtype(specjax.load_model(bf16_dir)) == jnp.float32
    # Asked for: no measurement.
    assert _matrix_dtype(specjax.load_model(bf16_dir, storage="bfloat16")) == jnp.bfloat16
    # A damaged cache is measured again.
    with open(path, "w") as f:
        f.write("{not json")
    monkeypatch.setattr(storage, "measure", _says("float32"))
    assert _matrix_dtype(specjax.load_model(bf16_dir)) == jnp.float32


def test_storage_probe_runs_both_storages(pair):
    """The real probe: both storages timed at every probed size (which wins is the device's)."""
    f32, b16 = pair
    ms = storage.measure(f32, b16, sizes=(1, 4), prefix=16, repeats=2)
    assert set(ms) == {"float32", "bfloat16"}
    assert all(len(v) == 2 and min(v) > 0 for v in ms.values())
    assert storage.choose(ms) in ("float32", "bfloat16")
    assert storage.choose({"float32": [10.0, 20.0], "bfloat16": [9.0, 19.8]}) == "float32"
    assert storage.choose({"float32": [10.0, 20.0], "bfloat16": [9.0, 18.0]}) == "bfloat16"
    assert 1 <= storage.probe_layers(f32) <= f32.config.num_layers
    # The scan layout (stacked layers, one cache for all) probes too, its choice kept apart.
    scan = storage._truncated(f32.with_layout("scan"), 1)
    ms = storage.measure(scan, scan.with_storage(jnp.bfloat16), sizes=(2,), prefix=8, repeats=1)
    assert all(len(v) == 1 and v[0] > 0 for v in ms.values())
    assert storage.cache_path(f32.with_layout("scan")) != storage.cache_path(f32)


def test_float32_weights_are_not_measured(tmp_path, tiny_dir, monkeypatch):
    """Weights bfloat16 cannot hold stay in float32 without a probe; bad storage values and a
    rounding request fail with the valid values named."""
    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
    monkeypatch.setattr(storage, "measure", _no_probe)
    assert _matrix_dtype(specjax.load_model(tiny_dir)) == jnp.float32
    assert not (tmp_path / "auto").exists()
    with pytest.raises(ValueError, match=r"storage='int8': valid values are 'auto'"):
        specjax.load_model(tiny_dir, storage="int8")
    with pytest.raises(ValueError, match="is not exactly representable in bfloat16"):
        specjax.load_model(tiny_dir, storage=jnp.bfloat16)
    assert _matrix_dtype(specjax.load_model(tiny_dir, storage="float32")) == jnp.float32
    assert _matrix_dtype(specjax.load_model(tiny_dir, storage=None)) == jnp.float32
    # Refused before loading anything (the path does not exist).
    with pytest.raises(ValueError, match="storage='float32' for a model computing in bfloat16"):
        specjax.load_model(str(tmp_path / "absent"), dtype=jnp.bfloat16, storage="float32")
