"""Follow-up questions about an image: what the vision-feature cache saves.

Target: SmolLM2-135M-Instruct (real weights) as the language model of a LLaVA-style VLM with a
CLIP-L/14-336-sized vision tower (24 layers, hidden 1024, 577 tokens; random weights: no VLM
weights can be downloaded here, and the tower's cost does not depend on its values) and a
two-layer projector; feature layer -2, CLS dropped: 576 image tokens per image.

For one image it times (greedy, batch 1, float32, the compiled programs warmed up first):
  first question                 tower + prefill + decode
  follow-up, feature + prefix    the same image, same text before it: no tower, and only the
                                 question's tokens are prefilled (the image's K/V is reused)
  follow-up, feature cache only  no tower, but the image tokens are prefilled again
  follow-up, no cache            both caches emptied: the tower runs again

    python benchmarks/vlm_cache.py [--new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import specjax
from specjax import multimodal
from specjax.models import vision, vlm
from specjax.multimodal import VisionLanguageModel
from specjax.prefix_cache import PrefixCache
from specjax.vision_cache import FeatureCache

CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_heads=16,
    checkpoint_layers=24,
    image_size=336,
    patch_size=14,
)


def random_vlm(text: specjax.Model, image_token_id: int, seed: int = 0) -> VisionLanguageModel:
    layers = vision.resolve_layers(-2, CLIP_L_336["checkpoint_layers"])
    vcfg = vision.VisionConfig(num_layers=max(layers), **CLIP_L_336)
    cfg = vlm.VLMConfig(
        model_type="llava",
        text=text.config,
        vision=vcfg,
        feature_layers=layers,
        select="default",
        projector_act="gelu",
        projector_bias=True,
        image_token_id=image_token_id,
    )
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    params: dict = {}
    for name, shape in vlm.param_shapes(cfg).items():
        fan_in = shape[-2] if len(shape) >= 2 else 1
        x = jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(fan_in)
        node = params
        *path, leaf = name.split("/")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = x
    return VisionLanguageModel(
        params=text.params,
        config=text.config,
        tokenizer=text.tokenizer,
        name=f"{text.name}+clip-l-336(random)",
        vision_params=params,
        vlm_config=cfg,
        fingerprint=multimodal.fingerprint(params, cfg, text.params),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    text = specjax.load_model("smollm2-135m")
    # A placeholder id of its own: SmolLM2's last vocabulary entry, unused by its tokenizer.
    vm = random_vlm(text, image_token_id=text.config.vocab_size - 1)
    tag = vm.tokenizer.convert_ids_to_tokens(vm.vlm_config.image_token_id)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    q1 = f"{tag}\nWhat is in this picture?"
    q2 = f"{tag}\nWhat colour is the largest object?"
    kw = dict(max_new_tokens=a.new_tokens)

    def ask(vm: VisionLanguageModel, q: str) -> dict:
        runs, enc = multimodal.TOWER_RUNS["image"], vm.feature_cache.stats.encode_s
        t0 = time.perf_counter()
        out = specjax.generate(vm, q, images=[image], **kw)
        s = dict(out.stats)
        s["wall_s"] = time.perf_counter() - t0
        s["tower_runs"] = multimodal.TOWER_RUNS["image"] - runs
        s["tower_s"] = vm.feature_cache.stats.encode_s - enc
        return s

    # Warm up every program: the tower, both prefill kinds and the decode loop.
    ask(vm, q1)
    ask(vm, q2)
    ask(dataclasses.replace(vm, prefix_cache=PrefixCache(max_bytes=0)), q2)
    rows: dict[str, list] = {
        "first question": [],
        "follow-up, feature + prefix KV cache": [],
        "follow-up, feature cache only": [],
        "follow-up, no cache": [],
    }
    for _ in range(a.repeats):
        vm = dataclasses.replace(vm, feature_cache=FeatureCache(), prefix_cache=PrefixCache())
        rows["first question"].append(ask(vm, q1))
        rows["follow-up, feature + prefix KV cache"].append(ask(vm, q2))
        vm.prefix_cache.clear()
        no_prefix = dataclasses.replace(vm, prefix_cache=PrefixCache(max_bytes=0))
        rows["follow-up, feature cache only"].append(ask(no_prefix, q2))
        vm.feature_cache.clear()
        rows["follow-up, no cache"].append(ask(no_prefix, q2))
    print(f"image tokens per image: {vm.vlm_config.image_tokens}; new tokens: {a.new_tokens}")
    print("| question | wall s | tower s | prefill s | decode s | tower runs |")
    print("|---|---|---|---|---|---|")
    for name, ss in rows.items():

        def med(k: str, ss: list = ss) -> float:
            return statistics.median(s[k] for s in ss)

        print(
            f"| {name} | {med('wall_s'):.2f} | {med('tower_s'):.2f} | {med('prefill_s'):.2f} | "
            f"{med('decode_s'):.2f} | {[s['tower_runs'] for s in ss]} |"
        )


if __name__ == "__main__":
    main()
