"""Medusa-1 heads (`kind="medusa"`, Cai et al. 2024): residual heads on the target's final
hidden state, zero-initialised (each starts as the target's next-token head). A head needs no
context, so a step trains on positions sampled from the batch (`sample_positions`) instead of
whole sequences: the H full-vocabulary heads dominate the cost. Exported with
`medusa_heads.save_medusa`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from specjax import drafters
from specjax.drafters import medusa_heads
from specjax.drafters.medusa_heads import MedusaConfig

if TYPE_CHECKING:
    from specjax.drafters.shapes import StaticTree
    from specjax.engine.protocol import Drafter
    from specjax.model import Model
    from specjax.models.config import ModelConfig
    from specjax.paths import StrPath
    from specjax.train.features import Batch
    from specjax.train.recipes import LossFn
    from specjax.train.trainer import TrainConfig

# Held-out tau: a static tree no deeper than the heads (8 nodes for 4+ heads, else the first 3).
EVAL_CHOICES = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]]


def sample_positions(
    tokens: np.ndarray,
    mask: np.ndarray,
    last: np.ndarray,
    heads: int,
    n: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample n positions t of a batch whose first label (t + 2) is trained -> features
    [n, D], labels [n, heads] (tokens t+2 .. t+1+heads), valid [n, heads]."""
    B, S = tokens.shape
    ok = np.zeros((B, S), bool)
    ok[:, : S - 2] = mask[:, 2:]
    rows, cols = np.nonzero(ok)
    pick = rng.choice(len(rows), n, replace=len(rows) < n)
    r, c = rows[pick], cols[pick]
    ahead = c[:, None] + 2 + np.arange(heads)[None, :]
    inside = ahead < S
    ahead = np.minimum(ahead, S - 1)
    return (last[r, c], tokens[r[:, None], ahead], inside & mask[r[:, None], ahead])


class Medusa:
    kind: str = "medusa"
    frozen: tuple[str, ...] = ()

    def drafter_config(
        self,
        target: Model,
        tc: TrainConfig,
        tokens: np.ndarray,
        mask: np.ndarray,
        out: Path,
        exported: tuple[MedusaConfig, dict] | None = None,
    ) -> MedusaConfig:
        return MedusaConfig(num_heads=tc.medusa_heads, hidden=target.config.hidden_size)

    def feature_layers(self, cfg: MedusaConfig) -> tuple[int, ...]:
        return ()  # the heads read the final hidden state only

    def init_params(self, tc: TrainConfig, cfg: MedusaConfig, out: Path) -> dict:
        return medusa_heads.init_params(cfg, jax.random.key(tc.seed))

    def loss_fn(self, tc: TrainConfig, cfg: MedusaConfig, target_cfg: ModelConfig) -> LossFn:
        def loss(
            params: dict, shared: dict, h: jax.Array, labels: jax.Array, valid: jax.Array
        ) -> tuple[jax.Array, dict[str, jax.Array]]:
            """h [P, D] features of the sampled positions; labels, valid [P, heads]."""
            value, acc = medusa_heads.medusa_position_loss(
                cfg, dict(params, target=shared), target_cfg, h.astype(jnp.float32), labels, valid
            )
            return value, {"acc": acc}

        return loss

    def step_inputs(
        self, tc: TrainConfig, cfg: MedusaConfig, batch: Batch, step: int
    ) -> tuple[tuple[np.ndarray, ...], int]:
        # Seeded by (seed, step) alone: a resumed run samples the same positions.
        rng = np.random.default_rng([tc.seed, step, 1])
        picked = sample_positions(
            batch.tokens, batch.mask, batch.last, cfg.num_heads, tc.medusa_positions, rng
        )
        return picked, tc.medusa_positions

    def eval_drafter(
        self, cfg: MedusaConfig, params: dict, tree: StaticTree | None = None
    ) -> Drafter:
        choices = EVAL_CHOICES[: 8 if cfg.num_heads >= 4 else 3]
        return drafters.medusa((cfg, params), tree=tree or drafters.StaticTree(choices))

    def export(
        self, path: StrPath, cfg: MedusaConfig, params: dict, target_cfg: ModelConfig
    ) -> None:
        medusa_heads.save_medusa(path, cfg, params)

    def load_export(self, path: Path, target: Model) -> tuple[MedusaConfig, dict]:
        heads = medusa_heads.load_medusa(path)
        return heads.config, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), heads.params)
