"""Vision-language targets (LLaVA, Video-LLaVA): conversion, generate with images, the feature
cache, and every drafter exact over images.

No VLM weights can be downloaded here, so every model is a random-weight HF model built in the
test (`build_vlm`): a CLIP tower (3 layers, hidden 32, 28 x 28 images of 14 x 14 patches: 4
patch tokens) and a 2-layer Llama or Qwen2 language model with GQA, all weights redrawn at O(1)
scale (HF's own init gives near-uniform outputs under which a wrong tower could still match).
The code path is the one a real checkpoint takes: `save_pretrained` to a directory, then
`specjax.load_model(dir)`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from safetensors.torch import save_file

import specjax
from specjax import drafters, multimodal
from specjax.multimodal import VisionLanguageModel

IMG, VID = 120, 121  # image / video placeholder token ids
NEW = 12


def _redraw(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.5 * noise)
            elif p.ndim == 1 and "class_embedding" not in name:  # norm weights
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1 or "embed_tokens" in name or "position_embedding" in name:
                p.copy_(noise)
            else:  # Linear [out, in] or the patch conv [D, C, p, p]
                p.copy_(noise / np.prod(p.shape[1:]) ** 0.5)


def _text_config(family: str, vocab: int = 128, eos=None):
    cls = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config}[family]
    return cls(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=eos,
    )


VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=28,
    patch_size=14,
)


def build_vlm(kind="llava", family="llama", seed=0, vocab=128, vision=None, text_layers=2, **kw):
    """A random-weight HF LLaVA / Video-LLaVA (eval, float32, eager attention)."""
    torch.manual_seed(seed)
    vc = T.CLIPVisionConfig(**{**VISION, **(vision or {})})
    tc = _text_config(family, vocab)
    tc.num_hidden_layers = text_layers
    if kind == "llava":
        kw.setdefault("image_token_index", IMG)
        cfg = T.LlavaConfig(vision_config=vc, text_config=tc, **kw)
        model = T.LlavaForConditionalGeneration(cfg)
    else:
        cfg = T.VideoLlavaConfig(
            vision_config=vc, text_config=tc, image_token_index=IMG, video_token_index=VID, **kw
        )
        model = T.VideoLlavaForConditionalGeneration(cfg)
    model.config._attn_implementation = "eager"
    _redraw(model, seed + 1)
    return model.eval()


def save_vlm(model, path, layout: str) -> str:
    """Write `model` in one of the key layouts real checkpoints use:
    "saved"   what transformers 5's save_pretrained writes (language_model.model.*, vision_tower.*)
    "t5"      transformers 5's module names (model.language_model.*, model.vision_tower.*, lm_head)
    "legacy"  the original llava-hf layout (vision_tower.vision_model.*), in two shards."""
    model.save_pretrained(path)
    if layout == "saved":
        return str(path)
    for f in os.listdir(path):
        if f.endswith(".safetensors") or f.endswith(".safetensors.index.json"):
            os.remove(os.path.join(path, f))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "legacy":
        import re

        from checkpoints_convert.vlm_hf import canonical_name

        def legacy(k):
            c = canonical_name(k)
            if c.startswith(("model.", "lm_head.")):
                return "language_model." + c
            m = re.match(r"^(image_tower|video_tower)\.(.*)$", c)
            if m:
                tower = "vision_tower" if model.config.model_type == "llava" else m.group(1)
                return f"{tower}.vision_model.{m.group(2)}"
            return c.replace("projector.", "multi_modal_projector.", 1)

        state = {legacy(k): v for k, v in state.items()}
        names = sorted(state)
        half = len(names) // 2
        save_file({k: state[k] for k in names[:half]}, os.path.join(path, "model-1.safetensors"))
        save_file({k: state[k] for k in names[half:]}, os.path.join(path, "model-2.safetensors"))
    else:
        save_file(state, os.path.join(path, "model.safetensors"))
    return str(path)


def expand(ids, counts):
    """Placeholders expanded as an HF processor writes them: {token id: tokens per item}."""
    return [t for x in ids for t in ([x] * counts[x] if x in counts else [x])]


# ----------------------------------------------------------------------------- conversion

CASES = {
    # name: (kind, text family, layout, config overrides)
    "llava-int-default-bias-t5": ("llava", "llama", "t5", dict(vision_feature_layer=-2)),
    "llava-list-full-nobias-saved": (
        "llava",
        "llama",
        "saved",
        dict(
            vision_feature_layer=[-3, -1],
            vision_feature_select_strategy="full",
            multimodal_projector_bias=False,
        ),
    ),
    "llava-qwen2-legacy-sharded": ("llava", "qwen2", "legacy", dict(vision_feature_layer=-1)),
    "videollava-legacy": ("video_llava", "llama", "legacy", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, tmp_path):
    kind, family, layout, kw = CASES[case]
    hf = build_vlm(kind, family, **kw)
    vm = specjax.load_model(save_vlm(hf, tmp_path, layout))
    assert isinstance(vm, VisionLanguageModel)
    cfg = vm.vlm_config
    # Only the layers a feature layer reads are loaded (layers after it are dead weight).
    assert cfg.vision.num_layers == max(cfg.feature_layers)
    assert vm.vision_params["image_tower"]["layers"]["wqkv"].shape[0] == max(cfg.feature_layers)
    n_img = cfg.image_tokens
    rng = np.random.default_rng(0)
    if kind == "llava":
        row0 = expand([1, 5, IMG, 7, 9, IMG, 11], {IMG: n_img})
        row1 = expand([3, IMG, 4], {IMG: n_img})
        ids = [row0, row1 + [8] * (len(row0) - len(row1))]  # HF takes equal-length rows
        px = rng.standard_normal((3, 3, 28, 28)).astype(np.float32)
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px)).logits.numpy()
        out = vm.logits(ids, pixel_values=px)
    else:
        n_vid = cfg.video_tokens(3)
        ids = [expand([1, IMG, 5, VID, 7, 8], {IMG: n_img, VID: n_vid})]
        px = rng.standard_normal((1, 3, 28, 28)).astype(np.float32)
        pv = rng.standard_normal((1, 3, 3, 28, 28)).astype(np.float32)
        with torch.no_grad():
            ref = hf(
                input_ids=torch.tensor(ids),
                pixel_values=torch.tensor(px),
                pixel_values_videos=torch.tensor(pv),
            ).logits.numpy()
        out = vm.logits(ids, pixel_values=px, pixel_values_videos=pv)
    assert np.abs(ref).max() > 1.0  # O(1) logits: a wrong tower would show
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


def test_checkpoint_errors(tmp_path):
    hf = build_vlm("llava")
    path = save_vlm(hf, tmp_path / "extra", "t5")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    state["model.vision_tower.encoder.layers.7.mlp.fc1.weight"] = torch.zeros(48, 32)
    save_file(state, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match="not used.*layers.7"):
        specjax.load_model(path)
    path = save_vlm(hf, tmp_path / "missing", "t5")
    del state["model.vision_tower.encoder.layers.7.mlp.fc1.weight"]
    del state["model.multi_modal_projector.linear_2.weight"]
    save_file(state, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*projector/w2"):
        specjax.load_model(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["vision_feature_layer"] = 9
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="vision_feature_layer 9"):
        specjax.load_model(path)


# ----------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(HF model, specjax model) of a random LLaVA (Llama, GQA), EOS disabled."""
    hf = build_vlm("llava", "llama", seed=3)
    vm = specjax.load_model(save_vlm(hf, tmp_path_factory.mktemp("llava"), "t5"))
    return hf, vm


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (20 + 9 * i, 35 - 4 * i, 3), dtype=np.uint8) for i in range(n)]


