"""Train a drafter for a target with optax; orbax checkpoints that resume exactly.

Pipeline (each stage resumable, each with a progress bar):
  1. a dataset of token rows (`specjax.train.data.build_dataset`: self-distilled or given answers);
  2. the target's features over every row, computed once and cached to disk as memory-mapped
     `.npy` shards (`features.cache_features`), so training reads batches with bounded memory and
     never runs the 30-layer target again;
  3. AdamW with linear warmup + cosine decay and global-norm clipping, one jitted train step;
     the batch of step i depends only on (seed, i), so a run restored from the checkpoint of step
     i continues with exactly the losses an uninterrupted run would have produced;
  4. periodic tau on held-out prompts (`generate` with the drafter), then an export that
     `specjax.drafters` loads by path (EAGLE: the HF EAGLE format, which vLLM and SGLang load too).

This module is the same for every drafter kind. What differs per kind (the drafter's config and
fresh params, the target layers the feature cache holds, the loss and the inputs of one step,
the drafter evaluated for tau, the export) is that kind's recipe in `specjax.train.recipes`:
EAGLE-1 (`recipes/eagle.py`), EAGLE-3 (`recipes/eagle3.py`), Medusa heads (`recipes/medusa.py`).
To train a new kind of drafter, add one module to `specjax/train/recipes/` with a class that
satisfies `recipes.Recipe`, and one line to `recipes.RECIPES`; `TrainConfig(kind=...)` then
accepts its name and nothing here changes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from specjax.train import data as data_lib
from specjax.train import recipes
from specjax.train.features import FeatureStore, cache_features

if TYPE_CHECKING:
    from orbax.checkpoint import CheckpointManager

    from specjax.engine.protocol import Drafter
    from specjax.model import Model
    from specjax.paths import StrPath
    from specjax.train.recipes import LossFn, Recipe

# One jitted optimizer step: (params, opt_state, shared, *inputs)
#   -> (params, opt_state, float32 loss [], metrics).
StepFn = Callable[..., tuple[dict, optax.OptState, jax.Array, dict[str, jax.Array]]]

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    kind: str = "eagle3"  # a name in recipes.RECIPES: eagle (EAGLE-1/2) | eagle3 | medusa
    steps: int = 2000
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0  # global-norm gradient clipping
    ttt_steps: int = 3  # training-time test steps (1: plain teacher forcing)
    ttt_decay: float = 0.8
    hard_weight: float = 0.0  # eagle/eagle3: + this x cross-entropy to the target's argmax
    draft_vocab: int = 8192  # eagle3: the most frequent response tokens
    intermediate_size: int | None = None  # drafter MLP width (default: the target's; may grow)
    draft_layers: int = 1  # eagle/eagle3: decoder layers (a warm start may add layers: identity)
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
    # Warm start: another run directory of the same kind, drafter shape and dataset (this run
    # starts from the params of its latest checkpoint), or a drafter exported in the kind's
    # format (a run's `drafter/`, a shipped one in specjax/weights/: EAGLE-3 then keeps its draft
    # vocabulary, so new data can continue it). Fresh optimizer state and schedule, so a
    # finished drafter can train on with new data, more epochs or another learning rate.
    init_from: str | None = None

    def __post_init__(self) -> None:
        recipes.get(self.kind)  # an unknown kind raises, naming the valid ones
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("steps", "batch", "ttt_steps", "log_every", "save_every", "draft_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not self.hard_weight >= 0:
            raise ValueError(f"hard_weight must be >= 0, got {self.hard_weight!r}")

    @classmethod
    def from_yaml(cls, path: StrPath, **overrides: Any) -> TrainConfig:
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


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    warm = min(cfg.warmup, cfg.steps - 1) or 1
    # Warmup starts at lr / warmup, not 0, so the first step already updates.
    sched = optax.warmup_cosine_decay_schedule(
        cfg.lr / warm, cfg.lr, warm, cfg.steps, end_value=cfg.lr * 0.05
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip), optax.adamw(sched, weight_decay=cfg.weight_decay)
    ), sched


def make_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, frozen: tuple[str, ...] = ()
) -> StepFn:
    """One jitted optimizer step -> (params, opt_state, loss, metrics).

    loss_fn(params, shared, *inputs) -> (loss, metrics), from the recipe; the params named in
    `frozen` (EAGLE-3's d2t index map) take no gradient and have no optimizer state."""

    @jax.jit
    def step(
        params: dict, opt_state: optax.OptState, shared: dict, *inputs: jax.Array
    ) -> tuple[dict, optax.OptState, jax.Array, dict[str, jax.Array]]:
        trainable = {k: v for k, v in params.items() if k not in frozen}
        fixed = {k: v for k, v in params.items() if k in frozen}
        (loss, metrics), grads = jax.value_and_grad(
            lambda tr: loss_fn(dict(tr, **fixed), shared, *inputs), has_aux=True
        )(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return dict(trainable, **fixed), opt_state, loss, metrics

    return step


# ----------------------------------------------------------------------------- checkpoints


class CheckpointError(ValueError):
    pass


def _manager(ckpt_dir: Path, keep: int = 2) -> CheckpointManager:
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        ckpt_dir.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    )


def _save(mgr: CheckpointManager, step: int, params: dict, opt_state: optax.OptState) -> None:
    import orbax.checkpoint as ocp

    mgr.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    mgr.wait_until_finished()


def _restore(
    mgr: CheckpointManager, step: int, params: dict, opt_state: optax.OptState, ckpt_dir: Path
) -> tuple[dict, optax.OptState]:
    import orbax.checkpoint as ocp

    like = {"params": params, "opt_state": opt_state}
    _check_saved_shapes(ckpt_dir, step, like)
    try:
        got = mgr.restore(step, args=ocp.args.StandardRestore(like))
    except Exception as e:  # orbax raises many types for unreadable or mismatched trees
        raise CheckpointError(
            f"cannot restore the checkpoint of step {step} in {ckpt_dir}: "
            f"{type(e).__name__}: {str(e)[:300]}"
        ) from e
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(like)[0], jax.tree.leaves(got)):
        if np.shape(a) != np.shape(b):
            raise CheckpointError(
                f"checkpoint {ckpt_dir} step {step}: "
                f"{jax.tree_util.keystr(path)} has shape {np.shape(b)}, this run "
                f"expects {np.shape(a)}"
            )
    return got["params"], got["opt_state"]


