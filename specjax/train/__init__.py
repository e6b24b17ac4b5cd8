"""Drafter training with optax (see `trainer` for the pipeline, `recipes` for what each drafter
kind brings: EAGLE-1, EAGLE-3, Medusa; `losses` for the EAGLE objective, `data` for the
self-distilled dataset, `features` for the target-feature cache). Entry point: `run_training`,
or `specjax train-drafter` on the command line."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specjax.train import data, recipes
from specjax.train.trainer import CheckpointError, TrainConfig, evaluate_tau, train

if TYPE_CHECKING:
    from specjax.model import Model
    from specjax.paths import StrPath

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "train"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...] = data.DEFAULT_SOURCES
    prompts: int = 1024  # training prompts
    heldout: int = 64  # held-out prompts (tau evaluation), disjoint from the training ones
    responses: str = "self"  # self-distillation, or "given" answers
    # Further prompts (after the training and held-out ones in the shuffle) trained on with
    # their given answers, teacher-forced: cheap extra data (no generation), still labelled by
    # the target's own distributions.
    given_prompts: int = 0
    # Prompts per source in the pool the run draws from, e.g. {"magpie": 3000, "gsm8k": 1000}
    # (None: every prompt of `sources`). It sets the share of each kind of request.
    mix: dict | None = None
    # Recipes (names or YAML paths) whose prompts, trained on or held out, this one leaves out
    # of its pool: a stage on new data repeats no earlier stage's prompt, and every earlier
    # stage's held-out prompts stay unseen (so their tau still measures generalisation).
    exclude_recipes: tuple[str, ...] = ()
    seq_len: int = 384
    max_new_tokens: int = 256
    # Prompts answered at a time (self-distillation; each with its own room for the answer).
    # 64 answered stage 4's prompts 1.17x faster than 16 on the 2-core VM (README).
    gen_batch: int = 64
    seed: int = 0
    # A vision-language target's prompts: a JSONL file of {"prompt": str, "images": [path]}
    # (paths relative to the file); replaces `sources` / `mix` (see data.load_image_prompts)
    image_prompts: str | None = None


def config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    q = CONFIG_DIR / f"{name_or_path}.yaml"
    if q.exists():
        return q
    names = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise ValueError(
        f"training config {name_or_path!r} not found; give a YAML path or one of {names}"
    )


def load_configs(
    name_or_path: str, train_overrides: dict | None = None, data_overrides: dict | None = None
) -> tuple[TrainConfig, DataConfig]:
    """-> (TrainConfig, DataConfig) from a YAML file (its `data:` section is the DataConfig)."""
    import yaml

    path = config_path(name_or_path)
    raw = yaml.safe_load(path.read_text()) or {}
    d = dict(raw.get("data") or {})
    known = {f.name for f in dataclasses.fields(DataConfig)}
    bad = sorted(set(d) - known)
    if bad:
        raise ValueError(f"unknown data keys {bad} in {path}; valid: {sorted(known)}")
    d.update({k: v for k, v in (data_overrides or {}).items() if v is not None})
    for key in ("sources", "exclude_recipes"):
        if key in d:
            d[key] = tuple(d[key])
    return TrainConfig.from_yaml(path, **(train_overrides or {})), DataConfig(**d)


def select_prompts(dc: DataConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """A recipe's prompts -> (self-distilled training prompts, held-out prompts, prompts
    trained on with their given answers), by the recipe's fixed shuffle."""
    if dc.image_prompts and dc.exclude_recipes:
        raise ValueError(
            "exclude_recipes applies to text prompts (mix or sources), not to image_prompts: "
            f"remove one of image_prompts={dc.image_prompts!r}, "
            f"exclude_recipes={list(dc.exclude_recipes)}"
        )
    seen = recipe_prompts(dc.exclude_recipes)
    if dc.image_prompts:
        prompts = data.load_image_prompts(dc.image_prompts)
    elif dc.mix:
        prompts = data.mix_prompts(dc.mix, dc.seed, exclude=seen)
    else:
        prompts = [p for p in data.load_prompts(dc.sources) if p["prompt"] not in seen]
    train_p, rest = data.split_prompts(prompts, dc.prompts, dc.heldout + dc.given_prompts, dc.seed)
    held, extra = rest[: dc.heldout], rest[dc.heldout :]
    return train_p, held, [p for p in extra if p["answer"]]  # Magpie prompts have no answer


def recipe_prompts(recipes: tuple[str, ...]) -> set[str]:
    """Every prompt (training and held-out) the named recipes select."""
    out: set[str] = set()
    for name in recipes:
        train_p, held, extra = select_prompts(load_configs(name)[1])
        out.update(p["prompt"] for p in train_p + held + extra)
    return out


def run_training(
    target: Model,
    config: str,
    out_dir: StrPath,
    *,
    dataset: StrPath | None = None,
    features: StrPath | None = None,
    train_overrides: dict | None = None,
    data_overrides: dict | None = None,
    progress: bool = True,
) -> tuple[Any, dict, list[dict]]:
    """Build (or reuse) the dataset, then train; everything lands in out_dir (the dataset and
    the feature cache too, unless `dataset` / `features` name existing ones to share).
    -> `train`'s (drafter config, params, history)."""
    tc, dc = load_configs(config, train_overrides, data_overrides)
    out = Path(out_dir)
    train_p, held, extra = select_prompts(dc)
    ds = Path(dataset) if dataset else out / "data"
    if dataset is None:  # build_dataset resumes after the shards that already exist
        data.build_dataset(
            target,
            train_p,
            ds,
            seq_len=dc.seq_len,
            responses=dc.responses,
            max_new_tokens=dc.max_new_tokens,
            batch=dc.gen_batch,
            shard_rows=4 * dc.gen_batch,
            progress=progress,
        )
        if extra:
            data.build_dataset(
                target,
                extra,
                ds,
                seq_len=dc.seq_len,
                responses="given",
                batch=dc.gen_batch,
                shard_rows=4 * dc.gen_batch,
                progress=progress,
            )
    return train(
        target,
        tc,
        ds,
        out,
        # prompts with images stay records: the held-out tau runs them with their images
        heldout_prompts=[p if p.get("images") else p["prompt"] for p in held],
        progress=progress,
        features_dir=features,
    )


__all__ = [
    "TrainConfig",
    "DataConfig",
    "train",
    "run_training",
    "load_configs",
    "evaluate_tau",
    "CheckpointError",
    "data",
    "recipes",
]
