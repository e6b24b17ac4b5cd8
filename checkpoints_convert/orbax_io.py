"""Converted checkpoints on disk: orbax params + our config JSON + the HF tokenizer files.

Layout of a converted checkpoint directory DST:
    DST/specjax_config.json   ModelConfig as JSON, the format version, and checksums: the size
                              and CRC-32 of every other file, and a CRC-32 of the config itself
    DST/params/               orbax PyTree checkpoint of the param dict
    DST/tokenizer/            tokenizer.save_pretrained output (chat template included)

Checksums are checked at every load, so a damaged file is named instead of being read as
different weights. CRC-32 (zlib) rather than a cryptographic hash: it guards against disk and
copy damage, not against an attacker, and reads SmolLM2's 340 MB in ~0.2 s.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

import jax
import numpy as np

from specjax.models.config import ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT_VERSION = 2  # 2: fused wqkv / w_gate_up runtime layout (checksums were added within 2)
CONFIG_FILE = "specjax_config.json"
PARTIAL = ".partial-"  # DST.partial-PID: a save in progress (or left by a killed process)


class DamagedCheckpoint(ValueError):
    """A converted checkpoint on disk is incomplete, modified or unreadable."""


class MissingCheckpointFile(DamagedCheckpoint, FileNotFoundError):
    """A file or folder of a converted checkpoint is gone."""


def is_converted_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def converted_format(path: str) -> int | None:
    """The format version of a converted checkpoint directory (None if unreadable)."""
    try:
        return _read_meta(path).get("format_version")
    except DamagedCheckpoint:
        return None


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_checksums(root: str) -> dict:
    """{relative path: [size, crc32]} of every file under `root` except the config file."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel != CONFIG_FILE:
                out[rel] = [os.path.getsize(full), file_crc32(full)]
    return dict(sorted(out.items()))


