"""The EAGLE drafter network (Li et al. 2024, 2025): a Llama decoder layer (or a few) over the
target's features, with its config, init and pure functions (shared by the drafter in
`specjax.drafters.feature`, the trainer and the HF converter in checkpoints_convert/eagle_hf.py).

Drafter slot j holds the pair (g_j, x_{j+1}): the feature at position j and the token after it,
at RoPE position j. Its output o_j estimates the feature at j+1, and the head over o_j gives the
token x_{j+2}.

Versions (`EagleConfig.version`):

- 1 (EAGLE-1/2): g = the target's final hidden state (after the final norm, what its LM head
  reads). Attention input = fc([embed(x); g]) + bias, which is also the residual; the layer has
  no input norm; the target's LM head reads o directly. Trained to regress the next feature
  plus a token loss.
- 3 (EAGLE-3): g = fc([h_low; h_mid; h_high]), three target layers fused (no bias). Attention
  input = [rms(embed(x)); rms(g)] (2D wide), residual g; own final norm and LM head over a draft
  vocabulary (`d2t` maps draft ids to target ids; tokens outside it get probability 0). Trained
  on tokens only, with training-time test.

Variants of version 3 published checkpoints carry (all off by default; see
checkpoints_convert/eagle_hf.py for which producer sets which):

- `fc_norm`: an RMSNorm per captured layer before fc (EAGLE-3.1: SpecForge `fc_norm`,
  speculators `fc_norm`); `fc_input_norm`: one RMSNorm over the concatenation (speculators
  `norm_before_fc`, gpt-oss drafters).
- `norm_before_residual`: the layer's residual is rms(g) instead of g (speculators / vLLM).
- `feed_normed`: draft slots read the drafter's output *after* its final norm (speculators /
  vLLM `norm_output`: EAGLE-3.1's remedy for the feature's magnitude drift over draft depth);
  the head then reads that output as is.
- `head_norm=False`: the head reads the raw output, no final norm (SpecForge `norm_output:
  false`).

The target's embedding (and for version 1 its LM head) are shared, never copied: `bind_target`
adds them to the drafter's params under "target". A drafter that drafts with an embedding of
its own (a checkpoint whose `embed_tokens` differs from the target's and whose producer runs it
that way) carries it as params["embed"], which then wins.

The layer is a Llama decoder layer by construction, whatever the target's family: EAGLE's
checkpoints (`LlamaForCausalLMEagle3`) define it so.

Depth (`layer.num_layers`, default 1): layers after the first are plain Llama decoder layers over
the first one's output (params["layers"], a list; their input norm is `attn_norm`), so the
first layer keeps EAGLE's special inputs and the drafter's output is the last layer's. EAGLE's
authors report better acceptance with 2 layers (SafeAILab/EAGLE#168) and Scylla (arXiv
2505.07858) a log-linear gain in the layer count; a layer at SmolLM2-135M's shapes reads ~9 MB
of weights per drafter forward, against the target's 538 MB per step. `init_params` zeroes the
output projections of the added layers, so they start as the identity: a drafter grown from a
trained shallower one drafts exactly as it did.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.family import Hiddens, lm_head
from specjax.models.llama import rms_norm, single_layer

VERSIONS = (1, 3)


@dataclasses.dataclass(frozen=True)
class EagleConfig:
    """Static shape of an EAGLE drafter (hashable: part of the compiled program)."""

    version: int  # 1 or 3
    layer: ModelConfig  # the decoder layers (num_layers: depth, hidden size = the target's)
    feature_layers: tuple = ()  # version 3: HF hidden_states indices fused by fc (low, mid, high)
    draft_vocab: int = 0  # version 3: size of the drafter's own head (0: the target's head)
    fc_bias: bool = True  # version 1 (SafeAILab's default)
    # Version 3 variants (module docstring): where norms sit around fc, the residual and the head.
    fc_norm: bool = False  # params["fc_norm"] [n, D]: one RMSNorm per captured layer before fc
    fc_input_norm: bool = False  # params["fc_input_norm"] [n*D]: one RMSNorm over the concat
    norm_before_residual: bool = False  # residual = rms(g) (hidden_norm) instead of g
    feed_normed: bool = False  # draft slots read norm(output); the head reads it as is
    head_norm: bool = True  # the head reads norm(output) (False: the raw output)

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"EAGLE version must be one of {VERSIONS}, got {self.version!r}")
        if self.version == 3 and not self.feature_layers:
            raise ValueError("EAGLE-3 needs feature_layers (the target layers fc fuses)")
        if self.version == 3 and self.draft_vocab <= 0:
            raise ValueError(f"EAGLE-3 needs a draft_vocab > 0, got {self.draft_vocab}")
        v3_only = [
            f
            for f in ("fc_norm", "fc_input_norm", "norm_before_residual", "feed_normed")
            if getattr(self, f)
        ] + ([] if self.head_norm else ["head_norm=False"])
        if self.version != 3 and v3_only:
            raise ValueError(
                f"{', '.join(v3_only)} exist only in EAGLE-3 drafters; this "
                f"config has version {self.version}"
            )
        if not isinstance(self.layer.num_layers, int) or self.layer.num_layers < 1:
            raise ValueError(
                f"an EAGLE drafter needs >= 1 decoder layer, got {self.layer.num_layers!r}"
            )
        if self.feed_normed and not self.head_norm:
            raise ValueError(
                "feed_normed feeds the head the normed output; head_norm=False "
                "(a head without the final norm) contradicts it"
            )

    @property
    def hidden(self) -> int:
        return self.layer.hidden_size

    @property
    def depth(self) -> int:
        """Decoder layers: the first (EAGLE's inputs) plus params["layers"]."""
        return self.layer.num_layers

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer"] = self.layer.to_dict()
        d["feature_layers"] = list(self.feature_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EagleConfig:
        d = dict(d)
        d["layer"] = ModelConfig.from_dict(d["layer"])
        d["feature_layers"] = tuple(d.get("feature_layers", ()))
        return cls(**d)


def default_feature_layers(num_layers: int) -> tuple:
    """EAGLE-3's choice: the residual streams entering layers 2, L/2 and L-3 (clamped for tiny
    models to valid HF hidden_states indices 0..L)."""
    pick = (2, num_layers // 2, num_layers - 3)
    return tuple(min(max(i, 0), num_layers) for i in pick)


def make_config(
    target: ModelConfig,
    version: int = 3,
    *,
    intermediate_size: int | None = None,
    draft_vocab: int | None = None,
    feature_layers: tuple | None = None,
    num_layers: int = 1,
) -> EagleConfig:
    """An EAGLE drafter shaped for `target`: its heads, head size and RoPE, `num_layers` decoder
    layers (EAGLE's: 1)."""
    layer = dataclasses.replace(
        target,
        num_layers=num_layers,
        sliding_window=None,
        attention_bias=False,
        tie_word_embeddings=False,
        intermediate_size=intermediate_size or target.intermediate_size,
        shards=1,  # its own weights, in the checkpoint layout (replicated on a mesh)
    )
    if version == 1:
        return EagleConfig(version=1, layer=layer)
    fl = tuple(feature_layers) if feature_layers else default_feature_layers(target.num_layers)
    return EagleConfig(
        version=3,
        layer=layer,
        feature_layers=fl,
        draft_vocab=int(draft_vocab or target.vocab_size),
        fc_bias=False,
    )


def init_params(
    cfg: EagleConfig,
    key: jax.Array,
    dtype: DTypeLike = jnp.float32,
    d2t: ArrayLike | None = None,
) -> dict:
    """Random drafter params (the target's embedding/head are bound later, not stored).

    `d2t` [draft_vocab]: the target id of each draft-vocabulary entry (version 3; default: the
    first `draft_vocab` ids)."""
    L, D = cfg.layer, cfg.hidden
    H, KV, hd, F = L.num_heads, L.num_kv_heads, L.head_dim, L.intermediate_size
    keys = iter(jax.random.split(key, 8))

    def dense(shape: tuple[int, int], fan_in: int) -> jax.Array:
        return (jax.random.normal(next(keys), shape, jnp.float32) / jnp.sqrt(fan_in)).astype(dtype)

    d_in = 2 * D
    layer = {
        "wqkv": dense(
            (d_in if cfg.version == 3 else D, (H + 2 * KV) * hd), d_in if cfg.version == 3 else D
        ),
        "wo": dense((H * hd, D), H * hd) * 0.5,
        "mlp_norm": jnp.ones((D,), dtype),
        "w_gate_up": dense((D, 2 * F), D),
        "w_down": dense((F, D), F) * 0.5,
    }
    more = (
        {"layers": _added_layers(cfg, jax.random.fold_in(key, 1), dtype)} if cfg.depth > 1 else {}
    )
    if cfg.version == 1:
        fc_in = 2 * D
        p = {"fc": dense((fc_in, D), fc_in), "layer": layer, **more}
        if cfg.fc_bias:
            p["fc_b"] = jnp.zeros((D,), dtype)
        return p
    layer["embed_norm"] = jnp.ones((D,), dtype)
    layer["hidden_norm"] = jnp.ones((D,), dtype)
    n = len(cfg.feature_layers)
    if d2t is None:
        d2t = jnp.arange(cfg.draft_vocab, dtype=jnp.int32)
    p = {
        "fc": dense((n * D, D), n * D),
        "layer": layer,
        "norm": jnp.ones((D,), dtype),
        "lm_head": dense((D, cfg.draft_vocab), D),
        "d2t": jnp.asarray(d2t, jnp.int32),
        **more,
    }
    if cfg.fc_norm:
        p["fc_norm"] = jnp.ones((n, D), dtype)
    if cfg.fc_input_norm:
        p["fc_input_norm"] = jnp.ones((n * D,), dtype)
    return p


def _added_layers(cfg: EagleConfig, key: jax.Array, dtype: DTypeLike) -> list[dict]:
    """Layers 1.. of a deeper drafter: plain Llama layers whose output projections (wo, w_down)
    are zero, so each starts as the identity on the residual stream (the gradient still reaches
    those projections first, then the rest)."""
    L, D = cfg.layer, cfg.hidden
    qkv, F = (L.num_heads + 2 * L.num_kv_heads) * L.head_dim, L.intermediate_size

    def normal(k: jax.Array, shape: tuple[int, int]) -> jax.Array:
        return (jax.random.normal(k, shape, jnp.float32) / jnp.sqrt(shape[0])).astype(dtype)

    out = []
    for k in jax.random.split(key, cfg.depth - 1):
        k1, k2 = jax.random.split(k)
        out.append(
            {
                "attn_norm": jnp.ones((D,), dtype),
                "wqkv": normal(k1, (D, qkv)),
                "wo": jnp.zeros((L.num_heads * L.head_dim, D), dtype),
                "mlp_norm": jnp.ones((D,), dtype),
                "w_gate_up": normal(k2, (D, 2 * F)),
                "w_down": jnp.zeros((F, D), dtype),
            }
        )
    return out


def bind_target(params: dict, target_params: dict) -> dict:
    """Drafter params plus the target's shared embedding (and head) under "target"."""
    shared = {"embed": target_params["embed"]}
    if "lm_head" in target_params:
        shared["lm_head"] = target_params["lm_head"]
    return dict(params, target=shared)


# ----------------------------------------------------------------------------- pure functions
# Shared by the drafter (specjax.drafters.feature) and training (specjax.train).


def target_features(cfg: EagleConfig, params: dict, hiddens: Hiddens) -> jax.Array:
    """The target's features at each block position [B, T, D] (what committed slots read)."""
    if cfg.version == 1:
        return hiddens.last
    layers = list(hiddens.layers)  # n x [B, T, D] low, mid, high
    eps = cfg.layer.rms_norm_eps
    if cfg.fc_norm:  # EAGLE-3.1: each captured layer normed on its own (SpecForge, speculators)
        layers = [rms_norm(h, params["fc_norm"][i], eps) for i, h in enumerate(layers)]
    fused = jnp.concatenate(layers, axis=-1)  # [B, T, n*D]
    if cfg.fc_input_norm:  # speculators `norm_before_fc`: one norm over the concatenation
        fused = rms_norm(fused, params["fc_input_norm"], eps)
    return fused @ params["fc"]


def token_embedding(params: dict, tokens: jax.Array) -> jax.Array:
    """The drafter's own embedding when it has one (params["embed"]), else the target's."""
    table = params["embed"] if "embed" in params else params["target"]["embed"]
    return table[tokens]


def layer_inputs(
    cfg: EagleConfig,
    params: dict,
    feat: jax.Array,
    tokens: jax.Array,
    embeds: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """-> (residual h [B, T, D], attention input x [B, T, Din]). `embeds` (values [B, T, D],
    mask [B, T]) replaces the token embeddings where the mask is set: a VLM target's image
    features at its placeholder tokens, which the drafter then reads as the target did."""
    e = token_embedding(params, tokens).astype(feat.dtype)
    if embeds is not None:
        e = jnp.where(embeds[1][..., None], embeds[0].astype(e.dtype), e)
    lp, eps = params["layer"], cfg.layer.rms_norm_eps
    if cfg.version == 1:
        h = jnp.concatenate([e, feat], axis=-1) @ params["fc"]
        if "fc_b" in params:
            h = h + params["fc_b"]
        return h, h  # layer 0 of EAGLE-1 has no input norm
    g = rms_norm(feat, lp["hidden_norm"], eps)
    x = jnp.concatenate([rms_norm(e, lp["embed_norm"], eps), g], axis=-1)
    return (g if cfg.norm_before_residual else feat), x


def draft_block(
    cfg: EagleConfig,
    params: dict,
    feat: jax.Array,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    *,
    block_mask: jax.Array | None = None,
    write_offset: jax.Array | None = None,
    embeds: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run the drafter's layers over pairs (feat [B, T, D], tokens [B, T]) -> (output features
    [B, T, D], cache). With `feed_normed` the output is taken after the final norm: it is both
    what the head reads and what the next draft slot is fed. `embeds`: see `layer_inputs`."""
    h, x = layer_inputs(cfg, params, feat, tokens, embeds)
    layers = [params["layer"]] + list(params.get("layers", ()))
    if len(layers) != cfg.depth:
        raise ValueError(f"the drafter's params hold {len(layers)} layers, its config {cfg.depth}")
    out = h
    for i, lp in enumerate(layers):  # layer 0 reads EAGLE's input x; the rest norm their input
        out, cache = single_layer(
            cfg.layer,
            lp,
            out,
            x if i == 0 else None,
            positions,
            cache,
            block_mask=block_mask,
            write_offset=write_offset,
            index=i,
        )
    if cfg.feed_normed:
        out = rms_norm(out, params["norm"], cfg.layer.rms_norm_eps)
    return out, cache


def draft_logits(
    cfg: EagleConfig, params: dict, out: jax.Array, target_cfg: ModelConfig, full: bool = True
) -> jax.Array:
    """Output features [..., D] -> float32 logits over the target vocabulary [..., V] (version 3:
    -inf outside the draft vocabulary), or over the draft vocabulary when `full` is False."""
    if cfg.version == 1:
        return lm_head(params["target"], target_cfg, out)
    if cfg.head_norm and not cfg.feed_normed:  # feed_normed: `out` is normed already
        out = rms_norm(out, params["norm"], cfg.layer.rms_norm_eps)
    logits = (out @ params["lm_head"]).astype(jnp.float32)
    if not full:
        return logits
    flat = logits.reshape(-1, logits.shape[-1])
    big = jnp.full((flat.shape[0], target_cfg.vocab_size), -jnp.inf, jnp.float32)
    big = big.at[:, params["d2t"]].set(flat)
    return big.reshape(logits.shape[:-1] + (target_cfg.vocab_size,))
