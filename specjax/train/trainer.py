"""Train an EAGLE-1 or EAGLE-3 drafter for a target with optax; orbax checkpoints that resume
exactly.

Pipeline (each stage resumable, each with a progress bar):
  1. a dataset of token rows (`specjax.train.data.build_dataset`: self-distilled or given answers);
  2. the target's features over every row, computed once and cached to disk as memory-mapped
     `.npy` shards (`features.cache_features`), so training reads batches with bounded memory and never
     runs the 30-layer target again;
  3. AdamW with linear warmup + cosine decay and global-norm clipping, one jitted train step;
     the batch of step i depends only on (seed, i), so a run restored from the checkpoint of step
     i continues with exactly the losses an uninterrupted run would have produced;
  4. periodic tau on held-out prompts (`generate` with the drafter), then an export in the HF
     EAGLE format that `specjax.drafters.eagle(DIR)`, vLLM and SGLang can load.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from specjax.drafters import feature as F
from specjax.models.llama import Hiddens, lm_head
from specjax.train import data as data_lib
from specjax.train.features import FeatureStore, cache_features  # noqa: F401  (public here)
from specjax.train.losses import eagle_loss

KINDS = {"eagle": 1, "eagle3": 3, "medusa": 0}  # kind -> EAGLE version (0: Medusa heads)
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    kind: str = "eagle3"  # eagle (EAGLE-1/2) | eagle3
    steps: int = 2000
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0  # global-norm gradient clipping
    ttt_steps: int = 3  # training-time test steps (1: plain teacher forcing)
    ttt_decay: float = 0.8
    draft_vocab: int = 8192  # eagle3: the most frequent response tokens
    intermediate_size: Optional[int] = None  # the drafter's MLP width (default: the target's)
    medusa_heads: int = 4  # medusa: number of heads
    medusa_positions: int = 512  # medusa: positions sampled per step (heads need no context)
    dtype: str = "float32"  # compute dtype of the step (optimizer state stays float32)
    feature_dtype: str = "float16"  # of the on-disk feature cache
    seed: int = 0
    log_every: int = 10
    save_every: int = 200
    eval_every: int = 0  # tau on held-out prompts every N steps (0: at the end only)
    eval_prompts: int = 16
    eval_new_tokens: int = 64

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown drafter kind {self.kind!r}; valid: {sorted(KINDS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("steps", "batch", "ttt_steps", "log_every", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")

    @property
    def version(self) -> int:
        return KINDS[self.kind]

    @classmethod
    def from_yaml(cls, path, **overrides) -> "TrainConfig":
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(raw) - known - {"data"})
        if extra:
            raise ValueError(f"unknown keys {extra} in {path}; valid: {sorted(known)}")
        raw = {k: v for k, v in raw.items() if k in known}
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**raw)


# ----------------------------------------------------------------------------- the step

def make_optimizer(cfg: TrainConfig):
    warm = min(cfg.warmup, cfg.steps - 1) or 1
    # Warmup starts at lr / warmup, not 0, so the first step already updates.
    sched = optax.warmup_cosine_decay_schedule(cfg.lr / warm, cfg.lr, warm,
                                               cfg.steps, end_value=cfg.lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(cfg.clip),
                       optax.adamw(sched, weight_decay=cfg.weight_decay)), sched


def make_train_step(tc: TrainConfig, ecfg: F.EagleConfig, target, optimizer):
    tcfg = target.config
    compute = jnp.dtype(tc.dtype)

    def loss_fn(params, shared, tokens, mask, last, layers):
        p = jax.tree.map(lambda x: x.astype(compute) if jnp.issubdtype(x.dtype, jnp.floating)
                         else x, dict(params, target=shared))
        hid = Hiddens(last=last[:, :-1].astype(compute),
                      layers=None if ecfg.version == 1 else layers[:, :, :-1].astype(compute))
        # The target's next-token logits at positions 1..S-1 (version 3: on the draft vocab).
        h1 = last[:, 1:].astype(jnp.float32)
        if ecfg.version == 1:
            tl = lm_head(jax.tree.map(lambda x: x.astype(jnp.float32), shared), tcfg, h1)
        else:
            head = shared["embed"].T if tcfg.tie_word_embeddings else shared["lm_head"]
            tl = h1 @ head[:, params["d2t"]].astype(jnp.float32)
        loss, metrics = eagle_loss(ecfg, p, tcfg, hid, tl, tokens, mask, steps=tc.ttt_steps,
                                   decay=tc.ttt_decay)
        return loss.astype(jnp.float32), metrics

    @jax.jit
    def step(params, opt_state, shared, tokens, mask, last, layers):
        trainable = {k: v for k, v in params.items() if k != "d2t"}
        fixed = {k: v for k, v in params.items() if k == "d2t"}
        (loss, metrics), grads = jax.value_and_grad(
            lambda tr: loss_fn(dict(tr, **fixed), shared, tokens, mask, last, layers),
            has_aux=True)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return dict(trainable, **fixed), opt_state, loss, metrics

    return step


def make_medusa_step(tc: TrainConfig, mcfg, target, optimizer):
    from specjax.drafters.medusa_heads import medusa_position_loss

    tcfg = target.config

    @jax.jit
    def step(params, opt_state, shared, h, labels, valid):
        def loss_fn(p):
            return medusa_position_loss(mcfg, dict(p, target=shared), tcfg,
                                        h.astype(jnp.float32), labels, valid)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, {"acc": acc}

    return step


def medusa_positions(tokens, mask, last, heads: int, n: int, rng):
    """Sample n positions t of a batch whose first label (t + 2) is trained -> features
    [n, D], labels [n, heads] (tokens t+2 .. t+1+heads), valid [n, heads]."""
    B, S = tokens.shape
    ok = np.zeros((B, S), bool)
    ok[:, :S - 2] = mask[:, 2:]
    rows, cols = np.nonzero(ok)
    pick = rng.choice(len(rows), n, replace=len(rows) < n)
    r, c = rows[pick], cols[pick]
    ahead = c[:, None] + 2 + np.arange(heads)[None, :]
    inside = ahead < S
    ahead = np.minimum(ahead, S - 1)
    return (last[r, c], tokens[r[:, None], ahead],
            inside & mask[r[:, None], ahead])


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(ValueError):
    pass


def _manager(ckpt_dir: Path, keep: int = 2):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(ckpt_dir.absolute(), options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True))


def _save(mgr, step: int, params, opt_state):
    import orbax.checkpoint as ocp

    mgr.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    mgr.wait_until_finished()


def _restore(mgr, step: int, params, opt_state, ckpt_dir):
    import orbax.checkpoint as ocp

    like = {"params": params, "opt_state": opt_state}
    try:
        got = mgr.restore(step, args=ocp.args.StandardRestore(like))
    except Exception as e:  # orbax raises many types for unreadable or mismatched trees
        raise CheckpointError(f"cannot restore the checkpoint of step {step} in {ckpt_dir}: "
                              f"{type(e).__name__}: {str(e)[:300]}") from e
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(like)[0],
                            jax.tree.leaves(got)):
        if np.shape(a) != np.shape(b):
            raise CheckpointError(f"checkpoint {ckpt_dir} step {step}: "
                                  f"{jax.tree_util.keystr(path)} has shape {np.shape(b)}, this run "
                                  f"expects {np.shape(a)}")
    return got["params"], got["opt_state"]


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: a mismatch then names the one field that differs."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_run_config(out: Path, record: dict):
    """A run directory belongs to one configuration: refuse to resume another one into it."""
    f = out / "run.json"
    record = json.loads(json.dumps(record))  # tuples -> lists, as the saved file has them
    if f.exists():
        old = json.loads(f.read_text())
        old, new = _flatten(old), _flatten(record)
        diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)}
        if diff:
            raise CheckpointError(f"{out} holds a run with a different configuration; differing "
                                  f"(saved, requested): {diff}. Use a new --out directory.")
    else:
        f.write_text(json.dumps(record, indent=1, sort_keys=True))


# ----------------------------------------------------------------------------- training

def train(target, tc: TrainConfig, dataset_dir, out_dir, *, heldout_prompts=(),
          progress: bool = True, stop_after: Optional[int] = None, log=print,
          features_dir=None):
    """Train (or resume) a drafter -> (EagleConfig or MedusaConfig, params, history).

    `features_dir`: where the target's features are cached (default OUT/features; drafters
    of one target can share a cache: one holding more layers serves one reading fewer).

    `stop_after`: stop once this many steps are done in total (to simulate an interruption;
    the schedule still spans `tc.steps`). The drafter is exported to out_dir/drafter in the HF
    EAGLE format when training completes."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens_all, mask_all = data_lib.read_dataset(dataset_dir)
    ecfg = _drafter_config(target, tc, tokens_all, mask_all, out)
    _check_run_config(out, {"train": dataclasses.asdict(tc), "drafter": ecfg.to_dict(),
                            "target": target.name, "dataset": str(Path(dataset_dir).absolute()),
                            "rows": int(tokens_all.shape[0])})
    layers = tuple(getattr(ecfg, "feature_layers", ()))
    feat_dir = cache_features(target, dataset_dir, features_dir or out / "features", layers,
                              dtype=tc.feature_dtype, progress=progress)
    store = FeatureStore(dataset_dir, feat_dir, layers)
    params = _init_params(tc, ecfg, out)
    optimizer, sched = make_optimizer(tc)
    opt_state = optimizer.init({k: v for k, v in params.items() if k != "d2t"})
    mgr = _manager(out / "checkpoints")
    start = 0
    if mgr.latest_step() is not None:
        start = int(mgr.latest_step())
        params, opt_state = _restore(mgr, start, params, opt_state, out / "checkpoints")
        log(f"resumed from step {start} ({out / 'checkpoints'})")
    history = _read_history(out, start)
    shared = {k: target.params[k] for k in ("embed", "lm_head") if k in target.params}
    medusa = tc.kind == "medusa"
    step_fn = (make_medusa_step if medusa else make_train_step)(tc, ecfg, target, optimizer)
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = tqdm(total=tc.steps, initial=start, desc=f"train {tc.kind}", disable=not progress)
    t0, seen = time.perf_counter(), 0
    batches = data_lib.iterate_batches(store.rows, tc.batch, tc.seed, start)
    for step, idx in batches:
        if step >= end:
            break
        t, m, la, ly = store.batch(idx)
        if medusa:
            args = medusa_positions(t, m, la, ecfg.num_heads, tc.medusa_positions,
                                    np.random.default_rng([tc.seed, step, 1]))
            seen += tc.medusa_positions
        else:
            args = (t, m, la, ly)
            seen += int(m.sum())
        params, opt_state, loss, metrics = step_fn(params, opt_state, shared,
                                                   *map(jnp.asarray, args))
        done = step + 1
        if done % tc.log_every == 0 or done == end:
            acc = np.asarray(metrics["acc"], np.float64).round(3).tolist()
            rec = {"step": done, "loss": float(loss), "acc": acc, "lr": float(sched(step)),
                   "tok_per_s": seen / (time.perf_counter() - t0)}
            if "ce" in metrics:
                rec["ce"] = np.asarray(metrics["ce"], np.float64).round(4).tolist()
            history.append(rec)
            _append_history(out, rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=acc, tok_s=f"{rec['tok_per_s']:.0f}")
        if tc.eval_every and done % tc.eval_every == 0 and heldout_prompts:
            _log_tau(target, ecfg, params, heldout_prompts, tc, done, out, history, log)
        if done % tc.save_every == 0 or done == end:
            _save(mgr, done, params, opt_state)
        bar.update(1)
    bar.close()
    if end == tc.steps:
        if heldout_prompts and (not tc.eval_every or tc.steps % tc.eval_every):
            _log_tau(target, ecfg, params, heldout_prompts, tc, tc.steps, out, history, log)
        export(out / "drafter", ecfg, jax.device_get(params), target.config)
    return ecfg, params, history