def _meta_crc(meta: dict) -> int:
    """CRC-32 of everything in the config file but the CRC itself (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "meta_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True).encode())


def damaged_files(path: str, checksums: dict) -> list[str]:
    """Problems with the files of a checkpoint, each naming the file ([] when all match)."""
    problems = []
    for rel, (size, crc) in checksums.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(full) != size:
            problems.append(f"{rel} has {os.path.getsize(full)} bytes, {size} were written")
        elif file_crc32(full) != crc:
            problems.append(f"{rel} does not match its checksum (modified or damaged)")
    return problems


def _damaged(
    path: str, what: str, cls: type[DamagedCheckpoint] = DamagedCheckpoint
) -> DamagedCheckpoint:
    return cls(
        f"converted checkpoint {path!r}: {what}. Convert the model again "
        f"(specjax convert SRC {path} --overwrite)"
    )


def _read_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise _damaged(path, f"cannot read {CONFIG_FILE} ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise _damaged(path, f"{CONFIG_FILE} does not hold a JSON object")
    return meta


# ----------------------------------------------------------------------------- destinations


def check_destination(dst: str, overwrite: bool = False, sources: Iterable[str] = ()) -> None:
    """Refuse a destination whose replacement would lose anything the user did not ask to lose:
    a file, a folder that is not a specjax checkpoint (unless empty), a checkpoint without
    `overwrite`, or a folder holding (or being) one of `sources`."""
    dst = os.path.realpath(dst)
    for src in sources:
        src = os.path.realpath(src)
        if src == dst or src.startswith(dst.rstrip(os.sep) + os.sep):
            raise FileExistsError(
                f"destination {dst!r} holds the source {src!r}: writing there "
                f"would delete the source; choose another destination"
            )
    if not os.path.lexists(dst):
        return
    if not os.path.isdir(dst) or os.path.islink(dst):
        raise FileExistsError(
            f"destination {dst!r} exists and is not a directory: refusing to "
            f"replace it; choose a new path"
        )
    if not os.listdir(dst):
        return
    if not is_converted_dir(dst):
        raise FileExistsError(
            f"destination {dst!r} exists and is not a specjax checkpoint: "
            f"refusing to replace its files; choose a new path"
        )
    if not overwrite:
        raise FileExistsError(
            f"destination {dst!r} already holds a specjax checkpoint: pass "
            f"overwrite=True (CLI: --overwrite) to replace it"
        )


def remove_stale_partials(dst: str) -> None:
    """Delete DST.partial-PID folders whose process is gone (killed during a save), and the
    DST.partial of older versions. Live writers' folders are left alone."""
    parent, base = os.path.split(os.path.abspath(dst))
    if not os.path.isdir(parent):
        return
    for name in os.listdir(parent):
        if name == base + ".partial":
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        elif name.startswith(base + PARTIAL):
            pid = name[len(base + PARTIAL) :]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _replace_dir(tmp: str, dst: str) -> None:
    """Move the finished `tmp` to `dst`; an old `dst` is moved aside first and deleted last, so
    a crash never leaves `dst` half deleted."""
    old = None
    if os.path.lexists(dst):
        old = f"{dst}.old-{os.getpid()}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def save_converted(
    dst: str,
    params: dict,
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Write a converted checkpoint to `dst` (see the module docstring). An existing `dst` is
    replaced only when it is an empty folder, or a specjax checkpoint and `overwrite`."""
    import orbax.checkpoint as ocp

    dst = os.path.abspath(dst)
    check_destination(dst, overwrite)
    remove_stale_partials(dst)
    # Write next to the target under a per-process name and rename at the end: an interrupted
    # save never leaves a directory that looks complete, and concurrent writers never share one.
    tmp = f"{dst}{PARTIAL}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        from specjax.models import family_of, stack_layers

        # Checkpoints keep layers stacked and matrices [in, out], whatever the layout in memory.
        params = family_of(cfg).orient(stack_layers(params), "in_out")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "params"), jax.tree.map(np.asarray, params))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        meta = {
            "format_version": FORMAT_VERSION,
            "config": cfg.to_dict(),
            "files": file_checksums(tmp),
        }
        meta["meta_crc32"] = _meta_crc(meta)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing behind
        raise
    return dst


def load_converted(path: str) -> tuple[dict, ModelConfig, PreTrainedTokenizerBase | None]:
    """-> (params as numpy, ModelConfig, tokenizer or None). Raises DamagedCheckpoint naming
    the file when anything on disk is missing, truncated or altered."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    meta = _read_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise DamagedCheckpoint(
            f"{path!r} has checkpoint format {meta.get('format_version')!r}; this specjax reads "
            f"format {FORMAT_VERSION}: convert the model again"
        )
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise DamagedCheckpoint(
            f"{os.path.join(path, CONFIG_FILE)!r} holds an invalid model "
            f"config ({type(e).__name__}: {e}): convert the model again"
        ) from e
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir):
        raise _damaged(path, "no params/ directory", MissingCheckpointFile)
    if not isinstance(meta.get("files"), dict):
        raise _damaged(
            path,
            f"{CONFIG_FILE} has no file checksums (written by a specjax from before checksums)",
        )
    problems = damaged_files(path, meta["files"])
    if problems:
        missing = any(p.endswith(" is missing") for p in problems)
        raise _damaged(
            path, "; ".join(problems), MissingCheckpointFile if missing else DamagedCheckpoint
        )
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(params_dir)
    params = jax.tree.map(np.asarray, params)
    _check_shapes(path, params, cfg)
    # Checked after the shapes, so that a config edited by hand gets the more telling error.
    if meta.get("meta_crc32") != _meta_crc(meta):
        raise _damaged(path, f"{CONFIG_FILE} does not match its checksum (modified or damaged)")
    tok = None
    tok_dir = os.path.join(path, "tokenizer")
    if os.path.isdir(tok_dir):
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    return params, cfg, tok


def _check_shapes(path: str, params: dict, cfg: ModelConfig) -> None:
    from checkpoints_convert.hf import CheckpointMismatch, expected_shapes

    flat = {
        "/".join(str(getattr(k, "key", k)) for k in kp): v.shape
        for kp, v in jax.tree_util.tree_leaves_with_path(params)
    }
    want = expected_shapes(cfg)
    if flat != want:
        problems = [
            f"{k}: checkpoint has shape {flat[k]}, config needs {want[k]}"
            for k in sorted(flat.keys() & want.keys())
            if flat[k] != want[k]
        ]
        problems += [
            f"{k}: needed by the config, absent from the checkpoint"
            for k in sorted(want.keys() - flat.keys())
        ]
        problems += [
            f"{k}: in the checkpoint, unknown to the config"
            for k in sorted(flat.keys() - want.keys())
        ]
        raise CheckpointMismatch(
            f"converted checkpoint {path!r} does not match its {CONFIG_FILE} "
            f"({len(problems)} problem(s)): {'; '.join(problems)}. Convert the model again."
        )
