"""Checkpoint loading: HF safetensors directories (single file and sharded), checked name/shape
mapping with errors that name the offending tensor, and orbax round trips of converted models."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import specjax
from checkpoints_convert import CheckpointMismatch, is_converted_dir, load_converted, save_converted
from specjax.models import FAMILIES as SUPPORTED_MODEL_TYPES

ATOL = 1e-4


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 101, size=(2, 16)).astype(np.int32)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, make_hf_model):
    """A tiny untied GQA Llama saved with save_pretrained (one model.safetensors)."""
    hf = make_hf_model("llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("hf") / "llama"
    hf.save_pretrained(path)
    return hf, path


def edited_copy(src, dst, edit):
    """Copy an HF checkpoint dir, applying `edit(tensors: dict)` to its model.safetensors."""
    os.makedirs(dst)
    for f in os.listdir(src):
        if f != "model.safetensors":
            with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
                b.write(a.read())
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


# ----------------------------------------------------------------------------- HF directories


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", dict()),
        ("qwen2", dict()),  # q/k/v biases
        ("llama", dict(tie_word_embeddings=True)),  # save_pretrained drops the tied lm_head
    ],
    ids=["llama", "qwen2", "llama-tied"],
)
def test_load_hf_safetensors_dir(family, overrides, tmp_path, make_hf_model, ids):
    hf = make_hf_model(family, **overrides)
    hf.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")
    model = specjax.load_model(str(tmp_path))
    assert model.config.model_type == family
    assert model.config.tie_word_embeddings == bool(overrides.get("tie_word_embeddings"))
    assert model.tokenizer is None  # none was saved
    assert max_err(model.logits(ids), hf_logits(hf, ids)) < ATOL
    # Same params as the in-memory conversion.
    np.testing.assert_array_equal(
        np.asarray(model.logits(ids)), np.asarray(specjax.model_from_hf(hf).logits(ids))
    )


def test_load_sharded_safetensors(tmp_path, make_hf_model, ids):
    hf = make_hf_model("llama", tie_word_embeddings=True)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.isfile(tmp_path / "model.safetensors.index.json")
    model = specjax.load_model(str(tmp_path))
    assert max_err(model.logits(ids), hf_logits(hf, ids)) < ATOL


MISMATCHES = {
    # name -> (edit of the tensor dict, key that the error must name)
    "missing-layer-tensor": (
        lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
        "model.layers.1.self_attn.k_proj.weight",
    ),
    "missing-top-tensor": (lambda t: t.pop("model.norm.weight"), "model.norm.weight"),
    "missing-lm-head": (lambda t: t.pop("lm_head.weight"), "lm_head.weight"),
    "unknown-tensor": (
        lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}),
        "model.layers.0.self_attn.q_norm.weight",
    ),
    "extra-layer": (
        lambda t: t.update(
            {"model.layers.2.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"]}
        ),
        "model.layers.2.mlp.up_proj.weight",
    ),
    "extra-top-level": (
        lambda t: t.update({"model.extra_head.weight": np.ones((2, 2), np.float32)}),
        "model.extra_head.weight",
    ),
    "wrong-shape-layer": (
        lambda t: t.update(
            {"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"][:-1]}
        ),
        "model.layers.0.mlp.up_proj.weight",
    ),
    "transposed-layer": (
        lambda t: t.update(
            {
                "model.layers.1.mlp.down_proj.weight": t[
                    "model.layers.1.mlp.down_proj.weight"
                ].T.copy()
            }
        ),
        "model.layers.1.mlp.down_proj.weight",
    ),
    "wrong-shape-embed": (
        lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:50]}),
        "model.embed_tokens.weight",
    ),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_checkpoint_mismatch_names_the_tensor(case, llama_dir, tmp_path):
    _, src = llama_dir
    edit, key = MISMATCHES[case]
    bad = edited_copy(src, tmp_path / "bad", edit)
    with pytest.raises(CheckpointMismatch, match=re.escape(key)):
        specjax.load_model(str(bad))


def test_config_disagreeing_with_tensors(llama_dir, tmp_path):
    """config.json says 1 layer, the tensors hold 2: layer 1's tensors are reported unused."""
    _, src = llama_dir
    bad = edited_copy(src, tmp_path / "bad", lambda t: None)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatch, match=re.escape("model.layers.1.")):
        specjax.load_model(str(bad))