def export(path, cfg, params, target_cfg) -> None:
    """The trained drafter in its shareable format (HF EAGLE, or specjax Medusa heads)."""
    if isinstance(cfg, F.EagleConfig):
        from checkpoints_convert.eagle_hf import save_eagle_hf

        save_eagle_hf(path, cfg, params, target_cfg)
    else:
        from specjax.drafters.medusa_heads import save_medusa

        save_medusa(path, cfg, params)


def _init_params(tc: TrainConfig, cfg, out: Path) -> dict:
    key = jax.random.key(tc.seed)
    if tc.kind == "medusa":
        from specjax.drafters import medusa_heads

        # Zero init (Medusa's): every head starts as the target's next-token head.
        return medusa_heads.init_params(cfg, key)
    d2t = np.load(out / "d2t.npy") if cfg.version == 3 else None
    return F.init_params(cfg, key, jnp.float32, d2t=d2t)


def _drafter_config(target, tc: TrainConfig, tokens, mask, out: Path):
    if tc.kind == "medusa":
        from specjax.drafters.medusa_heads import MedusaConfig

        return MedusaConfig(num_heads=tc.medusa_heads, hidden=target.config.hidden_size)
    if tc.version == 1:
        return F.make_config(target.config, 1, intermediate_size=tc.intermediate_size)
    vocab = target.config.vocab_size
    f = out / "d2t.npy"
    if not f.exists():  # fixed once per run: a resumed run must keep the same head
        np.save(f, data_lib.draft_vocab(tokens, mask, min(tc.draft_vocab, vocab), vocab,
                                        always=target.eos_token_ids))
    size = int(np.load(f).shape[0])
    return F.make_config(target.config, 3, intermediate_size=tc.intermediate_size,
                         draft_vocab=size)


