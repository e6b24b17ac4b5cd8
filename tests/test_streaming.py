"""Loading an HF safetensors checkpoint streams it tensor by tensor (`stream_hf_dir`): the same
params as the all-at-once path, and a peak host RSS near the placed params plus the largest
tensor, measured on a random ~315 MB model (4 safetensors shards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from checkpoints_convert.hf import load_hf_dir, stream_hf_dir
from specjax.models import unstack_layers

MEASURE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from checkpoints_convert.hf import load_hf_dir, stream_hf_dir

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    path, how = sys.argv[1], sys.argv[2]
    jnp.zeros(1).block_until_ready()  # the backend is up before the measurement
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current RSS
    base = status("VmRSS")
    if how == "stream":
        params, _ = stream_hf_dir(path, np.float32)
    elif how == "orbax":  # a converted checkpoint: restored whole, placed leaf by leaf
        import specjax
        params = specjax.load_model(path).params
    else:  # the all-at-once path: every tensor on the host, stacked, then placed
        params, _ = load_hf_dir(path)
        params = jax.tree.map(jnp.asarray, params)
    jax.block_until_ready(params)
    leaves = jax.tree.leaves(params)
    print("RESULT " + json.dumps({"grew": status("VmHWM") - base,
                                  "params": sum(x.nbytes for x in leaves),
                                  "largest": max(x.nbytes for x in leaves)}))
""")


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory):
    """A random Llama of 78.6 M params (315 MB in float32) in 4 safetensors shards."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=16384,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("big") / "hf")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="100MB")
    assert sum(f.endswith(".safetensors") for f in os.listdir(path)) == 4
    return path


def test_streamed_params_equal_the_full_load(big_dir):
    streamed, cfg = stream_hf_dir(big_dir, np.float32)
    full, cfg_full = load_hf_dir(big_dir)
    assert cfg == cfg_full
    full = unstack_layers(full)
    assert jax.tree.structure(streamed) == jax.tree.structure(full)
    for a, b in zip(jax.tree.leaves(streamed), jax.tree.leaves(full)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # bfloat16 end to end (the accelerator dtype): the same values as casting the full load
    bf, _ = stream_hf_dir(big_dir, jnp.bfloat16)
    a, b = bf["layers"][2]["wqkv"], full["layers"][2]["wqkv"]
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a), np.asarray(jnp.asarray(b, jnp.bfloat16)))
    # load_model streams: its greedy output is that of the full load
    model = specjax.load_model(big_dir)
    ref = specjax.Model(params=jax.tree.map(jnp.asarray, full), config=cfg)
    ref = ref.with_orientation(model.orientation)  # the same products, in the same order
    prompt = [[1, 5, 9, 200, 7]]
    assert np.array_equal(np.asarray(model.logits(prompt)), np.asarray(ref.logits(prompt)))


@pytest.fixture(scope="module")
def converted_dir(big_dir, tmp_path_factory):
    from checkpoints_convert import save_converted

    model = specjax.load_model(big_dir)
    return save_converted(str(tmp_path_factory.mktemp("conv") / "ckpt"), model.params, model.config)


def _measure(path: str, how: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, path, how], capture_output=True, text=True, timeout=300
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_peak_host_memory_while_streaming(big_dir, converted_dir):
    """The peak RSS grows by the placed params (on CPU the device arrays live in host memory)
    plus about two copies of one tensor (read, then transposed), not by the whole model twice:
    grew <= params + 2.5 x largest + 64 MB. The all-at-once path exceeds that bound (a control
    that the measurement can tell them apart); loading a converted orbax checkpoint stays
    within it."""
    runs = {how: _measure(big_dir, how) for how in ("stream", "full")}
    runs["orbax"] = _measure(converted_dir, "orbax")
    s = runs["stream"]
    bound = s["params"] + 2.5 * s["largest"] + 64 * 2**20
    print({k: {n: round(v / 2**20) for n, v in r.items()} for k, r in runs.items()})
    assert s["params"] > 300 * 2**20
    assert s["grew"] <= bound, (s, bound)
    assert runs["full"]["grew"] > bound, runs["full"]
    # a converted (orbax) checkpoint: restored whole, then placed leaf by leaf (each host leaf
    # freed once placed): measured 488 MiB; orbax's restore holds about one more tensor in
    # flight, so one largest tensor more is allowed (still well below the all-at-once path)
    assert runs["orbax"]["params"] == s["params"]
    assert runs["orbax"]["grew"] <= bound + s["largest"] < runs["full"]["grew"], runs["orbax"]


def test_bfloat16_checkpoint_streams_like_the_full_load(make_hf_model, tmp_path):
    """A checkpoint stored in bfloat16 (how most published models ship): read as bf16 and
    widened, the same values as the all-at-once path."""
    import torch

    make_hf_model("llama", num_hidden_layers=2).to(torch.bfloat16).save_pretrained(tmp_path)
    streamed, _ = stream_hf_dir(str(tmp_path), np.float32)
    full, _ = load_hf_dir(str(tmp_path))
    full = unstack_layers(full)
    for a, b in zip(jax.tree.leaves(streamed), jax.tree.leaves(full)):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), b)