def _check_saved_shapes(ckpt_dir: Path, step: int, like: dict) -> None:
    """Refuse a checkpoint whose arrays have other shapes than `like`'s, from its metadata,
    before orbax reads it (a restore that fails half-way leaves its reads unawaited, which
    Python reports as ignored exceptions). Leaves are matched by path (names and indices);
    anything unreadable is left to the restore, which reports it."""
    import orbax.checkpoint as ocp

    def named(tree: Any) -> dict[tuple, tuple]:
        def part(k: Any) -> str:
            for attr in ("key", "idx", "name"):
                if hasattr(k, attr):
                    return str(getattr(k, attr))
            return str(k)

        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {tuple(part(k) for k in path): tuple(np.shape(x)) for path, x in leaves}

    try:
        with ocp.StandardCheckpointer() as ck:
            md = ck.metadata(ckpt_dir.absolute() / str(step) / "default")
        saved = named(getattr(md, "item_metadata", md))
    except Exception:  # no or other metadata: the restore itself decides
        return
    for path, shape in sorted(named(like).items(), key=lambda kv: kv[0][0] != "params"):
        if path in saved and saved[path] != shape:
            raise CheckpointError(
                f"checkpoint {ckpt_dir} step {step}: {'/'.join(path)} has shape {saved[path]}, "
                f"this run expects {shape}"
            )


def exported_init(init_from: str | None, recipe: Recipe, target: Model) -> tuple[Any, dict] | None:
    """(config, float32 params) of the exported drafter `init_from` names (a directory in the
    recipe's export format, e.g. a run's `drafter/`, or a bundled drafter's name such as
    "smollm2-135m-eagle3"); None when it names a run directory or nothing."""
    if not init_from:
        return None
    from specjax.drafters.bundled import BUNDLED_DRAFTERS, bundled_path

    path = Path(init_from)
    if not path.exists() and init_from in BUNDLED_DRAFTERS:
        path = bundled_path(init_from)
    if (path / "checkpoints").is_dir() or not (path / "config.json").is_file():
        return None  # a run directory, or nothing (`_warm_start` says so)
    return recipe.load_export(path, target)


