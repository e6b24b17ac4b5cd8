"""EAGLE training losses, built on the drafter's own inference code
(`specjax.models.eagle.draft_block`), so training and drafting cannot disagree about inputs,
positions or masks.

Notation: a sequence x_0..x_{S-1}; target features g_j (`eagle.target_features`) and the
target's next-token logits l_j (predicting x_{j+1}) at every position. Row j of step 0 feeds
(g_j, x_{j+1}); its output o_j should predict x_{j+2}, i.e. match l_{j+1}.

Training-time test (EAGLE-3, HASS): step i > 0 re-runs the layer on the drafter's own outputs,
as drafting does: row j feeds (o^{i-1}_{j-1}, x_{j+1}) and sees the committed rows p <= j - i of
step 0 plus the diagonal rows j - i + s of steps s = 1..i (itself included). All steps are written
into one KV window of S * steps slots and each sees exactly those slots through a block mask,
so the same single-layer code serves training and drafting. Step i's loss is weighted 0.8^i.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from specjax.models import eagle as F
from specjax.models.cache import init_cache
from specjax.models.config import ModelConfig
from specjax.models.family import Hiddens


def ttt_masks(S: int, steps: int) -> np.ndarray:
    """Visibility [steps, S, steps * S] of the shared window for each step's rows."""
    m = np.zeros((steps, S, steps * S), bool)
    j = np.arange(S)
    for i in range(steps):
        for p in range(S):  # committed rows of step 0
            m[i, :, p] = p <= j - i
        for s in range(1, i + 1):  # the diagonal of steps 1..i
            p = j - i + s
            ok = p >= 0
            m[i, j[ok], s * S + p[ok]] = True
    return m


def draft_steps(
    cfg: F.EagleConfig,
    params: dict,
    feats: jax.Array,
    tokens: jax.Array,
    steps: int,
    embeds: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Teacher-forced drafter outputs for TTT steps 0..steps-1 -> [steps, B, S-1, D].

    feats [B, S-1, D] target features g_0..g_{S-2}; tokens [B, S] the sequence. `embeds`
    (values [B, S, D], mask [B, S]): a vision-language target's image features, read by the
    drafter in place of the placeholder tokens' embeddings (as at decode time)."""
    pair = None if embeds is None else (embeds[0][:, 1:], embeds[1][:, 1:])  # token j + 1
    B, T, D = feats.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    masks = jnp.asarray(ttt_masks(T, steps))
    cache = init_cache(cfg.layer, B, T * steps, feats.dtype, per_layer=True)
    outs, inp = [], feats
    for i in range(steps):
        out, cache = F.draft_block(
            cfg,
            params,
            inp,
            tokens[:, 1:],
            pos,
            cache,
            block_mask=jnp.broadcast_to(masks[i], (B,) + masks[i].shape),
            write_offset=jnp.full((B,), i * T, jnp.int32),
            embeds=pair,
        )
        outs.append(out)
        # Row j of the next step drafts from this step's output at row j - 1.
        inp = jnp.concatenate([jnp.zeros_like(out[:, :1]), out[:, :-1]], axis=1)
    return jnp.stack(outs)


def _soft_ce(logits: jax.Array, target_logits: jax.Array) -> jax.Array:
    """Cross-entropy of softmax(target_logits) against log_softmax(logits), per row."""
    p = jax.nn.softmax(target_logits, axis=-1)
    return -jnp.sum(p * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def eagle_loss(
    cfg: F.EagleConfig,
    params: dict,
    target_cfg: ModelConfig,
    hiddens: Hiddens,
    target_logits: jax.Array,
    tokens: jax.Array,
    loss_mask: jax.Array,
    *,
    steps: int = 3,
    decay: float = 0.8,
    feature_weight: float = 1.0,
    hard_weight: float = 0.0,
    embeds: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """-> (loss, metrics {"acc": [steps] top-1 agreement with the target, "ce": [steps]}).

    hiddens: the target's Hiddens over positions 0..S-2 (version 3 fuses `layers` through the
    trained fc; version 1 reads `last`). target_logits [B, S-1, V']: the target's
    logits l_1..l_{S-1} (over the draft vocabulary for version 3, the full one for version 1).
    tokens, loss_mask [B, S]: rows j with loss_mask[j + 2] are trained (the drafted token is a
    response token). Version 1 adds a smooth-L1 regression of o_j onto g_{j+1} (EAGLE-1).
    `hard_weight` adds that multiple of the cross-entropy against the target's argmax (what a
    greedy draft must hit) to each step's soft cross-entropy."""
    feats = F.target_features(cfg, params, hiddens)  # [B, S-1, D]
    outs = draft_steps(cfg, params, feats, tokens, steps, embeds)  # [steps, B, T, D]
    T = feats.shape[1]
    valid = jnp.concatenate([loss_mask[:, 2:], jnp.zeros_like(loss_mask[:, :1])], axis=1)[:, :T]
    tgt_top = jnp.argmax(target_logits, axis=-1)
    loss, accs, ces = 0.0, [], []
    for i in range(steps):
        m = valid & (jnp.arange(T)[None, :] >= i)  # rows with a drafted feature at step i
        w = m.astype(jnp.float32)
        n = jnp.maximum(w.sum(), 1.0)
        logits = F.draft_logits(cfg, params, outs[i], target_cfg, full=False)
        ce = jnp.sum(_soft_ce(logits, target_logits) * w) / n
        step_loss = ce
        if hard_weight:
            hard = -jnp.take_along_axis(
                jax.nn.log_softmax(logits, axis=-1), tgt_top[..., None], axis=-1
            )[..., 0]
            step_loss = step_loss + hard_weight * jnp.sum(hard * w) / n
        if cfg.version == 1:
            nxt = jnp.concatenate([feats[:, 1:], feats[:, -1:]], axis=1)
            sl1 = jnp.sum(_smooth_l1(outs[i] - nxt).mean(-1) * w) / n
            step_loss = feature_weight * sl1 + 0.1 * ce  # EAGLE-1's weighting
        loss = loss + decay**i * step_loss
        accs.append(jnp.sum((jnp.argmax(logits, -1) == tgt_top) * w) / n)
        ces.append(ce)
    return loss, {"acc": jnp.stack(accs), "ce": jnp.stack(ces)}


def _smooth_l1(x: jax.Array) -> jax.Array:
    a = jnp.abs(x)
    return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)
