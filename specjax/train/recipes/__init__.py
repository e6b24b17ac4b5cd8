"""One training recipe per drafter kind, and the registry `kind -> recipe` that
`TrainConfig.kind` names.

A recipe holds everything the generic trainer (`specjax.train.trainer.train`) must not know
about a kind: the drafter's config and fresh params, which target layers the feature cache
holds, the loss and the numpy inputs of one step, the drafter that `generate` runs for held-out
tau, and the export format. The trainer owns the rest (data, feature cache, optimizer,
checkpoints, resume, logging, the eval schedule).

A new kind is one new module here with a class satisfying `Recipe`, plus one line in `RECIPES`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jax

from specjax.train.recipes.eagle import Eagle
from specjax.train.recipes.eagle3 import Eagle3
from specjax.train.recipes.medusa import Medusa

if TYPE_CHECKING:
    import numpy as np

    from specjax.drafters.shapes import DynamicTree, StaticTree
    from specjax.engine.protocol import Drafter
    from specjax.model import Model
    from specjax.models.config import ModelConfig
    from specjax.paths import StrPath
    from specjax.train.features import Batch
    from specjax.train.trainer import TrainConfig

# A recipe's loss: (params, shared, *inputs) -> (float32 loss [], metrics {"acc": ..., ...}).
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


class Recipe(Protocol):
    """What one drafter kind brings to the generic trainer. Recipes are stateless: every
    method is a pure function of its arguments (and of files the recipe itself wrote in the
    run directory, so that a resumed run rebuilds the same drafter)."""

    kind: str
    # Param keys the optimizer never updates nor keeps state for (EAGLE-3's d2t index map).
    frozen: tuple[str, ...]

    def drafter_config(
        self,
        target: Model,
        tc: TrainConfig,
        tokens: np.ndarray,
        mask: np.ndarray,
        out: Path,
        exported: tuple[Any, dict] | None = None,
    ) -> Any:
        """The drafter's static config (has `to_dict`). tokens, mask [rows, S]: the whole
        dataset; out: the run directory; exported: (config, params) of the exported drafter
        the run warm-starts from (`load_export`), whose untrained leaves it keeps."""

    def feature_layers(self, cfg: Any) -> tuple[int, ...]:
        """The target layers the feature cache must hold besides the final hidden state."""

    def init_params(self, tc: TrainConfig, cfg: Any, out: Path) -> dict:
        """Fresh float32 params (the target's embedding / head are not among them)."""

    def loss_fn(self, tc: TrainConfig, cfg: Any, target_cfg: ModelConfig) -> LossFn:
        """(params, shared, *inputs) -> (float32 loss, metrics with "acc" [steps or heads]);
        shared: the target's "embed" (and "lm_head"), never trained."""

    def step_inputs(
        self, tc: TrainConfig, cfg: Any, batch: Batch, step: int
    ) -> tuple[tuple[np.ndarray, ...], int]:
        """-> (numpy inputs of `loss_fn` for this batch, tokens trained on, for tok/s).
        Depends only on (batch, step, tc.seed), so a resumed run sees the same inputs."""

    def eval_drafter(
        self, cfg: Any, params: dict, tree: DynamicTree | StaticTree | None = None
    ) -> Drafter:
        """The drafter `generate` runs for held-out tau (`tree`: its default shape if None)."""

    def export(self, path: StrPath, cfg: Any, params: dict, target_cfg: ModelConfig) -> None:
        """Write the trained drafter in its shareable format (loadable by path)."""

    def load_export(self, path: Path, target: Model) -> tuple[Any, dict]:
        """A drafter in the format `export` writes (a shipped one included) -> (its config,
        float32 params in the tree `init_params` builds): the warm start when
        `TrainConfig.init_from` names an exported drafter instead of a run."""


RECIPES = {
    "eagle": Eagle(),
    "eagle3": Eagle3(),
    "medusa": Medusa(),
}


def get(kind: str) -> Recipe:
    if kind not in RECIPES:
        raise ValueError(f"unknown drafter kind {kind!r}; valid: {sorted(RECIPES)}")
    return RECIPES[kind]


__all__ = ["Recipe", "RECIPES", "get", "Eagle", "Eagle3", "Medusa"]