def test_unmodified_copy_loads(llama_dir, tmp_path, ids):
    """Control for the mismatch tests: the same copy with no edit loads and matches HF."""
    hf, src = llama_dir
    good = edited_copy(src, tmp_path / "good", lambda t: None)
    assert max_err(specjax.load_model(str(good)).logits(ids), hf_logits(hf, ids)) < ATOL


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "architectures": ["GPT2LMHeadModel"],
                "vocab_size": 50,
                "n_embd": 16,
                "n_layer": 2,
                "n_head": 2,
            }
        )
    )
    with pytest.raises(ValueError) as err:
        specjax.load_model(str(tmp_path))
    msg = str(err.value)
    assert "gpt2" in msg
    for supported in SUPPORTED_MODEL_TYPES:
        assert supported in msg


def test_unknown_model_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so "no-such-model" is not a path either
    with pytest.raises(ValueError) as err:
        specjax.load_model("no-such-model")
    msg = str(err.value)
    assert "no-such-model" in msg
    for name in specjax.model.KNOWN_MODELS:
        assert name in msg


def test_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 10,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            }
        )
    )
    with pytest.raises(FileNotFoundError, match="safetensors"):
        specjax.load_model(str(tmp_path))


# ----------------------------------------------------------------------------- orbax


@pytest.fixture(scope="module")
def converted(tmp_path_factory, make_hf_model):
    hf = make_hf_model("qwen2", num_hidden_layers=2)
    model = specjax.model_from_hf(hf)
    dst = tmp_path_factory.mktemp("conv") / "qwen"
    out = save_converted(str(dst), model.params, model.config, tokenizer=None)
    return model, out


def test_orbax_round_trip(converted, ids):
    model, path = converted
    assert is_converted_dir(path)
    assert not os.path.exists(path + ".partial")
    assert not os.path.exists(os.path.join(path, "tokenizer"))
    loaded = specjax.load_model(path)
    assert loaded.config == model.config
    assert loaded.tokenizer is None
    np.testing.assert_array_equal(np.asarray(loaded.logits(ids)), np.asarray(model.logits(ids)))
    params, cfg, tok = load_converted(path)
    assert cfg == model.config and tok is None
    np.testing.assert_array_equal(
        params["layers"]["bqkv"], np.asarray(model.with_layout("scan").params["layers"]["bqkv"])
    )


def test_save_converted_overwrites(converted, tmp_path, make_hf_model, ids):
    """Saving over an existing converted dir replaces it completely (when asked to)."""
    model, _ = converted
    dst = str(tmp_path / "m")
    other = specjax.model_from_hf(make_hf_model("llama", seed=5))
    save_converted(dst, other.params, other.config)
    save_converted(dst, model.params, model.config, overwrite=True)
    np.testing.assert_array_equal(
        np.asarray(specjax.load_model(dst).logits(ids)), np.asarray(model.logits(ids))
    )


def _corrupt_config(src_path, dst, mutate):
    import shutil

    shutil.copytree(src_path, dst)
    cfg_file = os.path.join(dst, "specjax_config.json")
    with open(cfg_file) as f:
        meta = json.load(f)
    mutate(meta)
    with open(cfg_file, "w") as f:
        json.dump(meta, f)
    return str(dst)


def test_corrupted_converted_num_layers(converted, tmp_path):
    _, path = converted

    def more_layers(meta):
        meta["config"]["num_layers"] += 1

    bad = _corrupt_config(path, tmp_path / "bad", more_layers)
    with pytest.raises(CheckpointMismatch) as err:
        specjax.load_model(bad)
    msg = str(err.value)
    assert "specjax_config.json" in msg and "layers/wq" in msg
    assert "(2, 32, 32)" in msg and "(3, 32, 32)" in msg  # what is there vs what is needed
    assert "convert the model again" in msg.lower()


def test_corrupted_converted_hidden_size(converted, tmp_path):
    _, path = converted

    def wider(meta):
        meta["config"]["hidden_size"] = 48

    bad = _corrupt_config(path, tmp_path / "bad", wider)
    with pytest.raises(CheckpointMismatch, match="embed"):
        specjax.load_model(bad)


def test_corrupted_converted_config_json(converted, tmp_path):
    _, path = converted
    bad = _corrupt_config(path, tmp_path / "bad", lambda m: m["config"].pop("vocab_size"))
    with pytest.raises(ValueError, match="specjax_config.json"):
        specjax.load_model(bad)
    bad2 = _corrupt_config(path, tmp_path / "bad2", lambda m: m.update(format_version=99))
    with pytest.raises(ValueError, match="format"):
        specjax.load_model(bad2)


def test_converted_without_params(converted, tmp_path):
    import shutil

    _, path = converted
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    shutil.rmtree(bad / "params")
    with pytest.raises(FileNotFoundError, match="params"):
        specjax.load_model(str(bad))


# ----------------------------------------------------------------------------- GGUF files


