"""Medusa-1 drafting heads (Cai et al. 2024, "Medusa").

Extra heads on the target's final hidden state h_t (after the final norm, what its LM head
reads). The target's own head at position t gives x_{t+1}; Medusa head i (0-based) gives
x_{t+2+i}. A head is `num_layers_per_head` residual blocks h <- h + silu(h @ w + b) followed by
the target's LM head, which is shared, never copied: `bind_target` (EAGLE's) adds the
target's embedding (and head) under "target" when `generate` runs. `w` starts at zero, so an
untrained head is the target's next-token head, as in Medusa.

State per row: `feat` = h_t at the position t whose target logits produced `last`. The heads
read only that one feature, so there is no draft cache: a step's drafts never condition on
each other (a chain's token i is drawn from head i alone), and `commit` just picks the feature
of the position that produced the bonus token out of the verify forward.

Drafting shapes:
- `MedusaSpec`: a chain of k <= num_heads tokens, token i from head i (greedy argmax, or a
  sample from the processed head distribution, returned as `Draft.logp` so that verification
  stays exact).
- `MedusaTreeSpec`: Medusa's static "cartesian" tree from a choice list: the node at depth d with
  sibling rank r takes the r-th best token of head d-1, whatever its parent. The candidates are
  deterministic, so verification under sampling uses the exact one-hot construction.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.typing import DTypeLike

from specjax.drafters.shapes import check_static_tree, tree_depths
from specjax.engine.protocol import (
    Draft,
    DrafterSpec,
    TargetPrefill,
    TargetStep,
    Tree,
    TreeDraft,
    Verified,
)
from specjax.models import lm_head
from specjax.models.config import ModelConfig

# Shared with EAGLE: the target's embedding and LM head go under params["target"].
from specjax.models.eagle import bind_target  # noqa: F401  (re-exported)
from specjax.sampling import SamplingMode, pick_token, process_logits

LOSS_DECAY = 0.8  # Medusa's per-head loss weight decay: head i is weighted 0.8**i


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
    """Static shape of a set of Medusa heads (hashable: part of the compiled program)."""

    num_heads: int
    hidden: int  # the target's hidden size
    num_layers_per_head: int = 1

    def __post_init__(self) -> None:
        for name in ("num_heads", "hidden", "num_layers_per_head"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Medusa {name} must be a positive int, got {v!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MedusaConfig:
        return cls(**d)


@dataclasses.dataclass(frozen=True, eq=False)
class MedusaHeads:
    """Trained (or fresh) heads: what `specjax.drafters.medusa(...)` takes."""

    config: MedusaConfig
    params: dict
    name: str = "medusa"


def init_params(cfg: MedusaConfig, key: jax.Array, dtype: DTypeLike = jnp.float32) -> dict:
    """Fresh heads: zero weights (each head = the target's next-token head), zero biases.
    `key` is unused by the zero init but kept for a uniform init signature."""
    del key
    L, D = cfg.num_layers_per_head, cfg.hidden
    return {
        "heads": [
            {"w": jnp.zeros((L, D, D), dtype), "b": jnp.zeros((L, D), dtype)}
            for _ in range(cfg.num_heads)
        ]
    }


def check_params(cfg: MedusaConfig, params: dict) -> None:
    """Raise ValueError when `params` do not have the shapes `cfg` says."""
    heads = params.get("heads") if isinstance(params, dict) else None
    if not isinstance(heads, (list, tuple)) or len(heads) != cfg.num_heads:
        raise ValueError(f"Medusa params need a list of {cfg.num_heads} heads under 'heads'")
    L, D = cfg.num_layers_per_head, cfg.hidden
    for i, hp in enumerate(heads):
        if tuple(hp["w"].shape) != (L, D, D) or tuple(hp["b"].shape) != (L, D):
            raise ValueError(
                f"Medusa head {i} has w {tuple(hp['w'].shape)}, b "
                f"{tuple(hp['b'].shape)}; the config says ({L}, {D}, {D}), ({L}, {D})"
            )


# ----------------------------------------------------------------------------- pure functions
# Shared by inference (below) and training (`medusa_loss`).


def head_hidden(head: dict, h: jax.Array) -> jax.Array:
    """One head's residual blocks over target features h [..., D] -> [..., D]."""
    for layer in range(head["w"].shape[0]):  # static and small (Medusa uses 1)
        h = h + jax.nn.silu(h @ head["w"][layer] + head["b"][layer])
    return h


def head_logits(params: dict, target_cfg: ModelConfig, h: jax.Array, n: int) -> jax.Array:
    """Float32 logits of the first n heads at target features h [B, D] -> [B, n, V]."""
    outs = [head_hidden(params["heads"][i], h) for i in range(n)]
    return lm_head(params["target"], target_cfg, jnp.stack(outs, axis=1))


def _head_ce(
    params: dict,
    target_cfg: ModelConfig,
    i: int,
    h: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Head i's mean cross-entropy and top-1 accuracy over features h [..., D] with labels
    [...] where valid [...] (float)."""
    logits = lm_head(params["target"], target_cfg, head_hidden(params["heads"][i], h))
    count = jnp.maximum(valid.sum(), 1.0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(nll * valid) / count, jnp.sum(hit * valid) / count


def medusa_loss(
    cfg: MedusaConfig,
    params: dict,
    target_cfg: ModelConfig,
    hiddens_last: jax.Array,
    tokens: jax.Array,
    mask: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Medusa-1 training loss over target features -> (loss, top-1 accuracy per head [H]).

    hiddens_last [B, T, D]: the target's final hidden states over `tokens` [B, T]; mask [B, T]
    (or broadcastable to it): 1 where a token counts as a label (0 for padding, or e.g. prompt
    tokens). Head i at position t is trained on tokens[t + 2 + i] (cross-entropy, masked by
    that label's mask and by running off the end), heads weighted LOSS_DECAY**i. Pure and
    jit-able (cfg and target_cfg static)."""
    T = tokens.shape[1]
    mask = jnp.broadcast_to(mask, tokens.shape)  # a shared [T] or [1, T] mask counts per row
    loss, accs = jnp.float32(0.0), []
    for i in range(cfg.num_heads):
        shift = 2 + i
        if shift >= T:  # no position has a label this far ahead
            accs.append(jnp.float32(0.0))
            continue
        ce, acc = _head_ce(
            params,
            target_cfg,
            i,
            hiddens_last[:, : T - shift],
            tokens[:, shift:],
            mask[:, shift:].astype(jnp.float32),
        )
        loss = loss + LOSS_DECAY**i * ce
        accs.append(acc)
    return loss, jnp.stack(accs)


def medusa_position_loss(
    cfg: MedusaConfig,
    params: dict,
    target_cfg: ModelConfig,
    h: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """`medusa_loss` on sampled positions: h [P, D] target features, labels [P, H] the tokens
    2..H+1 ahead, valid [P, H]. Heads need no context, so training on a random subset of
    positions cuts the cost of the H full-vocabulary heads (the dominant cost on CPU)."""
    loss, accs = jnp.float32(0.0), []
    for i in range(cfg.num_heads):
        ce, acc = _head_ce(params, target_cfg, i, h, labels[:, i], valid[:, i].astype(jnp.float32))
        loss = loss + LOSS_DECAY**i * ce
        accs.append(acc)
    return loss, jnp.stack(accs)


def save_medusa(path: str | os.PathLike, cfg: MedusaConfig, params: dict) -> None:
    """config.json + model.safetensors (keys heads.{i}.w / heads.{i}.b); the target's head is
    shared, never stored."""
    import json
    from pathlib import Path

    import numpy as np
    from safetensors.numpy import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(
        json.dumps({"architecture": "specjax-medusa", **cfg.to_dict()}, indent=1)
    )
    tensors = {
        f"heads.{i}.{n}": np.asarray(h[n])
        for i, h in enumerate(params["heads"])
        for n in ("w", "b")
    }
    save_file(tensors, str(out / "model.safetensors"))


def load_medusa(path: str | os.PathLike) -> MedusaHeads:
    """Inverse of `save_medusa`, with clear errors for a wrong directory or shapes."""
    import json
    from pathlib import Path

    from safetensors.numpy import load_file

    d = Path(path)
    cfile = d / "config.json"
    if not cfile.exists():
        raise ValueError(f"{d} holds no Medusa heads (no config.json)")
    raw = json.loads(cfile.read_text())
    if raw.pop("architecture", None) != "specjax-medusa":
        raise ValueError(f"{cfile} does not describe specjax Medusa heads")
    cfg = MedusaConfig.from_dict(raw)
    t = load_file(str(d / "model.safetensors"))
    extra = sorted(set(t) - {f"heads.{i}.{n}" for i in range(cfg.num_heads) for n in "wb"})
    if extra:
        raise ValueError(f"unexpected tensors in {d}: {extra}")
    try:
        params = {
            "heads": [
                {"w": jnp.asarray(t[f"heads.{i}.w"]), "b": jnp.asarray(t[f"heads.{i}.b"])}
                for i in range(cfg.num_heads)
            ]
        }
    except KeyError as e:
        raise ValueError(f"{d} misses tensor {e.args[0]}") from None
    check_params(cfg, params)
    return MedusaHeads(cfg, params, name=d.name)


# ----------------------------------------------------------------------------- the drafter


@struct.dataclass
class MedusaState:
    feat: jax.Array  # [B, D] target feature at the position whose logits produced `last`


@dataclasses.dataclass(frozen=True)
class MedusaBase(DrafterSpec):
    """What the chain and the tree share: the state, its init and commit, compatibility."""

    medusa: MedusaConfig | None = None  # always given (a default: the base's fields have them)
    # Set when bound to a target (the shared LM head needs it); None before.
    target_cfg: ModelConfig | None = None

    def check_compatible(self, target_cfg: ModelConfig, target_dtype: np.dtype) -> None:
        if self.medusa.hidden != target_cfg.hidden_size:
            raise ValueError(
                f"Medusa heads have hidden size {self.medusa.hidden} but the "
                f"target's is {target_cfg.hidden_size}: they were trained for "
                f"another model"
            )

    @property
    def cache_slack(self) -> int:
        return 0  # no draft cache; the target's verify block is covered by k

    def init(self, params: dict, prefill: TargetPrefill, max_len: int) -> MedusaState:
        last = prefill.hiddens.last  # [B, P, D]
        at = (prefill.lengths - 1)[:, None, None]  # the last prompt position produced `first`
        return MedusaState(feat=jnp.take_along_axis(last, at, axis=1)[:, 0])

    def _commit_at(
        self, state: MedusaState, offset: jax.Array, active: jax.Array, target: TargetStep
    ) -> MedusaState:
        """Take the verify block's feature at `offset` [B] (the position that produced the
        bonus token, the next `last`) for active rows."""
        feat = jnp.take_along_axis(target.hiddens.last, offset[:, None, None], axis=1)[:, 0]
        return MedusaState(feat=jnp.where(active[:, None], feat, state.feat))

    def commit(
        self,
        params: dict,
        state: MedusaState,
        draft: Draft | TreeDraft,
        verified: Verified,
        active: jax.Array,
        target: TargetStep,
    ) -> MedusaState:
        # The deepest accepted node (-1: none, the bonus came from `last` at block offset 0)
        # produced the bonus; draft node i sits at block offset i + 1 (chains and trees).
        return self._commit_at(state, verified.deepest + 1, active, target)


@dataclasses.dataclass(frozen=True)
class MedusaSpec(MedusaBase):
    """A chain of k tokens, token i drafted by head i."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.medusa is not None and self.k > self.medusa.num_heads:
            raise ValueError(
                f"a Medusa chain of k={self.k} tokens needs k heads, there are "
                f"{self.medusa.num_heads}"
            )

    def propose(
        self,
        params: dict,
        state: MedusaState,
        last: jax.Array,
        key: jax.Array,
        mode: SamplingMode,
        sp: dict,
    ) -> tuple[Draft, MedusaState]:
        logits = head_logits(params, self.target_cfg, state.feat, self.k)  # [B, K, V]
        # Each token is drawn from its own head's distribution (independent of the earlier
        # draft tokens): verify_chain is exact for any such q.
        tokens, logp = pick_token(logits, key, mode, sp)
        return Draft(tokens=tokens, logp=logp), state


@dataclasses.dataclass(frozen=True)
class MedusaTreeSpec(MedusaBase):
    """Medusa's static tree: node i hangs under `parents[i]` (-1: under `last`) and takes the
    `rank[i]`-th best token of head depth(i) - 1 (see
    `specjax.drafters.shapes.parents_from_choices`)."""

    parents: tuple = ()
    rank: tuple = ()

    is_tree = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_static_tree(self.k, self.parents, self.rank)
        if self.medusa is not None and self.max_accept > self.medusa.num_heads:
            raise ValueError(
                f"a Medusa tree of depth {self.max_accept} needs that many heads, "
                f"there are {self.medusa.num_heads}"
            )

    @property
    def depths(self) -> np.ndarray:
        """[N] depth of each node (1: children of `last`), static."""
        return tree_depths(self.parents)

    @property
    def max_accept(self) -> int:
        return int(self.depths.max())

    def check_compatible(self, target_cfg: ModelConfig, target_dtype: np.dtype) -> None:
        super().check_compatible(target_cfg, target_dtype)
        if max(self.rank) + 1 > target_cfg.vocab_size:
            raise ValueError(
                f"static tree takes the top {max(self.rank) + 1} tokens, more "
                f"than the vocabulary ({target_cfg.vocab_size})"
            )

    def propose(
        self,
        params: dict,
        state: MedusaState,
        last: jax.Array,
        key: jax.Array,
        mode: SamplingMode,
        sp: dict,
    ) -> tuple[TreeDraft, MedusaState]:
        B, N = last.shape[0], self.k
        depth = self.depths
        logits = head_logits(params, self.target_cfg, state.feat, self.max_accept)  # [B, D, V]
        # Rank by the distribution sampling would use (the same order as the logits, but
        # tokens outside top-k / top-p rank last).
        rank_lp = logits if mode.greedy else process_logits(logits, mode, sp)
        _, cand = jax.lax.top_k(rank_lp, max(self.rank) + 1)  # [B, D, top]
        tokens = cand[:, depth - 1, np.asarray(self.rank)]  # [B, N]: head by depth, by rank
        row = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32), (B, N))  # noqa: E731
        tree = Tree(
            tokens=tokens, parents=row(self.parents), depth=row(depth), valid=jnp.ones((B, N), bool)
        )
        return TreeDraft(tree=tree), state
