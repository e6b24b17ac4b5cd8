"""EAGLE-3 (`kind="eagle3"`, Li et al. 2025): as EAGLE-1 (`eagle.Eagle`), but the drafter fuses
three target layers (low, mid, high) through its fc, drops the feature regression
(`losses.eagle_loss` reads the version) and drafts over a reduced vocabulary: the most frequent
response tokens of the dataset, chosen once per run and saved as OUT/d2t.npy, so a resumed run
keeps the same head. The d2t index map is part of the params but never trained."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from specjax.models import Hiddens
from specjax.models import eagle as F
from specjax.train import data as data_lib
from specjax.train.recipes.eagle import Eagle

if TYPE_CHECKING:
    from jax.typing import DTypeLike

    from specjax.model import Model
    from specjax.models.config import ModelConfig
    from specjax.train.trainer import TrainConfig


class Eagle3(Eagle):
    kind: str = "eagle3"
    frozen: tuple[str, ...] = ("d2t",)

    def drafter_config(
        self,
        target: Model,
        tc: TrainConfig,
        tokens: np.ndarray,
        mask: np.ndarray,
        out: Path,
        exported: tuple[F.EagleConfig, dict] | None = None,
    ) -> F.EagleConfig:
        vocab = target.config.vocab_size
        f = Path(out) / "d2t.npy"
        if not f.exists():  # fixed once per run: a resumed run must keep the same head
            if exported is not None:  # a warm start keeps the exported drafter's vocabulary
                d2t = np.asarray(exported[1]["d2t"])
            else:
                d2t = data_lib.draft_vocab(
                    tokens, mask, min(tc.draft_vocab, vocab), vocab, always=target.eos_token_ids
                )
            np.save(f, d2t)
        size = int(np.load(f).shape[0])
        return F.make_config(
            target.config,
            3,
            intermediate_size=tc.intermediate_size,
            draft_vocab=size,
            num_layers=tc.draft_layers,
        )

    def init_params(self, tc: TrainConfig, cfg: F.EagleConfig, out: Path) -> dict:
        return F.init_params(
            cfg, jax.random.key(tc.seed), jnp.float32, d2t=np.load(Path(out) / "d2t.npy")
        )

    def hiddens(self, last: jax.Array, layers: jax.Array, compute: DTypeLike) -> Hiddens:
        return Hiddens(last=last.astype(compute), layers=layers.astype(compute))

    def teacher_logits(
        self, params: dict, shared: dict, target_cfg: ModelConfig, h: jax.Array
    ) -> jax.Array:
        """The target's logits restricted to the draft vocabulary [B, T, V']: the drafter's
        head predicts only those tokens, so its soft targets live there too."""
        head = shared["embed"].T if target_cfg.tie_word_embeddings else shared["lm_head"]
        return h @ head[:, params["d2t"]].astype(jnp.float32)
