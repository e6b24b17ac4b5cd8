"""HF-format EAGLE-1/2 and EAGLE-3 drafter checkpoints (checkpoints_convert/eagle_hf.py).

Random-weight checkpoints are written in the layout SafeAILab/EAGLE, vLLM and SGLang use
(torch tensors, config.json), loaded into specjax's feature drafter, and compared with an
independent float64 torch forward written here from the HF definitions: one Llama decoder
layer with RoPE, GQA and causal attention.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import specjax
from checkpoints_convert.eagle_hf import CheckpointMismatch, load_eagle_hf, save_eagle_hf
from specjax.models import eagle as E
from specjax.models.cache import init_cache
from specjax.models.llama import Hiddens

from conftest import RAGGED_PROMPTS

B, T = 2, 7
DRAFT_VOCAB = 64
LAYER = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


# ----------------------------------------------------------------------------- checkpoints


def hf_config(target, version, **over):
    """A drafter config.json as SafeAILab writes it (a LlamaConfig): its own intermediate size
    and RoPE base, so a loader that copied the target's would fail the parity tests."""
    c = target.config
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3" if version == 3 else "LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": 40,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 5000.0,
        "max_position_embeddings": 2048,
        "vocab_size": c.vocab_size,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
    }
    if version == 3:
        cfg["draft_vocab_size"] = DRAFT_VOCAB
    cfg.update(over)
    return cfg


def _rand(gen, shape, kind):
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if kind == "norm":
        return 1.0 + 0.1 * x
    if kind == "bias":
        return 0.5 * x
    return x / shape[-1] ** 0.5  # Linear weight [out, in]


def hf_state(target, version, seed=0, prefix=None, embed=True, cfg=None):
    """Random torch tensors in the HF EAGLE layout (keys and [out, in] shapes of the format)."""
    cfg = cfg or hf_config(target, version)
    gen = torch.Generator().manual_seed(seed)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = D // H
    d_in = D if version == 1 else 2 * D
    prefix = prefix or ("layers.0." if version == 1 else "midlayer.")
    shapes = (
        (H * hd, d_in),
        (KV * hd, d_in),
        (KV * hd, d_in),
        (D, H * hd),
        (D,),
        (F, D),
        (F, D),
        (D, F),
    )
    sd = {prefix + k: _rand(gen, s, "norm" if len(s) == 1 else "w") for k, s in zip(LAYER, shapes)}
    if version == 1:
        sd["fc.weight"] = _rand(gen, (D, 2 * D), "w")
        if cfg.get("bias", True):
            sd["fc.bias"] = _rand(gen, (D,), "bias")
    else:
        n = len(cfg.get("eagle_aux_hidden_state_layer_ids") or (0, 0, 0))
        Vd = cfg.get("draft_vocab_size", V)
        sd["fc.weight"] = _rand(gen, (D, n * D), "w")
        sd[prefix + "input_layernorm.weight"] = _rand(gen, (D,), "norm")
        sd[prefix + "hidden_norm.weight"] = _rand(gen, (D,), "norm")
        sd["norm.weight"] = _rand(gen, (D,), "norm")
        sd["lm_head.weight"] = _rand(gen, (Vd, D), "w")
        # SafeAILab's maps: a sorted random subset of target ids, d2t as offsets, t2d as mask.
        ids = np.sort(np.random.default_rng(seed).choice(V, Vd, replace=False))
        sd["d2t"] = torch.tensor(ids - np.arange(Vd), dtype=torch.int64)
        t2d = torch.zeros(V, dtype=torch.bool)
        t2d[torch.tensor(ids)] = True
        sd["t2d"] = t2d
    if embed:  # the frozen copy of the target's embedding some checkpoints carry
        sd["embed_tokens.weight"] = torch.tensor(np.asarray(target.params["embed"]))
    return sd


