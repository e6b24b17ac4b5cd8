"""EAGLE-1 (`kind="eagle"`, Li et al. 2024): one decoder layer over the target's final hidden
state, trained with training-time test on the cached feature sequences (`losses.eagle_loss`:
soft cross-entropy against the target's full-vocabulary next-token distribution plus EAGLE-1's
smooth-L1 feature regression), exported in the HF EAGLE format. `eagle3.Eagle3` changes only
what differs for EAGLE-3 (fused layers, draft vocabulary)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from specjax import drafters
from specjax.drafters import feature as F
from specjax.models import Hiddens, lm_head
from specjax.train.losses import eagle_loss

# Held-out tau drafts an EAGLE-2 dynamic tree of 8 nodes, as the README's tables report it.
EVAL_TREE = drafters.DynamicTree(nodes=8, depth=4, top_k=3)


def cast_floats(tree, dtype):
    """The floating leaves of `tree` in `dtype`; integer index maps (d2t) stay as they are."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


class Eagle:
    kind = "eagle"
    frozen = ()

    def drafter_config(self, target, tc, tokens, mask, out: Path) -> F.EagleConfig:
        return F.make_config(target.config, 1, intermediate_size=tc.intermediate_size)

    def feature_layers(self, cfg: F.EagleConfig) -> tuple:
        return tuple(cfg.feature_layers)  # () for EAGLE-1: the final hidden state only

    def init_params(self, tc, cfg: F.EagleConfig, out: Path) -> dict:
        return F.init_params(cfg, jax.random.key(tc.seed), jnp.float32)

    def hiddens(self, last, layers, compute) -> Hiddens:
        """The drafter's input features: last [B, T, D] (layers [n, B, T, D] unused here)."""
        return Hiddens(last=last.astype(compute), layers=None)

    def teacher_logits(self, params, shared, target_cfg, h):
        """The target's next-token logits [B, T, V] from its final hidden states h [B, T, D]."""
        return lm_head(cast_floats(shared, jnp.float32), target_cfg, h)

    def loss_fn(self, tc, cfg: F.EagleConfig, target_cfg):
        compute = jnp.dtype(tc.dtype)

        def loss(params, shared, tokens, mask, last, layers):
            """tokens, mask [B, S]; last [B, S, D]; layers [n, B, S, D] (features of every
            position: the drafter reads 0..S-2 and must match the target's logits at 1..S-1)."""
            p = cast_floats(dict(params, target=shared), compute)
            hid = self.hiddens(last[:, :-1], layers[:, :, :-1], compute)
            tl = self.teacher_logits(params, shared, target_cfg, last[:, 1:].astype(jnp.float32))
            value, metrics = eagle_loss(
                cfg, p, target_cfg, hid, tl, tokens, mask, steps=tc.ttt_steps, decay=tc.ttt_decay
            )
            return value.astype(jnp.float32), metrics

        return loss

    def step_inputs(self, tc, cfg, batch, step: int) -> tuple:
        # Whole feature sequences: the training-time test needs every position's context.
        return tuple(batch), int(batch.mask.sum())

    def eval_drafter(self, cfg: F.EagleConfig, params, tree=None):
        return drafters.eagle((cfg, params), tree=tree or EVAL_TREE)

    def export(self, path, cfg: F.EagleConfig, params, target_cfg) -> None:
        from checkpoints_convert.eagle_hf import save_eagle_hf

        save_eagle_hf(path, cfg, params, target_cfg)
