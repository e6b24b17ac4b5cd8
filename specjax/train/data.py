"""Drafter training data: prompts from ../shared/data/train (never the eval files), answered by
the target itself (self-distillation, EAGLE's recipe) or by the given answers (teacher forcing).

A dataset is a directory of `.npz` shards, each with `tokens` [n, S] int32 (chat-templated prompt
then response, right-padded) and `loss_mask` [n, S] bool (True on response tokens). Shards are
written as they are produced, so an interrupted run keeps what it finished and resumes after it.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from specjax.paths import DATA_ENV, data_file

if TYPE_CHECKING:
    from specjax.model import Model
    from specjax.paths import StrPath

DEFAULT_SOURCES = ("gsm8k", "codealpaca")
# Instructions SmolLM2-135M-Instruct wrote itself (`specjax.train.magpie`), shipped with the
# package: they have no given answers, so they are only used with self-distilled responses.
# "magpie_b": a second set sampled with another seed, repeating none of the first
# (`specjax magpie --seed 1 --exclude .../magpie_smollm2.jsonl.gz`); "magpie_c" a third (seed 2,
# batches of 64, excluding both).
PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
MAGPIE_FILES = {
    "magpie": PROMPT_DIR / "magpie_smollm2.jsonl.gz",
    "magpie_b": PROMPT_DIR / "magpie_smollm2_b.jsonl.gz",
    "magpie_c": PROMPT_DIR / "magpie_smollm2_c.jsonl.gz",
}
SOURCES = ("gsm8k", "codealpaca", *MAGPIE_FILES)


def default_data_dir() -> Path:
    """$SPECJAX_DATA/train, else ../shared/data/train (see `specjax.paths.data_file`)."""
    found = data_file("train")
    if found is None:
        raise FileNotFoundError(
            f"training prompts not found: set ${DATA_ENV} to the data folder "
            f"holding train/gsm8k_train.jsonl and train/codealpaca.json"
        )
    return Path(found)


def load_prompts(
    sources: Sequence[str] = DEFAULT_SOURCES, data_dir: StrPath | None = None
) -> list[dict]:
    """-> [{"prompt": str, "answer": str, "source": str}] in file order, sources interleaved
    (so any prefix mixes them)."""
    bad = [s for s in sources if s not in SOURCES]
    if bad:
        raise ValueError(f"unknown training sources {bad}; valid: {list(SOURCES)}")
    if data_dir:
        data_dir = Path(data_dir)
    elif any(s not in MAGPIE_FILES for s in sources):
        data_dir = default_data_dir()
    per = []
    for s in sources:
        if s == "gsm8k":
            path = data_dir / "gsm8k_train.jsonl"
            rows = [json.loads(line) for line in _read(path).splitlines() if line.strip()]
            per.append(
                [{"prompt": r["question"], "answer": r["answer"], "source": s} for r in rows]
            )
        elif s in MAGPIE_FILES:
            from specjax.train.magpie import read_prompts

            if not MAGPIE_FILES[s].exists():
                raise FileNotFoundError(f"the Magpie prompt set {MAGPIE_FILES[s]} is missing")
            per.append(
                [{"prompt": t, "answer": "", "source": s} for t in read_prompts(MAGPIE_FILES[s])]
            )
        else:
            path = data_dir / "codealpaca.json"
            rows = json.loads(_read(path))
            per.append(
                [
                    {
                        "prompt": r["instruction"]
                        + (f"\n\n{r['input']}" if r.get("input") else ""),
                        "answer": r.get("output") or r.get("response", ""),
                        "source": s,
                    }
                    for r in rows
                ]
            )
    out = []
    for i in range(max(map(len, per))):
        out.extend(rows[i] for rows in per if i < len(rows))
    return out


def load_image_prompts(path: StrPath) -> list[dict]:
    """A JSONL file of {"prompt": str, "images": [image file, ...]} (paths relative to the
    file; the prompt holds one image placeholder per image) -> prompt records with the images
    opened (RGB), for a vision-language target."""
    from specjax.multimodal import open_images

    path = Path(path)
    out = []
    for i, line in enumerate(_read(path).splitlines()):
        if not line.strip():
            continue
        r = json.loads(line)
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("images", []), list):
            raise ValueError(
                f"{path} line {i + 1}: expected {{'prompt': str, 'images': [paths]}}, got "
                f"{sorted(r)}"
            )
        files = [str(path.parent / f) for f in r.get("images", [])]
        out.append(
            {"prompt": r["prompt"], "answer": "", "source": "images", "images": open_images(files)}
        )
    return out


def _read(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(
            f"training data file {path} not found (set SPECJAX_DATA to the "
            f"folder holding train/gsm8k_train.jsonl, train/codealpaca.json)"
        )
    return path.read_text()


def mix_prompts(
    mix: dict[str, int],
    seed: int = 0,
    data_dir: StrPath | None = None,
    exclude: Collection[str] = frozenset(),
) -> list[dict]:
    """A pool with `mix[source]` prompts of each source (a fixed shuffle of each, then its first
    n that are not in `exclude`), sources in `mix` order: how many of each a training run may
    draw on (`split_prompts` shuffles the pool). Without `exclude` the pool is what it was
    before `exclude` existed (the same shuffles)."""
    pool = []
    for i, (source, n) in enumerate(mix.items()):
        rows = load_prompts([source], data_dir)
        order = np.random.default_rng([seed, i]).permutation(len(rows))
        order = [j for j in order if rows[j]["prompt"] not in exclude]
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= len(order):
            left = f" ({len(rows) - len(order)} excluded)" if len(order) < len(rows) else ""
            raise ValueError(
                f"mix asks for {n!r} prompts of {source!r}; it has {len(order)}{left} "
                f"(use 1..{len(order)})"
            )
        pool.extend(rows[j] for j in order[:n])
    return pool


def split_prompts(prompts: list, n_train: int, n_heldout: int, seed: int = 0) -> tuple[list, list]:
    """A fixed shuffle, then the first n_train for training and the next n_heldout held out."""
    if n_train + n_heldout > len(prompts):
        raise ValueError(f"asked for {n_train} + {n_heldout} prompts, only {len(prompts)} exist")
    order = np.random.default_rng(seed).permutation(len(prompts))
    pick = [prompts[i] for i in order[: n_train + n_heldout]]
    return pick[:n_train], pick[n_train:]


def _pack(rows: list, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """rows: [(prompt ids, response ids)] -> tokens [n, S], loss_mask [n, S] (truncated)."""
    tokens = np.zeros((len(rows), seq_len), np.int32)
    mask = np.zeros((len(rows), seq_len), bool)
    for i, (p, r) in enumerate(rows):
        ids = (list(p) + list(r))[:seq_len]
        tokens[i, : len(ids)] = ids
        mask[i, len(p) : len(ids)] = True
    return tokens, mask


def build_dataset(
    model: Model,
    prompts: list,
    out_dir: StrPath,
    *,
    seq_len: int = 384,
    responses: str = "self",
    max_new_tokens: int = 256,
    batch: int = 16,
    shard_rows: int = 64,
    progress: bool = True,
) -> Path:
    """Write `prompts` as a dataset of shards under out_dir (resuming after existing shards).

    responses="self": the target answers each prompt greedily (self-distillation);
    "given": the dataset's own answers, teacher-forced. Both kinds may share one directory
    (shards are named by kind) as long as they use the same seq_len. Prompts longer than
    seq_len - 16 tokens are skipped (they would leave nothing to learn).

    A vision-language target's prompts may carry images (`{"prompt": ..., "images": [...]}`,
    one placeholder per image): the shard then also holds the preprocessed `pixels` [N, C, H,
    W] and `image_row` [N] (each image's row), and `cache_features` puts their features at the
    placeholders."""
    from tqdm.auto import tqdm

    if responses not in ("self", "given"):
        raise ValueError(f"responses must be 'self' or 'given', got {responses!r}")
    if shard_rows % batch:
        raise ValueError(f"shard_rows ({shard_rows}) must be a multiple of batch ({batch})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoded = [model.encode(p["prompt"]) for p in prompts]
    images = [p.get("images") or [] for p in prompts]
    items = None
    if any(images):
        from specjax import multimodal

        items = multimodal.normalize_items(model, len(prompts), images, None)
        encoded = [
            multimodal.expand_placeholders(model, i, ids, items[i]) for i, ids in enumerate(encoded)
        ]
    keep = [i for i, ids in enumerate(encoded) if len(ids) <= seq_len - 16]
    if prompts and not keep:  # else the only error would be "no dataset shards" later
        raise ValueError(
            f"every one of the {len(prompts)} prompts is too long for seq_len "
            f"{seq_len}: a prompt may have at most seq_len - 16 = {seq_len - 16} "
            f"tokens (so that some response is left to learn); the shortest has "
            f"{min(map(len, encoded))}. Raise seq_len or use shorter prompts"
        )
    n_shards = -(-len(keep) // shard_rows)
    bar = tqdm(total=len(keep), desc=f"dataset ({responses} responses)", disable=not progress)
    for s in range(n_shards):
        path = out / f"shard_{responses}_{s:05d}.npz"
        idx = keep[s * shard_rows : (s + 1) * shard_rows]
        crc = _prompt_crcs([encoded[i] for i in idx])
        if path.exists():  # resume: the shard must hold these prompts, or rows would mix
            _check_shard(path, crc, shard_rows)
            bar.update(len(idx))
            continue
        # Each answer gets its own room (seq_len minus its prompt: per-row budgets), in batches
        # of similar prompt length (less prompt padding, and rows that finish together). The
        # shard keeps the prompts' order.
        answers = {}
        by_len = sorted(idx, key=lambda i: len(encoded[i]))
        for b in range(0, len(by_len), batch):
            chunk = by_len[b : b + batch]
            if responses == "self":
                room = [min(max_new_tokens, seq_len - len(encoded[i])) for i in chunk]
                res = model_generate(
                    model,
                    [encoded[i] for i in chunk],
                    room,
                    images=None if items is None else [images[i] for i in chunk],
                )
            else:
                res = [
                    model.tokenizer.encode(prompts[i]["answer"], add_special_tokens=False)
                    for i in chunk
                ]
            answers.update(zip(chunk, res))
            bar.update(len(chunk))
        rows = [(encoded[i], answers[i]) for i in idx]
        tokens, mask = _pack(rows, seq_len)
        extra = {}
        if items is not None:
            mine = [(r, it) for r, i in enumerate(idx) for it in items[i]]
            cfg = model.vlm_config.vision
            empty = np.zeros((0, cfg.num_channels, cfg.image_size, cfg.image_size), np.float32)
            extra["pixels"] = np.stack([it.pixels for _, it in mine]) if mine else empty
            extra["image_row"] = np.array([r for r, _ in mine], np.int32)
        tmp = out / f"partial_{path.name}"  # outside the shard_*.npz pattern
        np.savez(tmp, tokens=tokens, loss_mask=mask, prompt_crc=crc, **extra)
        os.replace(tmp, path)  # a shard is complete or absent
    bar.close()
    meta = {"rows": len(keep), "seq_len": seq_len, "responses": responses, "model": model.name}
    (out / f"dataset_{responses}.json").write_text(json.dumps(meta, indent=1))
    return out


def _prompt_crcs(prompts: list) -> np.ndarray:
    """CRC-32 of each prompt's token ids [n] uint32: what a shard says it was built from."""
    return np.array([zlib.crc32(np.asarray(p, np.int32).tobytes()) for p in prompts], np.uint32)


def _check_shard(path: Path, crc: np.ndarray, shard_rows: int) -> None:
    """Refuse to resume over a shard built from other prompts (another prompt list, seed or
    `shard_rows`, e.g. a changed `gen_batch`): its rows would silently stand in for these.
    Shards written before the CRCs were stored are checked by their row count only."""
    with np.load(path) as f:
        rows = f["tokens"].shape[0]
        old = f["prompt_crc"] if "prompt_crc" in f.files else None
    if rows == len(crc) and (old is None or np.array_equal(old, crc)):
        return
    what = f"{rows} rows" if rows != len(crc) else "rows of other prompts"
    raise ValueError(
        f"{path} holds {what}, but this run puts {len(crc)} prompts there (shard_rows "
        f"{shard_rows}): the directory was built from another prompt list or batch size. "
        "Resume with the settings that wrote it, or write to a new directory"
    )


def model_generate(
    model: Model, rows: list, max_new_tokens: int | list[int], images: list | None = None
) -> list:
    """Greedy responses of the target (token ids, EOS included when hit); `max_new_tokens`
    one budget for all rows or one per row."""
    from specjax.api import generate

    return generate(model, rows, max_new_tokens=max_new_tokens, chat=False, images=images).tokens


def read_dataset(path: StrPath) -> tuple[np.ndarray, np.ndarray]:
    """All shards -> (tokens [N, S], loss_mask [N, S])."""
    shards = sorted(Path(path).glob("shard_*.npz"))
    if not shards:
        raise FileNotFoundError(f"no dataset shards (shard_*.npz) in {path}")
    parts = [np.load(s) for s in shards]
    return (
        np.concatenate([p["tokens"] for p in parts]),
        np.concatenate([p["loss_mask"] for p in parts]),
    )


def iterate_batches(
    n_rows: int, batch: int, seed: int, start_step: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """Row indices per step: epochs of fixed-seed permutations. Step i's batch depends only on
    (seed, i), so a run resumed at step i sees exactly the batches it would have seen."""
    if n_rows < batch:
        raise ValueError(f"the dataset has {n_rows} rows, fewer than one batch of {batch}")
    per_epoch = n_rows // batch
    step = start_step
    while True:
        epoch, i = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
        yield step, perm[i * batch : (i + 1) * batch]
        step += 1


def draft_vocab(
    tokens: np.ndarray, mask: np.ndarray, size: int, vocab: int, always: Sequence[int] | None = None
) -> np.ndarray:
    """EAGLE-3's reduced draft vocabulary: the `size` most frequent response tokens (ties by id)
    plus `always` (e.g. EOS), as sorted target ids."""
    if not 0 < size <= vocab:
        raise ValueError(f"draft vocabulary size must be in 1..{vocab}, got {size}")
    counts = np.bincount(tokens[mask], minlength=vocab).astype(np.int64)
    forced = [int(t) for t in (always or ()) if 0 <= int(t) < vocab]
    counts[forced] = counts.max() + 1
    top = np.argsort(-counts, kind="stable")[:size]
    return np.sort(top).astype(np.int32)