def write_ckpt(path, cfg, sd, fmt="safetensors"):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    if fmt == "safetensors":
        save_file(sd, os.path.join(path, "model.safetensors"))
    elif fmt == "bin":
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    elif fmt == "sharded":
        keys = sorted(sd)
        shards = {
            "model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2],
        }
        for name, ks in shards.items():
            save_file({k: sd[k] for k in ks}, os.path.join(path, name))
        index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)
    else:
        raise ValueError(fmt)
    return path


# ----------------------------------------------------------------------------- torch reference


def rms(x, w, eps):
    return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps))


def ref_layer(sd, prefix, cfg, x, resid):
    """One Llama decoder layer (HF definition) with attention input x and residual `resid`,
    causal over positions 0..T-1. float64."""
    w = {k: sd[prefix + k].double() for k in LAYER}
    Bx, Tx, _ = x.shape
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // H
    q = (x @ w["self_attn.q_proj.weight"].T).view(Bx, Tx, H, hd).transpose(1, 2)  # B H T hd
    k = (x @ w["self_attn.k_proj.weight"].T).view(Bx, Tx, KV, hd).transpose(1, 2)
    v = (x @ w["self_attn.v_proj.weight"].T).view(Bx, Tx, KV, hd).transpose(1, 2)
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(Tx, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rotate_half(t):
        return torch.cat([-t[..., hd // 2 :], t[..., : hd // 2]], -1)

    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
    s = q @ k.transpose(-1, -2) / hd**0.5
    s = s.masked_fill(~torch.tril(torch.ones(Tx, Tx, dtype=torch.bool)), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(Bx, Tx, H * hd)
    h = resid + o @ w["self_attn.o_proj.weight"].T
    m = rms(h, w["post_attention_layernorm.weight"], cfg["rms_norm_eps"])
    gate, up = m @ w["mlp.gate_proj.weight"].T, m @ w["mlp.up_proj.weight"].T
    return h + (torch.nn.functional.silu(gate) * up) @ w["mlp.down_proj.weight"].T


def _target_tensors(target):
    embed = torch.tensor(np.asarray(target.params["embed"]), dtype=torch.float64)
    head = (
        embed.T
        if target.config.tie_word_embeddings
        else torch.tensor(np.asarray(target.params["lm_head"]), dtype=torch.float64)
    )
    return embed, head  # head: [D, V]


def ref_eagle1(target, sd, cfg, tokens, feat):
    embed, head = _target_tensors(target)
    e = embed[torch.as_tensor(tokens)]
    h = torch.cat([e, feat], -1) @ sd["fc.weight"].double().T
    if "fc.bias" in sd:
        h = h + sd["fc.bias"].double()
    out = ref_layer(sd, "layers.0.", cfg, h, h)
    return out, out @ head


def ref_eagle3(target, sd, cfg, tokens, layers, prefix="midlayer."):
    embed, _ = _target_tensors(target)
    e = embed[torch.as_tensor(tokens)]
    eps = cfg["rms_norm_eps"]
    g = torch.cat(list(layers), -1) @ sd["fc.weight"].double().T
    x = torch.cat(
        [
            rms(e, sd[prefix + "input_layernorm.weight"].double(), eps),
            rms(g, sd[prefix + "hidden_norm.weight"].double(), eps),
        ],
        -1,
    )
    out = ref_layer(sd, prefix, cfg, x, g)
    return out, rms(out, sd["norm.weight"].double(), eps) @ sd["lm_head.weight"].double().T


def run_drafter(target, cfg, params, tokens, feat=None, layers=None):
    """specjax: draft_block over a fresh cache at positions 0..T-1, then the head."""
    bound = E.bind_target(params, target.params)
    if cfg.version == 1:
        f = jnp.asarray(feat.numpy(), jnp.float32)
    else:
        hid = Hiddens(last=None, layers=jnp.asarray(torch.stack(layers).numpy(), jnp.float32))
        f = E.target_features(cfg, bound, hid)
    cache = init_cache(cfg.layer, B, T + 2, jnp.float32, per_layer=True)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out, _ = E.draft_block(cfg, bound, f, jnp.asarray(tokens, jnp.int32), pos, cache)
    return (
        np.asarray(out),
        np.asarray(E.draft_logits(cfg, bound, out, target.config, full=False)),
        bound,
    )


def inputs(target, n_layers=0, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, target.config.vocab_size, (B, T))
    D = target.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    if n_layers == 0:
        return tokens, torch.randn(B, T, D, generator=g, dtype=torch.float64)
    return tokens, [torch.randn(B, T, D, generator=g, dtype=torch.float64) for _ in range(n_layers)]


def close(a, b):
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), atol=1e-4, rtol=1e-4
    )


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded"])
def test_eagle1_matches_torch_reference(target, tmp_path, fmt):
    cfg_json = hf_config(target, 1)
    sd = hf_state(target, 1, seed=1)
    cfg, params = load_eagle_hf(
        write_ckpt(tmp_path / "e1", cfg_json, sd, fmt),
        target.config,
        target_embed=target.params["embed"],
    )
    assert cfg.version == 1 and cfg.fc_bias and "fc_b" in params
    assert cfg.layer.intermediate_size == 40 and cfg.layer.rope_theta == 5000.0
    assert cfg.layer.rms_norm_eps == 1e-5 and cfg.layer.num_layers == 1
    tokens, feat = inputs(target)
    out, logits, _ = run_drafter(target, cfg, params, tokens, feat=feat)
    ref_out, ref_logits = ref_eagle1(target, sd, cfg_json, tokens, feat)
    close(out, ref_out)
    close(logits, ref_logits)


def test_eagle1_without_bias(target, tmp_path):
    cfg_json = hf_config(target, 1, bias=False)
    sd = hf_state(target, 1, seed=2, cfg=cfg_json, embed=False)
    cfg, params = load_eagle_hf(
        write_ckpt(tmp_path / "e1", cfg_json, sd),
        target.config,
        target_embed=target.params["embed"],
    )
    assert not cfg.fc_bias and "fc_b" not in params
    tokens, feat = inputs(target, seed=2)
    out, _, _ = run_drafter(target, cfg, params, tokens, feat=feat)
    close(out, ref_eagle1(target, sd, cfg_json, tokens, feat)[0])


@pytest.mark.parametrize(
    "prefix,layer_ids",
    [
        ("midlayer.", None),  # feature layers: EAGLE-3's default for the target
        ("layers.0.", [1, 2, 3]),  # vLLM / speculators style: layer name and explicit ids
    ],
)
def test_eagle3_matches_torch_reference(target, tmp_path, prefix, layer_ids):
    over = {} if layer_ids is None else {"eagle_aux_hidden_state_layer_ids": layer_ids}
    cfg_json = hf_config(target, 3, **over)
    sd = hf_state(target, 3, seed=3, prefix=prefix, cfg=cfg_json)
    cfg, params = load_eagle_hf(
        write_ckpt(tmp_path / "e3", cfg_json, sd),
        target.config,
        target_embed=target.params["embed"],
    )
    want_layers = (
        tuple(layer_ids) if layer_ids else E.default_feature_layers(target.config.num_layers)
    )
    assert cfg.version == 3 and cfg.feature_layers == want_layers
    assert cfg.draft_vocab == DRAFT_VOCAB and not cfg.fc_bias
    ids = np.arange(DRAFT_VOCAB) + sd["d2t"].numpy()
    np.testing.assert_array_equal(np.asarray(params["d2t"]), ids)
    assert params["d2t"].dtype == jnp.int32 and (sd["d2t"].numpy() != 0).any()

    tokens, layers = inputs(target, n_layers=3, seed=3)
    out, logits, bound = run_drafter(target, cfg, params, tokens, layers=layers)
    ref_out, ref_logits = ref_eagle3(target, sd, cfg_json, tokens, layers, prefix)
    close(out, ref_out)
    close(logits, ref_logits)
    # Over the target vocabulary: draft logits at their target ids, -inf elsewhere.
    full = np.asarray(E.draft_logits(cfg, bound, jnp.asarray(out), target.config))
    close(full[..., ids], ref_logits)
    rest = np.setdiff1d(np.arange(target.config.vocab_size), ids)
    assert np.isneginf(full[..., rest]).all()


def test_eagle3_full_vocab_without_d2t(target, tmp_path):
    V = target.config.vocab_size
    cfg_json = hf_config(target, 3)
    del cfg_json["draft_vocab_size"]  # absent: the target's vocabulary, identity map
    sd = hf_state(target, 3, seed=4, cfg=cfg_json, embed=False)
    del sd["d2t"], sd["t2d"]
    cfg, params = load_eagle_hf(
        write_ckpt(tmp_path / "e3", cfg_json, sd),
        target.config,
        target_embed=target.params["embed"],
    )
    assert cfg.draft_vocab == V
    np.testing.assert_array_equal(np.asarray(params["d2t"]), np.arange(V))


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("version", [1, 3])
def test_save_load_round_trip(target, tmp_path, version):
    cfg_json = hf_config(target, version)
    sd = hf_state(target, version, seed=5)
    cfg, params = load_eagle_hf(
        write_ckpt(tmp_path / "a", cfg_json, sd), target.config, target_embed=target.params["embed"]
    )
    save_eagle_hf(tmp_path / "b", cfg, params, target.config)
    cfg2, params2 = load_eagle_hf(tmp_path / "b", target.config)
    assert cfg2 == cfg
    assert jax_tree_equal(params, params2)
    # The written tensors are the original HF ones (the embedding is not copied by default).
    from safetensors.torch import load_file

    written = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert set(written) == set(sd) - {"embed_tokens.weight"}
    for k, v in written.items():
        assert v.dtype == sd[k].dtype, k
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    with open(tmp_path / "b" / "config.json") as f:
        saved = json.load(f)
    assert saved["rope_theta"] == 5000.0 and saved["intermediate_size"] == 40
    if version == 3:
        assert saved["eagle_aux_hidden_state_layer_ids"] == list(cfg.feature_layers)
        assert saved["draft_vocab_size"] == DRAFT_VOCAB
    # Bound params (with the target's embedding) write it as embed_tokens.weight.
    save_eagle_hf(tmp_path / "c", cfg, E.bind_target(params, target.params), target.config)
    assert "embed_tokens.weight" in load_file(str(tmp_path / "c" / "model.safetensors"))
    assert jax_tree_equal(
        load_eagle_hf(tmp_path / "c", target.config, target_embed=target.params["embed"])[1], params
    )


def test_save_load_bfloat16_from_init_params(target, tmp_path):
    ids = np.sort(np.random.default_rng(6).choice(target.config.vocab_size, 40, replace=False))
    cfg = E.make_config(target.config, 3, draft_vocab=40)
    params = E.init_params(cfg, jax.random.key(6), jnp.bfloat16, d2t=ids)
    save_eagle_hf(tmp_path / "bf", cfg, params, target.config)
    cfg2, params2 = load_eagle_hf(tmp_path / "bf", target.config, dtype=jnp.bfloat16)
    assert cfg2.feature_layers == cfg.feature_layers and cfg2.draft_vocab == 40
    assert jax_tree_equal(params, params2)


def jax_tree_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb)
    )


# ----------------------------------------------------------------------------- errors


def _load(target, path, cfg_json, sd):
    return load_eagle_hf(
        write_ckpt(path, cfg_json, sd), target.config, target_embed=target.params["embed"]
    )


MISSING = [  # (version, deleted key, expected message)
    (1, "layers.0.mlp.down_proj.weight", r"missing .*'?layers\.0\.mlp\.down_proj\.weight"),
    (3, "midlayer.hidden_norm.weight", r"missing .*midlayer\.hidden_norm\.weight"),
    # fc.bias: expected by default (SafeAILab's "bias" default), with a hint.
    (1, "fc.bias", r"fc\.bias.*\"bias\": false"),
    # A reduced draft vocabulary needs d2t.
    (3, "d2t", r"missing .*d2t"),
]


@pytest.mark.parametrize("version,key,message", MISSING)
def test_missing_key(target, tmp_path, version, key, message):
    sd = hf_state(target, version)
    del sd[key]
    with pytest.raises(CheckpointMismatch, match=message):
        _load(target, tmp_path / "x", hf_config(target, version), sd)


ALTERED = [  # (version, key, tensor written there, expected message)
    (
        1,
        "layers.0.input_layernorm.weight",
        (32,),  # EAGLE-1's layer 0 has none
        r"not used .*layers\.0\.input_layernorm",
    ),
    (3, "extra_head.weight", (3, 3), r"not used by an EAGLE-3 .*extra_head\.weight"),
    (1, "fc.weight", (32, 96), r"'fc\.weight' has shape \(32, 96\); expected \(32, 64\)"),
    (
        3,
        "lm_head.weight",
        (70, 32),  # draft_vocab_size says 64
        r"'lm_head\.weight' has shape \(70, 32\); expected \(64, 32\)",
    ),
    (3, "embed_tokens.weight", (100, 32), r"'embed_tokens\.weight' has shape \(100, 32\)"),
]


@pytest.mark.parametrize("version,key,shape,message", ALTERED)
def test_extra_key_or_wrong_shape(target, tmp_path, version, key, shape, message):
    sd = hf_state(target, version)
    sd[key] = torch.ones(shape)
    with pytest.raises(CheckpointMismatch, match=message):
        _load(target, tmp_path / "x", hf_config(target, version), sd)


def add_layers(target, sd, depth, seed=9):
    """Layers 1..depth-1 of a deeper drafter (`layers.{i}.`, their own input norm) added to
    `sd`: plain layers over the hidden size, taken from EAGLE-1 states of other seeds."""
    for i in range(1, depth):
        other = hf_state(target, 1, seed=seed + i)
        sd.update({f"layers.{i}.{k}": other["layers.0." + k] for k in LAYER})
        gen = torch.Generator().manual_seed(seed + 100 + i)
        sd[f"layers.{i}.input_layernorm.weight"] = _rand(gen, (target.config.hidden_size,), "norm")
    return sd


@pytest.mark.parametrize("version", [1, 3])
def test_deeper_drafter_matches_torch_reference(target, tmp_path, version):
    """num_hidden_layers 3: layer 0 as EAGLE defines it, then two plain Llama layers over its
    output (input norm, attention, MLP); the head reads the last one."""
    cfg_json = hf_config(target, version, num_hidden_layers=3)
    sd = add_layers(target, hf_state(target, version, seed=7, cfg=cfg_json), 3)
    cfg, params = load_eagle_hf(
        write_ckpt(tmp_path / "deep", cfg_json, sd),
        target.config,
        target_embed=target.params["embed"],
    )
    assert cfg.depth == 3 and len(params["layers"]) == 2
    tokens, feats = inputs(target, n_layers=0 if version == 1 else 3, seed=7)
    if version == 1:
        out, logits, _ = run_drafter(target, cfg, params, tokens, feat=feats)
        ref, _ = ref_eagle1(target, sd, cfg_json, tokens, feats)
    else:
        out, logits, _ = run_drafter(target, cfg, params, tokens, layers=feats)
        ref, _ = ref_eagle3(target, sd, cfg_json, tokens, feats)
    eps = cfg_json["rms_norm_eps"]
    for i in (1, 2):
        x = rms(ref, sd[f"layers.{i}.input_layernorm.weight"].double(), eps)
        ref = ref_layer(sd, f"layers.{i}.", cfg_json, x, ref)
    if version == 1:
        ref_logits = ref @ _target_tensors(target)[1]
    else:
        ref_logits = rms(ref, sd["norm.weight"].double(), eps) @ sd["lm_head.weight"].double().T
    close(out, ref)
    close(logits, ref_logits)
    # Written back as read: the same tensors under the same names, the depth in config.json.
    save_eagle_hf(tmp_path / "back", cfg, params, target.config)
    cfg2, params2 = load_eagle_hf(tmp_path / "back", target.config)
    assert cfg2 == cfg and jax_tree_equal(params, params2)
    with open(tmp_path / "back" / "config.json") as f:
        assert json.load(f)["num_hidden_layers"] == 3


def test_layer_count_disagrees_with_config(target, tmp_path):
    sd = add_layers(target, hf_state(target, 1), 2)
    # Two layers' tensors under a config that claims one: caught from the keys.
    with pytest.raises(CheckpointMismatch, match=r"decoder layers \[0, 1\].*'layers\.1\..*=1"):
        _load(target, tmp_path / "y", hf_config(target, 1), sd)
    # A config that claims three: layer 2 is missing.
    with pytest.raises(CheckpointMismatch, match=r"decoder layers \[0, 1\].*num_hidden_layers=3"):
        _load(target, tmp_path / "z", hf_config(target, 1, num_hidden_layers=3), sd)
    with pytest.raises(CheckpointMismatch, match=r"num_hidden_layers=0"):
        _load(target, tmp_path / "w", hf_config(target, 1, num_hidden_layers=0), sd)


def test_hidden_size_differs_from_target(target, tmp_path):
    cfg_json = hf_config(target, 1, hidden_size=48, intermediate_size=40)
    sd = hf_state(target, 1, cfg=cfg_json, embed=False)
    with pytest.raises(CheckpointMismatch, match="hidden_size 48 differs from the target's 32"):
        _load(target, tmp_path / "x", cfg_json, sd)
    with pytest.raises(CheckpointMismatch, match="vocab_size 100 differs from the target's 101"):
        _load(target, tmp_path / "y", hf_config(target, 3, vocab_size=100), hf_state(target, 3))


def test_bad_vocab_maps(target, tmp_path):
    sd = hf_state(target, 3)
    sd["d2t"][-1] += 1000  # an offset past the target vocabulary
    with pytest.raises(CheckpointMismatch, match=r"'d2t' maps draft id\(s\) \[63\].*outside"):
        _load(target, tmp_path / "x", hf_config(target, 3), sd)
    sd = hf_state(target, 3)
    t2d = sd["t2d"].clone()
    first = int(t2d.nonzero()[0])
    t2d[first] = False
    t2d[int((~t2d).nonzero()[-1])] = True  # same count, different set
    sd["t2d"] = t2d
    with pytest.raises(CheckpointMismatch, match="disagree"):
        _load(target, tmp_path / "y", hf_config(target, 3), sd)
    with pytest.raises(CheckpointMismatch, match=r"name hidden states \[7\] outside 0\.\.3"):
        _load(
            target,
            tmp_path / "z",
            hf_config(target, 3, eagle_aux_hidden_state_layer_ids=[1, 2, 7]),
            hf_state(target, 3),
        )


# ----------------------------------------------------------------------------- generate


@pytest.mark.parametrize("version", [1, 3])
def test_loaded_drafter_generates_like_ar(target, tmp_path, version):
    path = write_ckpt(
        tmp_path / f"e{version}", hf_config(target, version), hf_state(target, version, seed=7)
    )
    drafter = specjax.drafters.eagle(str(path), k=3)
    ar = specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=12)
    out = specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=12, drafter=drafter)
    assert out.tokens == ar.tokens