PROMPTS = [[1, 5, IMG, 7, 9, 11], [3, IMG, 4, 8, IMG, 8, 8, 2], [6, 2, 9, 9, 4]]


def _hf_greedy(hf, vm, prompt, images):
    n = vm.vlm_config.image_tokens
    ids = expand(prompt, {IMG: n})
    kw = {}
    if images:
        px = np.stack([multimodal.clip_preprocess(im, 28) for im in images])
        kw["pixel_values"] = torch.tensor(px)
    with torch.no_grad():
        g = hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, **kw)
    return g[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def plain(llava):
    hf, vm = llava
    imgs = _images(3)
    images = [[imgs[0]], [imgs[1], imgs[2]], []]
    out = specjax.generate(vm, PROMPTS, images=images, max_new_tokens=NEW)
    return images, out


def test_generate_equals_hf(llava, plain):
    """Greedy tokens equal HF `generate` row by row: one image, two images (placeholders
    expanded here), no image; PIL images give the same output as their arrays."""
    from PIL import Image

    hf, vm = llava
    images, out = plain
    for prompt, ims, toks in zip(PROMPTS, images, out.tokens):
        assert toks == _hf_greedy(hf, vm, prompt, ims)
    pil = [[Image.fromarray(a) for a in row] for row in images]
    again = specjax.generate(vm, PROMPTS, images=pil, max_new_tokens=NEW)
    assert again.tokens == out.tokens
    # Already-processed inputs: expanded ids + pixel_values, HF's convention.
    n = vm.vlm_config.image_tokens
    px = np.stack([multimodal.clip_preprocess(a, 28) for row in images for a in row])
    ids = [expand(p, {IMG: n}) for p in PROMPTS]
    pre = specjax.generate(vm, ids, pixel_values=px, max_new_tokens=NEW)
    assert pre.tokens == out.tokens


def _small_text_drafter(seed=11, vocab=128):
    """A text-only 1-layer Llama with the target's vocabulary (placeholders are plain ids)."""
    from conftest import build_hf_model

    hf = build_hf_model(
        "llama", seed=seed, vocab_size=vocab, hidden_size=64, num_hidden_layers=1, eos_token_id=None
    )
    return specjax.model_from_hf(hf, dtype=jnp.float32)


def _drafter(name, vm):
    from test_eagle import random_eagle
    from test_medusa import random_heads

    if name == "ngram":
        return drafters.ngram(max_ngram=3, k=3)
    if name == "layer_skip":
        return drafters.layer_skip(layers=1, k=3)
    if name == "layer_skip_tree":
        return drafters.layer_skip(layers=1, tree=drafters.DynamicTree(nodes=6, depth=3, top_k=2))
    if name == "small_model":
        return drafters.small_model(_small_text_drafter(), k=3)
    if name == "eagle3_tree":
        return drafters.eagle(
            random_eagle(vm, 3, seed=1, draft_vocab=96),
            tree=drafters.DynamicTree(nodes=6, depth=3, top_k=2),
        )
    if name == "eagle1_chain":
        return drafters.eagle(random_eagle(vm, 1, seed=2), k=3)
    if name == "medusa_tree":
        heads = random_heads(3, vm.config.hidden_size, 1.0, seed=0)
        return drafters.medusa(heads, tree=drafters.StaticTree([[0], [1], [0, 0], [0, 0, 0]]))
    raise ValueError(name)


DRAFTERS = (
    "ngram",
    "layer_skip",
    "layer_skip_tree",
    "small_model",
    "eagle3_tree",
    "eagle1_chain",
    "medusa_tree",
)


@pytest.mark.parametrize("name", DRAFTERS)
def test_drafters_greedy_equal_plain(llava, plain, name):
    hf, vm = llava
    images, out = plain
    spec = specjax.generate(
        vm, PROMPTS, images=images, max_new_tokens=NEW, drafter=_drafter(name, vm)
    )
    assert spec.tokens == out.tokens
    assert sum(spec.stats["acceptance_histogram"]) > 0


# ----------------------------------------------------------------------------- the cache


def test_feature_cache(tmp_path):
    hf = build_vlm("llava", seed=5)
    vm = specjax.load_model(save_vlm(hf, tmp_path, "saved"))
    a, b, c = _images(3, seed=9)
    runs = lambda: multimodal.TOWER_RUNS["image"]  # noqa: E731
    cache = vm.feature_cache
    # A batch of rows sharing one image encodes it once.
    r0 = runs()
    first = specjax.generate(vm, [[1, IMG, 4]] * 3, images=[[a]] * 3, max_new_tokens=6)
    assert runs() == r0 + 1 and cache.stats.encoded == 1 and cache.stats.hits == 2
    # The same image again: no tower at all, identical output.
    again = specjax.generate(vm, [[1, IMG, 4]], images=[[a]], max_new_tokens=6)
    assert runs() == r0 + 1 and again.tokens == first.tokens[:1]
    assert again.stats["vision_cache"]["hits"] == 3
    # A different image misses (one tower call for the new one only).
    specjax.generate(vm, [[1, IMG, 4]], images=[[b]], max_new_tokens=6)
    assert runs() == r0 + 2 and cache.stats.encoded == 2
    # The byte bound: room for two entries; the least recently used one goes first.
    per = vm.vlm_config.image_tokens * vm.config.hidden_size * 4
    small = specjax.FeatureCache(max_bytes=2 * per)
    vm2 = type(vm)(**{**vm.__dict__, "feature_cache": small})
    for img in (a, b, a, c):  # a is used again before c arrives, so b is evicted
        specjax.generate(vm2, [[1, IMG, 4]], images=[[img]], max_new_tokens=2)
    assert small.bytes <= small.max_bytes and len(small) == 2 and small.stats.evictions == 1
    keys = [
        multimodal.content_hash(multimodal.clip_preprocess(x, 28), "image", vm.fingerprint)
        for x in (a, b, c)
    ]
    assert keys[0] in small and keys[2] in small and keys[1] not in small


def test_bad_inputs(llava):
    hf, vm = llava
    img = _images(1)[0]
    with pytest.raises(ValueError, match="prompt 0 has 2 image placeholder.*1 image"):
        specjax.generate(vm, [[1, IMG, IMG, 4, 5]], images=[[img]], max_new_tokens=2)
    with pytest.raises(ValueError, match="no images were given"):
        specjax.generate(vm, [[1, IMG, 4]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"shape \(20, 35\); expected"):
        specjax.generate(vm, [[1, IMG, 4]], images=[[img[..., 0]]], max_new_tokens=2)
    with pytest.raises(ValueError, match="dtype float32; expected"):
        specjax.generate(vm, [[1, IMG, 4]], images=[[img.astype(np.float32)]], max_new_tokens=2)
    with pytest.raises(ValueError, match="2 entries for 1 prompt"):
        specjax.generate(vm, [[1, IMG, 4]], images=[[img], [img]], max_new_tokens=2)
    with pytest.raises(ValueError, match="takes images only"):
        specjax.generate(vm, [[1, IMG, 4]], videos=[[[img]]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"pixel_values has shape \(1, 3, 20, 20\)"):
        specjax.generate(vm, [[1, IMG, 4]], pixel_values=np.zeros((1, 3, 20, 20)), max_new_tokens=2)
    text = specjax.Model(params=vm.params, config=vm.config, name="text")
    with pytest.raises(ValueError, match="text-only model"):
        specjax.generate(text, [[1, IMG, 4]], images=[[img]], max_new_tokens=2)


# ----------------------------------------------------------------------------- sampling
#
# The sampled law with a VLM target: the chi-square method of tests/test_spec_sampling.py
# (its module docstring states it), with an image in the prompt. Target: a random LLaVA whose
# language model has V = 16 tokens (15 is the image placeholder); 8192 rows decode the same
# prompt + image, 3 new tokens each, at temperature 0.7; the joint of (t1, t2, t3) is compared
# with the exact law from the cache-free `VisionLanguageModel.logits` over all V^2
# continuations (the image's features at its placeholders). Drafters: a text-only small LM
# chain (k = 2; it sees the placeholder as a plain id) and a layer-skip dynamic tree.
# Negative control: the chain with the residual rule broken (a rejection resamples p), whose
# exact law is computed and whose power is asserted.

SV, SIMG = 16, 15
SPROMPT = [14, 11, SIMG, 14, 11, 14, 11]


@pytest.fixture(scope="module")
def sampling_setup(tmp_path_factory):
    from test_spec_sampling import MODES, next_token_dists  # noqa: F401

    hf = build_vlm("llava", "llama", seed=21, vocab=SV, image_token_index=SIMG)
    vm = specjax.load_model(save_vlm(hf, tmp_path_factory.mktemp("llava16"), "saved"))
    head = vm.params["lm_head"] * 0.6  # O(1) weights give peaked laws; widen them
    vm = type(vm)(**{**vm.__dict__, "params": {**vm.params, "lm_head": head}})
    draft = _small_text_drafter(seed=23, vocab=SV)
    draft = type(draft)(
        **{
            **draft.__dict__,
            "params": {**draft.params, "embed": vm.params["embed"], "lm_head": head},
        }
    )
    img = _images(1, seed=4)[0]
    ids = expand(SPROMPT, {SIMG: vm.vlm_config.image_tokens})
    px = multimodal.clip_preprocess(img, 28)[None]
    mode = dict(temperature=0.7, top_k=None, top_p=None)
    p = _exact_dists(lambda x: _prompt_image_logits(vm, x, len(ids), px), ids, mode)
    q = _exact_dists(draft.logits, ids, mode)
    return vm, draft, img, mode, p, q


def _prompt_image_logits(vm, x, P, px):
    """Cache-free logits of rows x [N, P + 2] whose image sits in the prompt (the first P
    tokens): a generated placeholder id is a plain token, as in decoding (and in HF generate,
    which merges image features only at the prefill)."""
    items = multimodal.split_pixel_values(vm, [list(x[0, :P])], px, None)
    emb, mask = multimodal.prefill_embeds(vm, x[:1, :P], items)  # [1, P, D]
    N, D = x.shape[0], vm.config.hidden_size
    emb = jnp.concatenate([emb, jnp.zeros((1, 2, D), emb.dtype)], axis=1)
    mask = jnp.concatenate([mask, jnp.zeros((1, 2), bool)], axis=1)
    emb, mask = jnp.broadcast_to(emb, (N, P + 2, D)), jnp.broadcast_to(mask, (N, P + 2))
    return multimodal._full_logits_embeds(vm.params, vm.config, jnp.asarray(x), emb, mask)


def _exact_dists(logits_fn, ids, mode_kw):
    """p1 [V], p2 [V, V], p3 [V, V, V] after `ids`, processed as the engine samples."""
    import itertools

    from specjax.sampling import make_sampling, process_logits

    mode, sp = make_sampling(mode_kw["temperature"], mode_kw["top_k"], mode_kw["top_p"])
    P = len(ids)
    ab = np.array(list(itertools.product(range(SV), repeat=2)), np.int32)
    x = np.concatenate([np.tile(np.asarray(ids, np.int32), (SV * SV, 1)), ab], axis=1)
    lg = np.asarray(logits_fn(x))[:, P - 1 : P + 2]
    probs = np.exp(np.asarray(process_logits(jnp.asarray(lg), mode, sp), np.float64))
    probs /= probs.sum(-1, keepdims=True)
    return probs[0, 0], probs[::SV, 1], probs[:, 2].reshape(SV, SV, SV)


def _sample_counts(vm, img, drafter, mode, seed):
    from conftest import MANY_ROWS_XLA
    from test_spec_sampling import N_ROWS

    with specjax.xla_options(**MANY_ROWS_XLA):  # compiled as `sample_rows` compiles
        out = specjax.generate(
            vm,
            [SPROMPT] * N_ROWS,
            images=[[img]] * N_ROWS,
            max_new_tokens=3,
            key=seed,
            drafter=drafter,
            **mode,
        )
    t = np.asarray(out.tokens)
    return np.bincount((t[:, 0] * SV + t[:, 1]) * SV + t[:, 2], minlength=SV**3), out.stats


def _sampling_drafter(name, draft):
    if name == "text_lm_chain":
        return drafters.small_model(draft, k=2)
    return drafters.layer_skip(layers=1, tree=drafters.DynamicTree(nodes=4, depth=2, top_k=2))


@pytest.mark.parametrize("name,seed", [("text_lm_chain", 4101), ("layer_skip_tree", 4102)])
def test_sampling_follows_target_with_image(sampling_setup, name, seed):
    from test_spec_sampling import assert_follows_target

    vm, draft, img, mode, p, q = sampling_setup
    joint = (p[0][:, None, None] * p[1][:, :, None] * p[2]).ravel()
    counts, st = _sample_counts(vm, img, _sampling_drafter(name, draft), mode, seed)
    hist = np.asarray(st["acceptance_histogram"])
    assert_follows_target(counts, joint, hist, f"vlm {name}")
    assert hist[0] >= 0.05 * hist.sum() and hist[1:].sum() >= 0.05 * hist.sum(), hist


def test_broken_rule_detected_with_image(sampling_setup, monkeypatch):
    from test_spec_sampling import (
        ALPHA,
        MIN_POWER,
        N_ROWS,
        broken_verify_chain,
        chi_square,
        patched_verify_chain,
        power,
        step_law,
    )

    vm, draft, img, mode, p, q = sampling_setup
    null = (p[0][:, None, None] * p[1][:, :, None] * p[2]).ravel()
    flaw = "residual_is_p"
    law = (
        p[0][:, None, None] * step_law(p[1], q[1], flaw)[:, :, None] * step_law(p[2], q[2], flaw)
    ).ravel()
    tv, pw, lam = power(null, law, N_ROWS)
    broken = broken_verify_chain(flaw)
    with patched_verify_chain(monkeypatch, broken):
        counts, _ = _sample_counts(vm, img, _sampling_drafter("text_lm_chain", draft), mode, 4103)
    assert broken.traced > 0
    fit, alt = chi_square(counts, null), chi_square(counts, law)
    print(f"vlm {flaw}: TV={tv:.3f} lambda={lam:.0f} power={pw} {fit}; vs broken law {alt}")
    assert pw >= MIN_POWER
    assert fit.pvalue < ALPHA, fit
    assert alt.pvalue > ALPHA, alt


def llava_with_tokenizer(path, seed=8) -> str:
    """A random LLaVA directory with a byte-level BPE tokenizer that knows "<image>" and a
    chat template: what the CLI loads by path."""
    from conftest import byte_bpe

    tok = byte_bpe(["what is in the picture? a cat on a mat. " * 4])
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    image_id = tok.convert_tokens_to_ids("<image>")
    hf = build_vlm("llava", seed=seed, vocab=len(tok), image_token_index=image_id)
    path = save_vlm(hf, path, "saved")
    tok.save_pretrained(path)
    return path


def test_cli_image(tmp_path, capsys):
    from PIL import Image

    from specjax import cli

    path = llava_with_tokenizer(tmp_path / "llava")
    png = str(tmp_path / "cat.png")
    Image.fromarray(_images(1, seed=2)[0]).save(png)
    cli.main(["generate", "--model", path, "--image", png, "--max-new-tokens", "6", "what?"])
    printed = capsys.readouterr().out
    vm = specjax.load_model(path)
    ref = specjax.generate(vm, "<image>\nwhat?", images=[Image.open(png)], max_new_tokens=6)
    assert printed.strip() == f"### what?\n{ref.text[0]}".strip()
    assert ref.stats["vision_cache"]["encoded"] == 1
    with pytest.raises(ValueError, match="cannot read image"):
        cli.main(["generate", "--model", path, "--image", path, "what?"])


def test_prefix_kv_cache(tmp_path):
    """A follow-up question about the same image (same text before it) reuses the image's K/V
    (and, for EAGLE, hidden states): only the new tokens are prefilled, and the output equals
    a model without the prefix cache, with and without a drafter, for rows that hit and rows
    that miss in one batch."""
    from test_eagle import random_eagle

    from specjax.prefix_cache import PrefixCache

    hf = build_vlm("llava", seed=13)
    vm = specjax.load_model(save_vlm(hf, tmp_path, "saved"))
    off = type(vm)(**{**vm.__dict__, "prefix_cache": PrefixCache(max_bytes=0)})
    a, b = _images(2, seed=5)
    n = vm.vlm_config.image_tokens
    q1, q2, q3 = [1, 5, IMG, 7, 9], [1, 5, IMG, 3, 3, 8, 2], [4, IMG, 6]
    eagle = drafters.eagle(
        random_eagle(vm, 3, seed=3, draft_vocab=96),
        tree=drafters.DynamicTree(nodes=6, depth=3, top_k=2),
    )
    for drafter in (None, eagle):
        vm.prefix_cache.clear()
        first = specjax.generate(vm, [q1], images=[[a]], max_new_tokens=NEW, drafter=drafter)
        assert first.stats["prefix_cache"]["entries"] == 1
        reused = vm.prefix_cache.stats.reused_tokens
        # Row 0 asks a follow-up about image a (a hit); row 1 is about image b (a miss).
        out = specjax.generate(vm, [q2, q3], images=[[a], [b]], max_new_tokens=NEW, drafter=drafter)
        ref = specjax.generate(
            off, [q2, q3], images=[[a], [b]], max_new_tokens=NEW, drafter=drafter
        )
        assert out.tokens == ref.tokens
        assert vm.prefix_cache.stats.reused_tokens - reused == 2 + n  # [1, 5] + the image
        assert out.stats["prefix_cache"]["entries"] == 2  # row 1's prefix is stored now
        # The first question again: its own prefix hits, the answer is unchanged.
        again = specjax.generate(vm, [q1], images=[[a]], max_new_tokens=NEW, drafter=drafter)
        assert again.tokens == first.tokens
    assert ref.stats["prefix_cache"]["entries"] == 0  # max_bytes=0 keeps nothing


def test_small_vlm_drafter_with_its_own_tower(llava, plain, tmp_path):
    """The seed's EventGPT-style setting: a small VLM drafts with its own (smaller, differently
    sized) tower and its own feature cache; greedy output equals plain decoding, and the
    drafter's tower runs once per distinct image."""
    hf, vm = llava
    images, out = plain
    small_hf = build_vlm(
        "llava", seed=31, text_layers=1, vision=dict(hidden_size=16, image_size=42, patch_size=21)
    )
    small = specjax.load_model(save_vlm(small_hf, tmp_path / "small", "saved"))
    assert small.vlm_config.image_tokens == vm.vlm_config.image_tokens  # 4 patches each
    hists = []
    for tree in (None, drafters.DynamicTree(nodes=6, depth=3, top_k=2)):
        drafter = drafters.small_model(small, k=3, tree=tree)
        spec = specjax.generate(vm, PROMPTS, images=images, max_new_tokens=NEW, drafter=drafter)
        assert spec.tokens == out.tokens
        hists.append(spec.stats["acceptance_histogram"])
    assert small.feature_cache.stats.encoded == 3  # three distinct images, encoded once
    # The drafter reads its features: the target as its own VLM drafter predicts every token
    # (all drafts accepted); the same LM blind to the images (placeholders as plain ids) does not.
    for model, full in ((vm, True), (specjax.Model(params=vm.params, config=vm.config), False)):
        drafter = drafters.small_model(model, k=3)
        spec = specjax.generate(vm, PROMPTS, images=images, max_new_tokens=NEW, drafter=drafter)
        hist = spec.stats["acceptance_histogram"]
        assert spec.tokens == out.tokens and (hist[-1] == sum(hist)) == full, hist
    other = build_vlm("llava", seed=32, text_layers=1, vision=dict(image_size=28, patch_size=7))
    wrong = specjax.load_model(save_vlm(other, tmp_path / "wrong", "saved"))
    with pytest.raises(ValueError, match="16 tokens per image against the target's.* 4"):
        specjax.generate(
            vm, PROMPTS, images=images, max_new_tokens=2, drafter=drafters.small_model(wrong)
        )


def test_eagle3_training_over_images_learns(llava, tmp_path):
    """`train-drafter`'s pipeline on image + text data: the target answers prompts about
    images (self-distillation), its features are cached with the images' features at the
    placeholders, and an EAGLE-3 drafter trained on them reaches a higher tau on held-out
    images than the same drafter untrained."""
    from specjax.train import data as data_lib
    from specjax.train import recipes, trainer

    hf, vm = llava
    rng = np.random.default_rng(7)
    imgs = [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(56)]
    prompts = [
        {"prompt": [1, IMG, int(t), 9], "images": [im]}
        for t, im in zip(rng.integers(2, 100, len(imgs)), imgs)
    ]
    train, held = prompts[:48], prompts[48:]
    ds = data_lib.build_dataset(
        vm, train, tmp_path / "data", seq_len=40, max_new_tokens=24, batch=8, shard_rows=16,
        progress=False,
    )  # fmt: skip
    z = np.load(sorted(ds.glob("shard_*.npz"))[0])
    assert z["pixels"].shape == (16, 3, 28, 28) and z["image_row"].tolist() == list(range(16))
    tc = trainer.TrainConfig(
        kind="eagle3", steps=100, batch=8, lr=3e-3, warmup=10, draft_vocab=100, log_every=50,
        save_every=100, feature_dtype="float32",
    )  # fmt: skip
    cfg, params, history = trainer.train(vm, tc, ds, tmp_path / "out", progress=False, log=print)
    feats = sorted((tmp_path / "out" / "features").glob("*.embeds.npy"))
    assert len(feats) == 3 and np.abs(np.load(feats[0])).max() > 0
    recipe = recipes.get("eagle3")
    untrained = recipe.init_params(tc, cfg, tmp_path / "out")

    def tau(p):
        d = recipe.eval_drafter(cfg, jax.device_get(p))
        out = specjax.generate(
            vm, [h["prompt"] for h in held], images=[h["images"] for h in held],
            max_new_tokens=24, drafter=d, chat=False,
        )  # fmt: skip
        ref = specjax.generate(
            vm, [h["prompt"] for h in held], images=[h["images"] for h in held],
            max_new_tokens=24, chat=False,
        )  # fmt: skip
        assert out.tokens == ref.tokens
        return out.stats["tau"]

    before, after = tau(untrained), tau(params)
    print(f"held-out tau untrained {before:.2f} -> trained {after:.2f}; history {history[-1]}")
    assert after > before + 0.3


def test_video_llava_generate_equals_hf(tmp_path):
    """Video-LLaVA with an image and a video (a list of frames) in one prompt: greedy tokens
    equal HF `generate` on the expanded ids and processed pixels; frames given as one uint8
    array [F, H, W, 3] are the same video."""
    hf = build_vlm("video_llava", "qwen2", seed=17)
    vm = specjax.load_model(save_vlm(hf, tmp_path, "t5"))
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)
    frames = [rng.integers(0, 256, (28, 33, 3), dtype=np.uint8) for _ in range(3)]
    prompt = [1, IMG, 5, VID, 7, 8]
    out = specjax.generate(vm, prompt, images=[img], videos=[frames], max_new_tokens=NEW)
    cfg = vm.vlm_config
    ids = expand(prompt, {IMG: cfg.image_tokens, VID: cfg.video_tokens(3)})
    px = multimodal.clip_preprocess(img, 28)[None]
    pv = np.stack([multimodal.clip_preprocess(f, 28) for f in frames])[None]
    with torch.no_grad():
        g = hf.generate(
            input_ids=torch.tensor([ids]),
            pixel_values=torch.tensor(px),
            pixel_values_videos=torch.tensor(pv),
            max_new_tokens=NEW,
            do_sample=False,
        )
    assert out.tokens[0] == g[0, len(ids) :].tolist()
    again = specjax.generate(
        vm, prompt, images=[img], videos=[np.stack(frames)], max_new_tokens=NEW
    )
    assert again.tokens == out.tokens and again.stats["vision_cache"]["hits"] == 2


def test_preprocessing_matches_hf(tmp_path):
    """Without a processor in the checkpoint, CLIP preprocessing equals HF's
    CLIPImageProcessor (PIL backend) exactly; with a preprocessor_config.json the checkpoint's
    own processor is used (here one that resizes differently, so the two paths differ)."""
    proc_cls = getattr(T, "CLIPImageProcessorPil", T.CLIPImageProcessor)
    proc = proc_cls(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    rng = np.random.default_rng(0)
    for shape in [(40, 30, 3), (30, 50, 3), (28, 28, 3), (100, 61, 3)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        ref = np.asarray(proc(images=[img], return_tensors="np")["pixel_values"][0])
        np.testing.assert_array_equal(multimodal.clip_preprocess(img, 28), ref)
    hf = build_vlm("llava", seed=19)
    path = save_vlm(hf, tmp_path, "saved")
    other = proc_cls(size={"height": 28, "width": 28}, do_center_crop=False)
    other.save_pretrained(path)
    vm = specjax.load_model(path)
    assert vm.processor is not None
    img = rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)
    mine = multimodal.preprocess_image(vm, img, "image")
    np.testing.assert_array_equal(mine, other(images=[img], return_tensors="np")["pixel_values"][0])
    assert np.abs(mine - multimodal.clip_preprocess(img, 28)).max() > 0.1


def test_cli_train_drafter_on_images(tmp_path, capsys):
    """`specjax train-drafter --image-prompts FILE`: a JSONL of prompts with image files
    trains (and evaluates, with the held-out prompts' images) an EAGLE-3 drafter for a VLM."""
    from PIL import Image

    from specjax import cli

    path = llava_with_tokenizer(tmp_path / "llava", seed=9)
    rng = np.random.default_rng(1)
    lines = []
    for i in range(18):
        img = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / f"im{i}.png")
        rec = {"prompt": "<image>\nwhat is in the picture?", "images": [f"im{i}.png"]}
        lines.append(json.dumps(rec))
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines))
    (tmp_path / "cfg.yaml").write_text(
        "kind: eagle3\nsteps: 16\nbatch: 8\nlog_every: 8\nsave_every: 8\ndraft_vocab: 64\n"
        "eval_prompts: 2\neval_new_tokens: 8\nfeature_dtype: float32\n"
        "data:\n  prompts: 16\n  heldout: 2\n  seq_len: 64\n  max_new_tokens: 12\n"
        "  gen_batch: 8\n"
    )
    out = tmp_path / "run"
    argv = ["train-drafter", "--target", path, "--config", str(tmp_path / "cfg.yaml")]
    cli.main(argv + ["--out", str(out), "--image-prompts", str(tmp_path / "prompts.jsonl")])
    printed = capsys.readouterr().out
    assert "held-out tau" in printed and (out / "drafter" / "config.json").exists()
    z = np.load(sorted((out / "data").glob("shard_*.npz"))[0])
    assert z["pixels"].shape[0] == 16  # one image per training prompt, kept with its row
    with pytest.raises(SystemExit, match="vision-language checkpoint"):
        cli.main(["convert", path, str(tmp_path / "converted")])
    assert not (tmp_path / "converted" / "config.json").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"images": ["im0.png"]}))
    with pytest.raises(ValueError, match="line 1: expected"):
        cli.main(argv + ["--out", str(tmp_path / "run2"), "--image-prompts", str(bad)])
