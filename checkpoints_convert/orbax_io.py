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

FORMAT_VERSION = 2  # 2: fused wqkv / w_gate_up runtime layout
CONFIG_FILE = "specjax_config.json"


def is_converted_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def converted_format(path: str):
    """The format version of a converted checkpoint directory (None if unreadable)."""
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            return json.load(f).get("format_version")
    except (OSError, ValueError):
        return None


def save_converted(dst: str, params: dict, cfg: ModelConfig, tokenizer=None) -> str:
    import orbax.checkpoint as ocp

    dst = os.path.abspath(dst)
    tmp = dst + ".partial"
    # Write next to the target and rename at the end, so an interrupted save never leaves a
    # directory that looks complete.
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    from specjax.models.llama import stack_layers

    params = stack_layers(params)  # checkpoints keep layers stacked, whatever the runtime layout
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
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(path, CONFIG_FILE)!r} holds an invalid model config "
                         f"({type(e).__name__}: {e}): convert the model again") from e
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"converted checkpoint {path!r} has no params/ directory: "
                                f"convert the model again")
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(params_dir)
    params = jax.tree.map(np.asarray, params)
    from checkpoints_convert.hf import expected_shapes, CheckpointMismatch

    flat = {"/".join(str(getattr(k, "key", k)) for k in kp): v.shape
            for kp, v in jax.tree_util.tree_leaves_with_path(params)}
    want = expected_shapes(cfg)
    if flat != want:
        problems = [f"{k}: checkpoint has shape {flat[k]}, config needs {want[k]}"
                    for k in sorted(flat.keys() & want.keys()) if flat[k] != want[k]]
        problems += [f"{k}: needed by the config, absent from the checkpoint"
                     for k in sorted(want.keys() - flat.keys())]
        problems += [f"{k}: in the checkpoint, unknown to the config"
                     for k in sorted(flat.keys() - want.keys())]
        raise CheckpointMismatch(
            f"converted checkpoint {path!r} does not match its {CONFIG_FILE} "
            f"({len(problems)} problem(s)): {'; '.join(problems)}. Convert the model again.")
    tok = None
    tok_dir = os.path.join(path, "tokenizer")
    if os.path.isdir(tok_dir):
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    return params, cfg, tok