def _read_history(out: Path, upto: int) -> list:
    f = out / "history.jsonl"
    if not f.exists():
        return []
    recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    keep = [r for r in recs if r["step"] <= upto]
    f.write_text("".join(json.dumps(r) + "\n" for r in keep))  # drop steps after the checkpoint
    return keep


def _append_history(out: Path, rec: dict):
    with open(out / "history.jsonl", "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def evaluate_tau(target, ecfg, params, prompts, *, new_tokens: int = 64, tree=None):
    """Greedy tau and tokens/s of the drafter on `prompts` (batch 1 each, as Spec-Bench)."""
    from specjax import drafters
    from specjax.generate import generate

    if isinstance(ecfg, F.EagleConfig):
        d = drafters.eagle((ecfg, params), tree=tree or drafters.DynamicTree(nodes=8, depth=4,
                                                                             top_k=3))
    else:  # Medusa: a static tree no deeper than the heads
        d = drafters.medusa((ecfg, params), tree=tree or drafters.StaticTree(
            [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]][
                :8 if ecfg.num_heads >= 4 else 3]))
    fwd = emitted = 0
    for p in prompts:
        o = generate(target, [p], max_new_tokens=new_tokens, drafter=d)
        fwd += sum(o.stats["target_forwards"]) - 1
        emitted += o.lengths[0] - 1
    return emitted / max(fwd, 1)


def _log_tau(target, ecfg, params, prompts, tc, step, out, history, log):
    tau = evaluate_tau(target, ecfg, jax.device_get(params), prompts[:tc.eval_prompts],
                       new_tokens=tc.eval_new_tokens)
    rec = {"step": step, "tau": tau}
    history.append(rec)
    _append_history(out, rec)
    log(f"step {step}: held-out tau {tau:.2f}")
