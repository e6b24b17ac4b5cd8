"""EAGLE-1 (`kind="eagle"`, Li et al. 2024): one decoder layer over the target's final hidden
state, trained with training-time test on the cached feature sequences (`losses.eagle_loss`:
soft cross-entropy against the target's full-vocabulary next-token distribution plus EAGLE-1's
smooth-L1 feature regression), exported in the HF EAGLE format. `eagle3.Eagle3` changes only
what differs for EAGLE-3 (fused layers, draft vocabulary)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from specjax import drafters
from specjax.models import Hiddens, lm_head
from specjax.models import eagle as F
from specjax.train.losses import eagle_loss

if TYPE_CHECKING:
    import numpy as np
    from jax.typing import DTypeLike

    from specjax.drafters.shapes import DynamicTree
    from specjax.engine.protocol import Drafter
    from specjax.model import Model
    from specjax.models.config import ModelConfig
    from specjax.paths import StrPath
    from specjax.train.features import Batch
    from specjax.train.recipes import LossFn
    from specjax.train.trainer import TrainConfig

# Held-out tau drafts an EAGLE-2 dynamic tree of 8 nodes, as the tables of
# benchmarks/RESULTS.md report it.
EVAL_TREE = drafters.DynamicTree(nodes=8, depth=4, top_k=3)


def cast_floats(tree: Any, dtype: DTypeLike) -> Any:
    """The floating leaves of `tree` in `dtype`; integer index maps (d2t) stay as they are."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


class Eagle:
    kind: str = "eagle"
    frozen: tuple[str, ...] = ()

    def drafter_config(
        self,
        target: Model,
        tc: TrainConfig,
        tokens: np.ndarray,
        mask: np.ndarray,
        out: Path,
        exported: tuple[F.EagleConfig, dict] | None = None,
    ) -> F.EagleConfig:
        return F.make_config(
            target.config, 1, intermediate_size=tc.intermediate_size, num_layers=tc.draft_layers
        )

    def feature_layers(self, cfg: F.EagleConfig) -> tuple[int, ...]:
        return tuple(cfg.feature_layers)  # () for EAGLE-1: the final hidden state only

    def init_params(self, tc: TrainConfig, cfg: F.EagleConfig, out: Path) -> dict:
        return F.init_params(cfg, jax.random.key(tc.seed), jnp.float32)

    def hiddens(self, last: jax.Array, layers: jax.Array, compute: DTypeLike) -> Hiddens:
        """The drafter's input features: last [B, T, D] (layers [n, B, T, D] unused here)."""
        return Hiddens(last=last.astype(compute), layers=None)

    def teacher_logits(
        self, params: dict, shared: dict, target_cfg: ModelConfig, h: jax.Array
    ) -> jax.Array:
        """The target's next-token logits [B, T, V] from its final hidden states h [B, T, D]."""
        return lm_head(cast_floats(shared, jnp.float32), target_cfg, h)

    def loss_fn(self, tc: TrainConfig, cfg: F.EagleConfig, target_cfg: ModelConfig) -> LossFn:
        compute = jnp.dtype(tc.dtype)

        def loss(
            params: dict,
            shared: dict,
            tokens: jax.Array,
            mask: jax.Array,
            last: jax.Array,
            layers: jax.Array,
            embeds: jax.Array | None = None,
            emask: jax.Array | None = None,
        ) -> tuple[jax.Array, dict[str, jax.Array]]:
            """tokens, mask [B, S]; last [B, S, D]; layers [n, B, S, D] (features of every
            position: the drafter reads 0..S-2 and must match the target's logits at 1..S-1);
            embeds [B, S, D], emask [B, S]: image features of a vision-language target."""
            p = cast_floats(dict(params, target=shared), compute)
            hid = self.hiddens(last[:, :-1], layers[:, :, :-1], compute)
            tl = self.teacher_logits(params, shared, target_cfg, last[:, 1:].astype(jnp.float32))
            value, metrics = eagle_loss(
                cfg,
                p,
                target_cfg,
                hid,
                tl,
                tokens,
                mask,
                steps=tc.ttt_steps,
                decay=tc.ttt_decay,
                hard_weight=tc.hard_weight,
                embeds=None if embeds is None else (embeds.astype(compute), emask),
            )
            return value.astype(jnp.float32), metrics

        return loss

    def step_inputs(
        self, tc: TrainConfig, cfg: F.EagleConfig, batch: Batch, step: int
    ) -> tuple[tuple[np.ndarray, ...], int]:
        # Whole feature sequences: the training-time test needs every position's context
        # (and, for a vision-language target, its image features).
        return tuple(x for x in batch if x is not None), int(batch.mask.sum())

    def eval_drafter(
        self, cfg: F.EagleConfig, params: dict, tree: DynamicTree | None = None
    ) -> Drafter:
        return drafters.eagle((cfg, params), tree=tree or EVAL_TREE)

    def export(
        self, path: StrPath, cfg: F.EagleConfig, params: dict, target_cfg: ModelConfig
    ) -> None:
        from checkpoints_convert.eagle_hf import save_eagle_hf

        save_eagle_hf(path, cfg, params, target_cfg)

    def load_export(self, path: Path, target: Model) -> tuple[F.EagleConfig, dict]:
        from checkpoints_convert.eagle_hf import load_eagle_hf

        return load_eagle_hf(path, target.config, jnp.float32)