def _warm_start(
    src: Path,
    params: dict,
    opt_state: optax.OptState,
    recipe: Recipe,
    dcfg: Any,
    exported: tuple[Any, dict] | None,
) -> dict:
    """The params of run `src`'s latest checkpoint, or of the exported drafter `exported`
    (`exported_init`: a run's checkpoints do not survive a new machine, its export does),
    checked against this run's drafter config and shapes and its untrained leaves (EAGLE-3's
    d2t: the same draft vocabulary, or the head would mean other tokens)."""
    if exported is not None:
        ecfg, got = _grown(*exported, dcfg, params)
        for theirs, ours in (
            (_flatten(dataclasses.asdict(ecfg)), _flatten(dataclasses.asdict(dcfg))),
            (_shapes(got), _shapes(params)),
        ):
            diff = [
                f"{k}: {theirs.get(k, 'absent')!r} there, {ours.get(k, 'absent')!r} here"
                for k in sorted(set(theirs) | set(ours))
                if theirs.get(k) != ours.get(k)
            ]
            if diff:
                raise CheckpointError(f"init_from {src}: another drafter ({'; '.join(diff)})")
    else:
        ckpt = src / "checkpoints"
        mgr = _manager(ckpt) if ckpt.is_dir() else None
        if mgr is None or mgr.latest_step() is None:
            if mgr is not None:
                mgr.close()
            from specjax.drafters.bundled import BUNDLED_DRAFTERS

            raise CheckpointError(
                f"init_from: no checkpoint in {ckpt} to start from (give a run directory, an "
                f"exported drafter or a bundled one: {', '.join(sorted(BUNDLED_DRAFTERS))})"
            )
        try:
            got, _ = _restore(mgr, int(mgr.latest_step()), params, opt_state, ckpt)
        finally:
            mgr.close()
    for k in recipe.frozen:
        if not np.array_equal(np.asarray(got[k]), np.asarray(params[k])):
            raise CheckpointError(
                f"init_from {src}: its {k!r} differs from this run's (another dataset or draft "
                f"vocabulary); start from a run over the same data"
            )
    return got


def _grown(ecfg: Any, got: dict, dcfg: Any, fresh: dict) -> tuple[Any, dict]:
    """An exported EAGLE drafter smaller than this run's, grown so that it drafts as before:
    deepened by this run's fresh added layers (identity at init: `eagle.init_params`) and
    widened (`_widened`); any other exported drafter as it is."""
    ecfg, got = _widened(ecfg, got, dcfg, fresh)
    depth = getattr(getattr(ecfg, "layer", None), "num_layers", None)
    want = getattr(getattr(dcfg, "layer", None), "num_layers", None)
    if depth is None or want is None or depth >= want:
        return ecfg, got
    layers = list(got.get("layers", ())) + list(fresh["layers"][depth - 1 :])
    deeper = dataclasses.replace(ecfg, layer=dataclasses.replace(ecfg.layer, num_layers=want))
    return deeper, dict(got, layers=layers)


def _widened(ecfg: Any, got: dict, dcfg: Any, fresh: dict) -> tuple[Any, dict]:
    """An exported EAGLE drafter whose MLP is narrower than this run's `intermediate_size`,
    with this run's fresh gate/up columns added and zero rows of `w_down` under them: the new
    units start silent (the drafter computes what it did) and the gradient reaches their
    `w_down` rows first. Only a one-layer drafter (its `layer`); deeper ones as they are."""
    have = getattr(getattr(ecfg, "layer", None), "intermediate_size", None)
    want = getattr(getattr(dcfg, "layer", None), "intermediate_size", None)
    if have is None or want is None or have >= want or "layers" in got:
        return ecfg, got
    old, new = got["layer"], fresh["layer"]
    gate, up = np.split(np.asarray(old["w_gate_up"]), 2, axis=1)  # [D, F] each: gate then up
    f_gate, f_up = np.split(np.asarray(new["w_gate_up"]), 2, axis=1)
    w_gate_up = np.concatenate([gate, f_gate[:, have:], up, f_up[:, have:]], axis=1)
    down = np.asarray(old["w_down"])
    w_down = np.concatenate([down, np.zeros((want - have, down.shape[1]), down.dtype)], axis=0)
    layer = dict(old, w_gate_up=jnp.asarray(w_gate_up), w_down=jnp.asarray(w_down))
    wider = dataclasses.replace(ecfg, layer=dataclasses.replace(ecfg.layer, intermediate_size=want))
    return wider, dict(got, layer=layer)


