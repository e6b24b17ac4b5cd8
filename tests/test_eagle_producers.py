"""Published EAGLE-3 drafters, saved the way each producer saves them, draft as they were trained.

Each case writes a random-weight drafter through a re-implementation of its producer's save
path (key names, dtypes, config fields, exporter quirks; the producers are read from their
sources, not imported), loads it with `load_eagle_hf` onto the shared tiny target, and checks:

- drafter logits against a float64 forward of the producer's own definition (1e-4), fed with
  the target layers the producer's *runtime* captures (SGLang: the output of layer id, taken by
  a hook on that layer; vLLM: the stream entering layer id, a pre-hook), not with the layers
  the loader picked;
- greedy 3-token chains from specjax's `EagleSpec.init/propose` against the producer's drafting
  loop (each draft step fed what that producer feeds back: the raw output for SpecForge, the
  post-norm output for speculators' `norm_output`), over a float64 HF target.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

import specjax
from checkpoints_convert.eagle_hf import CheckpointMismatch, load_eagle_hf, save_eagle_hf
from specjax.drafters import feature as E
from specjax.engine.protocol import PrefillInput, TargetPrefill
from specjax.models import eagle as N
from specjax.models.cache import init_cache
from specjax.models.llama import forward_hidden
from specjax.sampling import make_sampling

import test_eagle_hf as base  # the SafeAILab layout and the float64 Llama-layer reference
from conftest import build_hf_model

B, P, K = 3, 8, 3  # prompts, prompt length, chain length (one compiled shape for every case)
BF16 = torch.bfloat16


# ----------------------------------------------------------------------------- save paths


def _module_state(target, seed, *, fc_norm=False, input_norm=False):
    """The drafter module's tensors (SafeAILab / SpecForge names, `midlayer.`), float32, with
    the frozen copy of the target's embedding every producer's module holds."""
    cfg = base.hf_config(target, 3)
    sd = base.hf_state(target, 3, seed=seed, cfg=cfg)
    g = torch.Generator().manual_seed(seed + 100)
    D = cfg["hidden_size"]
    if fc_norm:  # LlamaRMSNorm weights, one per captured layer
        sd.update({f"fc_norm.{i}.weight": 1 + 0.3 * torch.randn(D, generator=g) for i in range(3)})
    if input_norm:
        sd["input_norm.weight"] = 1 + 0.3 * torch.randn(3 * D, generator=g)
    return sd


def _draft_config(target, **fields):
    """A SpecForge configs/*.json scaled down (gpt-oss-20B-eagle3.json's fields: explicit
    head_dim, pad_token_id, bf16, draft_vocab_size) with its own RoPE base and eps."""
    c = target.config
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "head_dim": 8,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": 40,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.52.3",
        "use_cache": True,
        "vocab_size": c.vocab_size,
        "draft_vocab_size": base.DRAFT_VOCAB,
        "rope_theta": 5000.0,
    }
    cfg.update(fields)
    return cfg


def save_specforge(path, target, draft_cfg, sd, export):
    """SpecForge `export/to_sglang.py` / `to_hf.py`: the module is materialised in bfloat16 and
    written by `save_pretrained` (config = the draft config plus `dtype`, transformers 5's
    `rope_parameters` mirrored to a legacy top-level `rope_theta` by apply_legacy_rope_scaling).
    to_sglang drops every key containing "embed"; to_hf adds the target's embedding (cast into
    the bf16 module) and then lets the trained keys win with their own (float32) dtype."""
    os.makedirs(path, exist_ok=True)
    cfg = dict(draft_cfg)
    theta = cfg.pop("rope_theta")
    cfg.update(
        dtype="bfloat16",
        transformers_version="5.0.0",
        rope_parameters={"rope_theta": theta, "rope_type": "default"},
        rope_theta=theta,
    )
    module = {k: (v.to(BF16) if v.is_floating_point() else v) for k, v in sd.items()}
    if export == "sglang":
        state = {k: v for k, v in module.items() if "embed" not in k.lower()}
    else:
        state = dict(module)  # embed_tokens.weight: the bf16 copy of the target's
        state.update(
            {k: v for k, v in sd.items() if k not in ("embed_tokens.weight", "d2t", "t2d")}
        )  # trained, float32
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        os.path.join(path, "model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return path


def save_speculators(path, target, sd, *, ids, flags, embed_requires_grad=False):
    """speculators' Eagle3DraftModel.save_pretrained: keys under `layers.0.` (the converter's
    midlayer remap), weights in the layer config's dtype (bfloat16), the verifier's embedding
    saved, no verifier_* tensors, transformers' sharded layout (two shards + index), and a
    config whose layer is `LlamaConfig.to_diff_dict()` nested under transformer_layer_config."""
    os.makedirs(path, exist_ok=True)
    c = target.config
    layer = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ).to_diff_dict()
    cfg = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": "0.3.0",
        "transformers_version": transformers.__version__,
        "transformer_layer_config": layer,
        "draft_vocab_size": base.DRAFT_VOCAB,
        "target_hidden_size": None,
        "eagle_aux_hidden_state_layer_ids": ids,
        "embed_requires_grad": embed_requires_grad,
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": 3,
                    "accept_tolerance": 0.0,
                    "verifier_accept_k": 1,
                }
            ],
            "verifier": {"name_or_path": "tiny-llama", "architectures": ["LlamaForCausalLM"]},
        },
    }
    cfg.update(flags)
    state = {
        k.replace("midlayer.", "layers.0."): (v.to(BF16) if v.is_floating_point() else v)
        for k, v in sd.items()
    }
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, ks in shards.items():
        save_file(
            {k: state[k].contiguous() for k in ks},
            os.path.join(path, name),
            metadata={"format": "pt"},
        )
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(
            {
                "metadata": {"total_size": total},
                "weight_map": {k: n for n, ks in shards.items() for k in ks},
            },
            f,
        )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return path


def save_safeailab_sharded_bin(path, target, sd):
    """An HF-sharded float16 `.bin` export of SafeAILab's layout (pytorch_model-*.bin plus
    pytorch_model.bin.index.json; no rope_theta in config.json, as SafeAILab's configs)."""
    os.makedirs(path, exist_ok=True)
    cfg = base.hf_config(target, 3, torch_dtype="float16")
    del cfg["rope_theta"]
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    keys = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[::2],
        "pytorch_model-00002-of-00002.bin": keys[1::2],
    }
    for name, ks in shards.items():
        torch.save({k: state[k] for k in ks}, os.path.join(path, name))
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


# ----------------------------------------------------------------------------- references


def _f64(sd):
    """The saved values (after any bf16/fp16 rounding) in float64."""
    return {k: (v.double() if v.is_floating_point() else v) for k, v in sd.items()}


def _rounded(sd, dtype):
    return {k: (v.to(dtype).double() if v.is_floating_point() else v) for k, v in sd.items()}


def sglang_capture(model, tokens, ids):
    """SGLang's EAGLE-3 capture for `ids`: the output of decoder layer id (hooked)."""
    out = {}
    hooks = [
        model.model.layers[i].register_forward_hook(
            lambda m, a, o, i=i: out.__setitem__(i, o[0] if isinstance(o, tuple) else o)
        )
        for i in set(ids)
    ]
    logits = model(torch.as_tensor(tokens)).logits
    for h in hooks:
        h.remove()
    return [out[i] for i in ids], logits


def vllm_capture(model, tokens, ids):
    """vLLM's capture for `ids`: the residual stream entering decoder layer id (pre-hook)."""
    out = {}
    hooks = [
        model.model.layers[i].register_forward_pre_hook(
            lambda m, a, kw, i=i: out.__setitem__(i, (a[0] if a else kw["hidden_states"])),
            with_kwargs=True,
        )
        for i in set(ids)
    ]
    logits = model(torch.as_tensor(tokens)).logits
    for h in hooks:
        h.remove()
    return [out[i] for i in ids], logits


def specforge_fuse(sd, caps, eps):
    """SpecForge `project_hidden_states`: fc_norm on each chunk (EAGLE-3.1), then fc."""
    if "fc_norm.0.weight" in sd:
        caps = [base.rms(h, sd[f"fc_norm.{i}.weight"], eps) for i, h in enumerate(caps)]
    return torch.cat(caps, -1) @ sd["fc.weight"].T


def specforge_step(sd, lcfg, e, g, norm_output):
    """SpecForge `backbone` + `compute_logits`: the midlayer's residual is the raw feature, the
    next step is fed the raw output, the head reads norm(output) iff norm_output."""
    eps = lcfg["rms_norm_eps"]
    x = torch.cat(
        [
            base.rms(e, sd["midlayer.input_layernorm.weight"], eps),
            base.rms(g, sd["midlayer.hidden_norm.weight"], eps),
        ],
        -1,
    )
    o = base.ref_layer(sd, "midlayer.", lcfg, x, g)
    head_in = base.rms(o, sd["norm.weight"], eps) if norm_output else o
    return o, head_in @ sd["lm_head.weight"].T


def speculators_fuse(sd, caps, eps):
    """speculators Eagle3DraftModel.forward: input_norm over the concat (norm_before_fc) and/or
    fc_norm per chunk, then fc."""
    x = torch.cat(caps, -1)
    if "input_norm.weight" in sd:
        x = base.rms(x, sd["input_norm.weight"], eps)
    if "fc_norm.0.weight" in sd:
        x = torch.cat(
            [base.rms(c, sd[f"fc_norm.{i}.weight"], eps) for i, c in enumerate(x.chunk(3, -1))], -1
        )
    return x @ sd["fc.weight"].T


def speculators_step(sd, lcfg, e, g, norm_before_residual, norm_output):
    """speculators' first layer (split, norm, residual = normed hidden iff
    norm_before_residual) and its TTT step (norm_output: the normed output is fed back)."""
    eps = lcfg["rms_norm_eps"]
    hn = base.rms(g, sd["layers.0.hidden_norm.weight"], eps)
    x = torch.cat([base.rms(e, sd["layers.0.input_layernorm.weight"], eps), hn], -1)
    o = base.ref_layer(sd, "layers.0.", lcfg, x, hn if norm_before_residual else g)
    if norm_output:
        o = base.rms(o, sd["norm.weight"], eps)
        return o, o @ sd["lm_head.weight"].T
    return o, base.rms(o, sd["norm.weight"], eps) @ sd["lm_head.weight"].T


def reference_chain(step, feats, embed, tokens, first, d2t):
    """The producer's greedy drafting: pairs (feature_j, token_{j+1}) causal over the prompt,
    then each draft token paired with the fed-back output. Recomputing the whole causal block
    per step equals a KV-cached step. -> (chain [B, K], logits at the first draft [B, Vd])."""
    toks = np.concatenate([tokens[:, 1:], first[:, None]], 1)
    chain, first_logits = [], None
    for _ in range(K):
        out, logits = step(embed[torch.as_tensor(toks)], feats)
        first_logits = logits[:, -1] if first_logits is None else first_logits
        t = d2t[logits[:, -1].argmax(-1).numpy()]
        chain.append(t)
        feats = torch.cat([feats, out[:, -1:]], 1)
        toks = np.concatenate([toks, t[:, None]], 1)
    return np.stack(chain, 1), first_logits


def specjax_chain(target, cfg, params, tokens, first):
    """specjax's own drafting: EagleSpec.init over the prompt, one greedy propose of K."""
    spec = E.EagleSpec(k=K, eagle=cfg, target_cfg=target.config)
    bound = N.bind_target(params, target.params)
    toks = jnp.asarray(tokens, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    hid, _ = forward_hidden(
        target.params,
        target.config,
        toks,
        pos,
        init_cache(target.config, B, P, per_layer=True),
        hidden_layers=cfg.feature_layers,
    )
    pre = TargetPrefill(
        input=PrefillInput.from_tokens(toks, jnp.full((B,), P, jnp.int32)),
        first=jnp.asarray(first, jnp.int32),
        cache=None,
        hiddens=hid,
    )
    state = spec.init(bound, pre, P + K + 8)
    mode, sp = make_sampling(0.0, None, None)
    draft, _ = spec.propose(bound, state, pre.first, jax.random.key(0), mode, sp)
    first_logits = N.draft_logits(cfg, bound, state.feat, target.config, full=False)
    return np.asarray(draft.tokens), np.asarray(first_logits)


# ----------------------------------------------------------------------------- cases

LCFG = {
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 32,
    "rope_theta": 5000.0,
    "rms_norm_eps": 1e-5,
}


def _case_specforge_sglang(target, tmp):
    """gpt-oss-style SpecForge config (eagle_config ids), exported with to_sglang."""
    sd = _module_state(target, 11)
    cfg = _draft_config(target, eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 1, 2]})
    path = save_specforge(tmp / "sf", target, cfg, sd, "sglang")
    ref = _rounded(sd, BF16)
    return (
        path,
        ref,
        (1, 2, 3),
        sglang_capture,
        [0, 1, 2],
        lambda caps: specforge_fuse(ref, caps, 1e-5),
        lambda e, g: specforge_step(ref, LCFG, e, g, norm_output=True),
        None,
    )


def _case_specforge_eagle31(target, tmp):
    """SpecForge qwen3-30B-A3B-eagle3.1.json scaled down (fc_norm, norm_output, no ids),
    exported with to_hf (embedding included, mixed bf16 / float32 tensors)."""
    sd = _module_state(target, 12, fc_norm=True)
    cfg = _draft_config(target, fc_norm=True, norm_output=True)
    path = save_specforge(tmp / "sf31", target, cfg, sd, "hf")
    ref = _f64(sd)  # the trained tensors are written in float32; the embedding is shared
    ref["embed_tokens.weight"] = sd["embed_tokens.weight"].to(BF16).double()
    L = target.config.num_layers  # no ids: SGLang captures the streams entering 2, L//2, L-3
    ids = [2, L // 2, L - 3]
    return (
        path,
        ref,
        tuple(ids),
        vllm_capture,
        ids,
        lambda caps: specforge_fuse(ref, caps, 1e-5),
        lambda e, g: specforge_step(ref, LCFG, e, g, norm_output=True),
        None,
    )


def _case_specforge_raw_head(target, tmp):
    """A SpecForge draft config with norm_output: false (the head reads the raw output)."""
    sd = _module_state(target, 13)
    cfg = _draft_config(
        target, norm_output=False, eagle_config={"eagle_aux_hidden_state_layer_ids": [2, 0, 1]}
    )
    path = save_specforge(tmp / "sfraw", target, cfg, sd, "sglang")
    ref = _rounded(sd, BF16)
    return (
        path,
        ref,
        (3, 1, 2),
        sglang_capture,
        [2, 0, 1],
        lambda caps: specforge_fuse(ref, caps, 1e-5),
        lambda e, g: specforge_step(ref, LCFG, e, g, norm_output=False),
        None,
    )


def _case_speculators_31(target, tmp):
    """speculators EAGLE-3.1 (fc_norm, norm_output: fed back normed) with norm_before_residual
    and explicit vLLM-convention ids, sharded."""
    sd = _module_state(target, 14, fc_norm=True)
    flags = {"fc_norm": True, "norm_output": True, "norm_before_residual": True}
    path = save_speculators(tmp / "spec31", target, sd, ids=[2, 0, 1], flags=flags)
    ref = _rounded({k.replace("midlayer.", "layers.0."): v for k, v in sd.items()}, BF16)
    return (
        path,
        ref,
        (2, 0, 1),
        vllm_capture,
        [2, 0, 1],
        lambda caps: speculators_fuse(ref, caps, 1e-5),
        lambda e, g: speculators_step(ref, LCFG, e, g, True, True),
        None,
    )


def _case_speculators_own_embed(target, tmp):
    """speculators with norm_before_fc, default ids, and a trained embedding
    (embed_requires_grad): it must be drafted with its own embedding."""
    sd = _module_state(target, 15, input_norm=True)
    sd["embed_tokens.weight"] = sd["embed_tokens.weight"] + 0.5 * torch.randn(
        sd["embed_tokens.weight"].shape, generator=torch.Generator().manual_seed(5)
    )
    path = save_speculators(
        tmp / "specemb",
        target,
        sd,
        ids=None,
        flags={"norm_before_fc": True},
        embed_requires_grad=True,
    )
    ref = _rounded({k.replace("midlayer.", "layers.0."): v for k, v in sd.items()}, BF16)
    L = target.config.num_layers
    ids = [2, L // 2, L - 3]  # speculators' resolve_target_layer_ids default
    return (
        path,
        ref,
        tuple(ids),
        vllm_capture,
        ids,
        lambda caps: speculators_fuse(ref, caps, 1e-5),
        lambda e, g: speculators_step(ref, LCFG, e, g, False, False),
        ref["embed_tokens.weight"],
    )


def _case_safeailab_bin(target, tmp):
    """SafeAILab's layout, float16, sharded .bin with an index, LlamaConfig's default RoPE."""
    sd = _module_state(target, 16)
    path = save_safeailab_sharded_bin(tmp / "sa", target, sd)
    ref = _rounded(sd, torch.float16)
    L = target.config.num_layers
    ids = [2, L // 2, L - 3]  # SafeAILab's hardcoded capture, entering those layers
    lcfg = dict(LCFG, rope_theta=10000.0)
    return (
        path,
        ref,
        tuple(ids),
        vllm_capture,
        ids,
        lambda caps: specforge_fuse(ref, caps, 1e-5),
        lambda e, g: specforge_step(ref, lcfg, e, g, norm_output=True),
        None,
    )


CASES = {
    "specforge-sglang-ids": _case_specforge_sglang,
    "specforge-eagle3.1-to_hf": _case_specforge_eagle31,
    "specforge-norm_output-false": _case_specforge_raw_head,
    "speculators-eagle3.1-sharded": _case_speculators_31,
    "speculators-own-embedding": _case_speculators_own_embed,
    "safeailab-sharded-bin": _case_safeailab_bin,
}


@pytest.fixture(scope="module")
def hf_target():
    """The float64 HF twin of the shared `target` fixture (same builder, same seed)."""
    return build_hf_model("llama", seed=0, num_hidden_layers=3, eos_token_id=None).double()


@pytest.mark.parametrize("case", list(CASES))
def test_producer_checkpoint_drafts_as_trained(target, hf_target, tmp_path, case, caplog):
    path, ref, want_layers, capture, runtime_ids, fuse, step, own_embed = CASES[case](
        target, tmp_path
    )
    with (
        caplog.at_level(logging.INFO, logger="checkpoints_convert.eagle_hf"),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        cfg, params = load_eagle_hf(path, target.config, target_embed=target.params["embed"])
    # A drafter drafting with its own embedding says so; one sharing the target's is silent.
    own_warned = [w for w in caught if "drafter's own embedding" in str(w.message)]
    assert len(own_warned) == (own_embed is not None)
    assert cfg.feature_layers == want_layers
    assert f"capture layers (HF hidden_states) {list(want_layers)}" in caplog.text
    assert ("embed" in params) == (own_embed is not None)

    rng = np.random.default_rng(len(case))
    tokens = rng.integers(0, target.config.vocab_size, (B, P))
    with torch.no_grad():
        caps, target_logits = capture(hf_target, tokens, runtime_ids)
        first = target_logits[:, -1].argmax(-1).numpy()
        embed = (
            own_embed
            if own_embed is not None
            else torch.tensor(np.asarray(target.params["embed"]), dtype=torch.float64)
        )
        d2t = np.arange(base.DRAFT_VOCAB) + ref["d2t"].numpy()
        ref_chain, ref_first = reference_chain(step, fuse(caps), embed, tokens, first, d2t)
    chain, first_logits = specjax_chain(target, cfg, params, tokens, first)
    base.close(first_logits, ref_first)
    np.testing.assert_array_equal(chain, ref_chain)


# ----------------------------------------------------------------------------- rules


def _write(path, cfg, sd):
    return base.write_ckpt(path, cfg, sd)


def test_capture_layer_rule_per_producer(target, tmp_path):
    """The same ids mean different layers to different producers; the caller overrides."""
    sd = base.hf_state(target, 3, embed=False)
    load = lambda name, cfg, **kw: (
        load_eagle_hf(  # noqa: E731
            _write(tmp_path / name, cfg, sd), target.config, **kw
        )[0].feature_layers
    )
    sf = base.hf_config(target, 3, eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 1, 2]})
    assert load("sf", sf) == (1, 2, 3)
    assert load("sf-as-vllm", sf, producer="vllm") == (0, 1, 2)
    assert load("vllm", base.hf_config(target, 3, eagle_aux_hidden_state_layer_ids=[0, 1, 2])) == (
        0,
        1,
        2,
    )
    assert load("plain", base.hf_config(target, 3)) == N.default_feature_layers(3)
    assert load("override", sf, capture_layers=[3, 3, 0]) == (3, 3, 0)
    both = base.hf_config(
        target,
        3,
        eagle_aux_hidden_state_layer_ids=[0, 1, 2],
        eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 1, 2]},
    )
    with pytest.raises(CheckpointMismatch, match=r"both .*disagree.*capture_layers="):
        load("both", both)
    assert load("both-override", both, capture_layers=[1, 2, 3]) == (1, 2, 3)
    with pytest.raises(CheckpointMismatch, match=r"fc\.weight reads 3 target layers .* 2 "):
        load("two", sf, capture_layers=[1, 2])
    with pytest.raises(ValueError, match="producer must be one of"):
        load("bad", sf, producer="sglang")
    # drafters.eagle passes both overrides through to the loader.
    spec, _ = specjax.drafters.eagle(str(tmp_path / "sf"), k=2, producer="vllm").binder(target)
    assert spec.eagle.feature_layers == (0, 1, 2)
    spec, _ = specjax.drafters.eagle(str(tmp_path / "sf"), k=2, capture_layers=(1, 1, 1)).binder(
        target
    )
    assert spec.eagle.feature_layers == (1, 1, 1)


def test_drafter_embedding_is_used_or_refused(target, tmp_path):
    """A differing embed_tokens: refused for SpecForge (trained and served on the target's),
    drafted with for SafeAILab / vLLM layouts (their runtimes do); equal: shared."""
    sd = base.hf_state(target, 3, seed=4)
    own = sd["embed_tokens.weight"] + 0.25
    sd["embed_tokens.weight"] = own
    sf = base.hf_config(target, 3, eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 1, 2]})
    with pytest.raises(
        CheckpointMismatch,
        match=r"differs from the target's .*specforge.*"
        r"another target",
    ):
        load_eagle_hf(
            _write(tmp_path / "sf", sf, sd), target.config, target_embed=target.params["embed"]
        )
    with pytest.warns(UserWarning, match="drafting with the drafter's own embedding"):
        cfg, params = load_eagle_hf(
            _write(tmp_path / "sa", base.hf_config(target, 3), sd),
            target.config,
            target_embed=target.params["embed"],
        )
    np.testing.assert_array_equal(np.asarray(params["embed"]), own.numpy())
    bound = N.bind_target(params, target.params)
    tok = jnp.asarray([[3, 5]])
    np.testing.assert_array_equal(np.asarray(N.token_embedding(bound, tok)), own.numpy()[[[3, 5]]])
    # Written back, the own embedding travels with the drafter.
    save_eagle_hf(tmp_path / "rt", cfg, params, target.config)
    with pytest.warns(UserWarning):
        again = load_eagle_hf(tmp_path / "rt", target.config, target_embed=target.params["embed"])[
            1
        ]
    assert base.jax_tree_equal(again, params)


def test_variant_flags_round_trip(target, tmp_path):
    """EAGLE-3.1 / vLLM flags survive save_eagle_hf -> load_eagle_hf (written as vLLM reads
    them); SpecForge's head without norm has no vLLM field and is refused by the writer."""
    sd = base.hf_state(target, 3, seed=8, embed=False)
    cfg, params = load_eagle_hf(
        _write(tmp_path / "a", base.hf_config(target, 3), sd), target.config
    )
    cfg = dataclasses.replace(cfg, fc_norm=True, norm_before_residual=True, feed_normed=True)
    params = dict(
        params,
        fc_norm=jnp.asarray(np.linspace(0.5, 1.5, 3 * cfg.hidden, dtype=np.float32).reshape(3, -1)),
    )
    save_eagle_hf(tmp_path / "v", cfg, params, target.config)
    cfg2, params2 = load_eagle_hf(tmp_path / "v", target.config)
    assert cfg2 == cfg and base.jax_tree_equal(params, params2)
    with pytest.raises(ValueError, match="head_norm=False"):
        save_eagle_hf(
            tmp_path / "h",
            dataclasses.replace(cfg, feed_normed=False, head_norm=False),
            params,
            target.config,
        )
    with pytest.raises(ValueError, match=r"fc_norm exist only in EAGLE-3"):
        N.EagleConfig(version=1, layer=cfg.layer, fc_norm=True)


def test_unsupported_producer_fields(target, tmp_path):
    sd = _module_state(target, 17)
    qwen = save_speculators(tmp_path / "q", target, sd, ids=None, flags={})
    with open(qwen / "config.json") as f:
        cfg = json.load(f)
    cfg["transformer_layer_config"]["model_type"] = "qwen3"
    with open(qwen / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointMismatch, match=r"'qwen3' layer .*only 'llama'"):
        load_eagle_hf(qwen, target.config)
    cfg["transformer_layer_config"]["model_type"] = "llama"
    cfg["speculators_model_type"] = "eagle"
    with open(qwen / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointMismatch, match="speculators_model_type 'eagle'"):
        load_eagle_hf(qwen, target.config)
    # EAGLE-3.1 without its norms, and SafeAILab's module asked to carry vLLM's flag.
    sd3 = base.hf_state(target, 3, embed=False)
    with pytest.raises(CheckpointMismatch, match=r"missing .*fc_norm\.0\.weight.*fc_norm"):
        load_eagle_hf(
            _write(tmp_path / "n", _draft_config(target, fc_norm=True), sd3), target.config
        )
    with pytest.raises(CheckpointMismatch, match="norm_before_fc.*producer='vllm'"):
        load_eagle_hf(
            _write(
                tmp_path / "m",
                base.hf_config(target, 3, norm_before_fc=True, norm_output=True, eagle_config={}),
                sd3,
            ),
            target.config,
            producer="specforge",
        )