def write_gguf(path, hf_model, arch: str, extra_kv: dict | None = None) -> None:
    """An HF model written as llama.cpp's converter writes it: `<arch>.*` metadata, llama q/k
    rows permuted per head, matrices quantized to Q8_0, the embedding in F16, norms/biases F32."""
    import gguf

    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_vocab_size(c.vocab_size)
    w.add_eos_token_id(0)
    for key, value in (extra_kv or {}).items():
        w.add_string(key, value)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    layer |= {f"self_attn.{p}_proj": f"attn_{g}" for p, g in zip("qkvo", ["q", "k", "v", "output"])}
    layer |= {f"mlp.{p}_proj": f"ffn_{p}" for p in ("gate", "up", "down")}
    for name, t in hf_model.state_dict().items():
        a = t.detach().numpy().astype(np.float32)
        parts = name.split(".")
        if parts[1] == "layers":
            g = f"blk.{parts[2]}.{layer['.'.join(parts[3:-1])]}.{parts[-1]}"
        else:
            g = f"{names[parts[-2]]}.{parts[-1]}"
        heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
        kind = g.split(".")[-2]
        if arch == "llama" and kind in heads:  # llama.cpp's permutation, forward direction
            n = heads[kind]
            a = a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        if g == "token_embd.weight":
            w.add_tensor(g, a.astype(np.float16))
        elif a.ndim == 2:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_direct_reader_equals_transformers(arch, tmp_path, make_hf_model):
    """`read_gguf` (gguf-py + numpy) gives the tensors and config transformers gives for the
    same file, bit for bit: de-quantized values, llama's q/k row order (GQA: q and k have
    different head counts), Qwen2's biases, tied/untied head."""
    import transformers

    from checkpoints_convert.gguf_file import read_gguf
    from specjax.models.config import ModelConfig

    hf = make_hf_model(arch, hidden_size=64, intermediate_size=64, tie_word_embeddings=False)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, hf, arch)
    state, cfg = read_gguf(str(path))
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    )
    ref = {k: v.detach().numpy() for k, v in ref_model.state_dict().items()}
    assert set(state) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(state[k], ref[k], err_msg=k)
    assert ModelConfig.from_hf(cfg) == ModelConfig.from_hf(ref_model.config)
    # The file is really quantized: Q8_0 changed the values the reader had to de-quantize.
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(q, hf.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy())


def test_parsed_once_gives_transformers_the_same_model(tmp_path, make_hf_model):
    """Inside `parsed_once` transformers' GGUF model loader reads the same tensors and config
    as without it, the file's metadata is parsed once for all readers, and
    gguf-py's module attributes are restored after the block (also after an error)."""
    import gguf
    import transformers

    from checkpoints_convert.gguf_file import parsed_once, read_gguf

    hf = make_hf_model("llama", hidden_size=64, intermediate_size=64, tie_word_embeddings=False)
    path = tmp_path / "m.gguf"
    write_gguf(path, hf, "llama")

    def load() -> tuple[dict, dict]:
        m = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file=path.name, dtype=torch.float32
        )
        return {k: v.detach().numpy() for k, v in m.state_dict().items()}, m.config.to_dict()

    ref, ref_cfg = load()
    original = gguf.GGUFReader, gguf.get_tensor_name_map
    parses = []

    class Counting(original[0]):
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    gguf.GGUFReader = Counting
    try:
        with parsed_once():
            state, cfg = load()
            read_gguf(str(path))  # this module's reader shares the parse too
    finally:
        restored = gguf.GGUFReader
        gguf.GGUFReader = original[0]
    assert restored is Counting and gguf.get_tensor_name_map is original[1]
    assert len(parses) == 1, parses  # transformers alone parses it twice (config, tensors)
    assert cfg == ref_cfg and set(state) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(state[k], ref[k], err_msg=k)
    with pytest.raises(RuntimeError), parsed_once():
        raise RuntimeError("a loader failed")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == original


def test_gguf_unmapped_metadata_goes_through_transformers(tmp_path, make_hf_model):
    """A metadata key the direct reader does not map (here rope scaling) is never ignored: the
    file is left to transformers (read_gguf -> None)."""
    from checkpoints_convert.gguf_file import read_gguf

    hf = make_hf_model("llama", hidden_size=64, intermediate_size=64)
    path = tmp_path / "scaled.gguf"
    write_gguf(path, hf, "llama", extra_kv={"llama.rope.scaling.type": "linear"})
    assert read_gguf(str(path)) is None
    write_gguf(tmp_path / "plain.gguf", hf, "llama")
    assert read_gguf(str(tmp_path / "plain.gguf")) is not None
