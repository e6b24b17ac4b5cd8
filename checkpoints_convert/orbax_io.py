"""Converted checkpoints on disk: orbax params + our config JSON + the HF tokenizer files.

Layout of a converted checkpoint directory DST:
    DST/specjax_config.json   ModelConfig as JSON (plus the format version)
    DST/params/               orbax PyTree checkpoint of the param dict
    DST/tokenizer/            tokenizer.save_pretrained output (chat template included)
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np

from specjax.models.config import ModelConfig

FORMAT_VERSION = 1
CONFIG_FILE = "specjax_config.json"


def is_converted_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_converted(dst: str, params: dict, cfg: ModelConfig, tokenizer=None) -> str:
    import orbax.checkpoint as ocp

    dst = os.path.abspath(dst)
    tmp = dst + ".partial"
    # Write next to the target and rename at the end, so an interrupted save never leaves a
    # directory that looks complete.
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(tmp, "params"), jax.tree.map(np.asarray, params))
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "config": cfg.to_dict()}, f, indent=1)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def load_converted(path: str):
    """-> (params as numpy, ModelConfig, tokenizer or None)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    with open(os.path.join(path, CONFIG_FILE)) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path!r} has checkpoint format {meta.get('format_version')!r}; this "
                         f"specjax reads format {FORMAT_VERSION}: convert the model again")
    cfg = ModelConfig.from_dict(meta["config"])
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, "params"))
    params = jax.tree.map(np.asarray, params)
    from checkpoints_convert.hf import expected_shapes, CheckpointMismatch

    flat = {"/".join(str(getattr(k, "key", k)) for k in kp): v.shape
            for kp, v in jax.tree_util.tree_leaves_with_path(params)}
    if flat != expected_shapes(cfg):
        raise CheckpointMismatch(f"converted checkpoint {path!r} does not match its config: "
                                 f"{sorted(set(flat.items()) ^ set(expected_shapes(cfg).items()))[:6]}")
    tok = None
    tok_dir = os.path.join(path, "tokenizer")
    if os.path.isdir(tok_dir):
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    return params, cfg, tok