def _shapes(tree: Any) -> dict[str, tuple]:
    """{leaf path: shape} of a pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.shape(x) for p, x in leaves}


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: a mismatch then names the one field that differs."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_run_config(out: Path, record: dict) -> None:
    """A run directory belongs to one configuration: refuse to resume another one into it."""
    f = out / "run.json"
    record = json.loads(json.dumps(record))  # tuples -> lists, as the saved file has them
    if f.exists():
        old = json.loads(f.read_text())
        # A run saved before a TrainConfig field existed ran with that field's default.
        known = _flatten({"train": json.loads(json.dumps(dataclasses.asdict(TrainConfig())))})
        old, new = _flatten(old), _flatten(record)
        old.update({k: known[k] for k in new.keys() - old.keys() if k in known})
        diff = {
            k: (old.get(k), new.get(k))
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        }
        if diff:
            raise CheckpointError(
                f"{out} holds a run with a different configuration; differing "
                f"(saved, requested): {diff}. Use a new --out directory."
            )
    else:
        f.write_text(json.dumps(record, indent=1, sort_keys=True))


# ----------------------------------------------------------------------------- training


def train(
    target: Model,
    tc: TrainConfig,
    dataset_dir: StrPath,
    out_dir: StrPath,
    *,
    heldout_prompts: Sequence[str | Sequence[int]] = (),
    progress: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
    features_dir: StrPath | None = None,
) -> tuple[Any, dict, list[dict]]:
    """Train (or resume) a drafter of kind `tc.kind` -> (its config, params, history).

    `features_dir`: where the target's features are cached (default OUT/features; drafters
    of one target can share a cache: one holding more layers serves one reading fewer).

    `stop_after`: stop once this many steps are done in total (to simulate an interruption;
    the schedule still spans `tc.steps`). The drafter is exported to out_dir/drafter (in the
    recipe's format) when training completes."""
    from tqdm.auto import tqdm

    recipe = recipes.get(tc.kind)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens_all, mask_all = data_lib.read_dataset(dataset_dir)
    exported = exported_init(tc.init_from, recipe, target)
    dcfg = recipe.drafter_config(target, tc, tokens_all, mask_all, out, exported)
    _check_run_config(
        out,
        {
            "train": dataclasses.asdict(tc),
            "drafter": dcfg.to_dict(),
            "target": target.name,
            "dataset": str(Path(dataset_dir).absolute()),
            "rows": int(tokens_all.shape[0]),
        },
    )
    layers = recipe.feature_layers(dcfg)
    feat_dir = cache_features(
        target,
        dataset_dir,
        features_dir or out / "features",
        layers,
        dtype=tc.feature_dtype,
        progress=progress,
    )
    store = FeatureStore(dataset_dir, feat_dir, layers)
    params = recipe.init_params(tc, dcfg, out)
    optimizer, sched = make_optimizer(tc)
    opt_state = optimizer.init({k: v for k, v in params.items() if k not in recipe.frozen})
    mgr = _manager(out / "checkpoints")
    try:  # closed on every exit: a failed restore must not leave its threads running
        start = 0
        if tc.init_from and mgr.latest_step() is None:
            params = _warm_start(Path(tc.init_from), params, opt_state, recipe, dcfg, exported)
            log(f"started from the params of {tc.init_from}")
        if mgr.latest_step() is not None:
            start = int(mgr.latest_step())
            params, opt_state = _restore(mgr, start, params, opt_state, out / "checkpoints")
            log(f"resumed from step {start} ({out / 'checkpoints'})")
        history = _read_history(out, start)
        shared = {k: target.params[k] for k in ("embed", "lm_head") if k in target.params}
        step_fn = make_step(recipe.loss_fn(tc, dcfg, target.config), optimizer, recipe.frozen)
        end = tc.steps if stop_after is None else min(tc.steps, stop_after)
        bar = tqdm(total=tc.steps, initial=start, desc=f"train {tc.kind}", disable=not progress)
        t0, seen = time.perf_counter(), 0
        batches = data_lib.iterate_batches(store.rows, tc.batch, tc.seed, start)
        for step, idx in batches:
            if step >= end:
                break
            inputs, n_tokens = recipe.step_inputs(tc, dcfg, store.batch(idx), step)
            seen += n_tokens
            params, opt_state, loss, metrics = step_fn(
                params, opt_state, shared, *map(jnp.asarray, inputs)
            )
            done = step + 1
            if done % tc.log_every == 0 or done == end:
                acc = np.asarray(metrics["acc"], np.float64).round(3).tolist()
                rec = {
                    "step": done,
                    "loss": float(loss),
                    "acc": acc,
                    "lr": float(sched(step)),
                    "tok_per_s": seen / (time.perf_counter() - t0),
                }
                if "ce" in metrics:
                    rec["ce"] = np.asarray(metrics["ce"], np.float64).round(4).tolist()
                history.append(rec)
                _append_history(out, rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=acc, tok_s=f"{rec['tok_per_s']:.0f}")
            if tc.eval_every and done % tc.eval_every == 0 and heldout_prompts:
                _log_tau(target, recipe, dcfg, params, heldout_prompts, tc, done, out, history, log)
            if done % tc.save_every == 0 or done == end:
                _save(mgr, done, params, opt_state)
            bar.update(1)
        bar.close()
        if end == tc.steps:
            if heldout_prompts and (not tc.eval_every or tc.steps % tc.eval_every):
                _log_tau(
                    target, recipe, dcfg, params, heldout_prompts, tc, tc.steps, out, history, log
                )
            recipe.export(out / "drafter", dcfg, jax.device_get(params), target.config)
        return dcfg, params, history
    finally:
        mgr.close()


def _read_history(out: Path, upto: int) -> list:
    f = out / "history.jsonl"
    if not f.exists():
        return []
    recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    keep = [r for r in recs if r["step"] <= upto]
    f.write_text("".join(json.dumps(r) + "\n" for r in keep))  # drop steps after the checkpoint
    return keep


def _append_history(out: Path, rec: dict) -> None:
    with open(out / "history.jsonl", "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def evaluate_tau(
    target: Model,
    drafter: Drafter,
    prompts: Sequence[str | Sequence[int]],
    *,
    new_tokens: int = 64,
) -> float:
    """Greedy tau of `drafter` (a `specjax.drafters.Drafter`) on `prompts` (batch 1 each, as
    Spec-Bench; a prompt may be a {"prompt", "images"} record for a vision-language target):
    tokens emitted after the first per target verify forward. A trained drafter:
    `recipes.get(kind).eval_drafter(cfg, params)`."""
    emitted, forwards = tau_counts(target, drafter, prompts, new_tokens=new_tokens)
    return emitted / max(forwards, 1)


def tau_counts(
    target: Model,
    drafter: Drafter,
    prompts: Sequence[str | Sequence[int]],
    *,
    new_tokens: int = 64,
) -> tuple[int, int]:
    """`evaluate_tau`'s counts -> (tokens emitted after the first, target verify forwards), so
    that several prompt sets (categories) pool into one tau."""
    from specjax.api import generate

    fwd = emitted = 0
    for p in prompts:
        if isinstance(p, dict):  # a prompt with its images (a vision-language target)
            o = generate(
                target,
                [p["prompt"]],
                images=[p.get("images") or []],
                max_new_tokens=new_tokens,
                drafter=drafter,
            )
        else:
            o = generate(target, [p], max_new_tokens=new_tokens, drafter=drafter)
        fwd += sum(o.stats["target_forwards"]) - 1
        emitted += o.lengths[0] - 1
    return emitted, fwd


def _log_tau(
    target: Model,
    recipe: Recipe,
    dcfg: Any,
    params: dict,
    prompts: Sequence[str | Sequence[int]],
    tc: TrainConfig,
    step: int,
    out: Path,
    history: list[dict],
    log: Callable[[str], None],
) -> None:
    drafter = recipe.eval_drafter(dcfg, jax.device_get(params))
    tau = evaluate_tau(target, drafter, prompts[: tc.eval_prompts], new_tokens=tc.eval_new_tokens)
    rec = {"step": step, "tau": tau}
    history.append(rec)
    _append_history(out, rec)
    log(f"step {step}: held-out tau {tau:.2f}")
