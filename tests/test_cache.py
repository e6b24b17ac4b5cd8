"""Nothing lost, nothing silently wrong (issue 17): `convert` never replaces what it did not
create, converted checkpoints carry checksums checked at load, the named-model cache heals
itself and is safe when several processes fill it at once.

Every test that damages or locks a cache points SPECJAX_CACHE at a tmp dir. The damaged-cache
test uses the real SmolLM2 checkpoint (copied from the session's cache); the concurrency test a
tiny model behind the same cache code (the real conversion takes ~30 s per process here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import specjax
from checkpoints_convert import DamagedCheckpoint, load_converted, save_converted
from checkpoints_convert.orbax_io import CONFIG_FILE
from specjax import cli
from specjax import model as model_lib

from conftest import byte_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(make_hf_model):
    tok = byte_bpe(["the cat sat on the mat. " * 4], size=280)
    hf = make_hf_model("llama", seed=7, vocab_size=len(tok), num_hidden_layers=1)
    return specjax.model_from_hf(hf, tokenizer=tok, name="tiny")


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory, make_hf_model):
    tok = byte_bpe(["the cat sat on the mat. " * 4], size=280)
    hf = make_hf_model("llama", seed=7, vocab_size=len(tok), num_hidden_layers=1)
    path = str(tmp_path_factory.mktemp("hf") / "tiny")
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tiny, tmp_path_factory):
    return save_converted(
        str(tmp_path_factory.mktemp("ck") / "tiny"), tiny.params, tiny.config, tiny.tokenizer
    )


def _biggest_file(root: str) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return max(files, key=os.path.getsize)


def _flip(path: str, offset=None) -> None:
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(size // 2 if offset is None else offset)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


# ----------------------------------------------------------------------------- 1. convert


def test_convert_keeps_what_it_did_not_create(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    """Finding 1: a folder of user files, the current folder, the source itself and a plain
    file are refused before the model loads; nothing is deleted, no partial is left."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    for dst in (str(user), tiny_hf_dir):
        with pytest.raises(SystemExit, match="refusing|holds the source"):
            cli.main(["convert", tiny_hf_dir, dst])
    assert (user / "notes.txt").read_text() == "keep me"
    assert os.path.isfile(os.path.join(tiny_hf_dir, "config.json"))
    monkeypatch.chdir(user)
    with pytest.raises(SystemExit, match="not a specjax checkpoint"):
        cli.main(["convert", tiny_hf_dir, "."])
    with pytest.raises(SystemExit, match="holds the source"):  # DST is a parent of SRC
        cli.main(["convert", tiny_hf_dir, os.path.dirname(tiny_hf_dir)])
    afile = tmp_path / "model.bin"
    afile.write_bytes(b"x" * 10)
    with pytest.raises(SystemExit, match="not a directory"):
        cli.main(["convert", tiny_hf_dir, str(afile)])
    assert afile.read_bytes() == b"x" * 10
    assert sorted(os.listdir(tmp_path)) == ["mine", "model.bin"]  # no DST.partial anywhere
    assert os.listdir(user) == ["notes.txt"]

    out = str(tmp_path / "ck")
    cli.main(["convert", tiny_hf_dir, out])
    with pytest.raises(SystemExit, match="--overwrite"):
        cli.main(["convert", tiny_hf_dir, out])
    with pytest.raises(SystemExit, match="holds the source"):  # convert D D
        cli.main(["convert", out, out, "--overwrite"])
    cli.main(["convert", tiny_hf_dir, out, "--overwrite"])
    assert specjax.load_model(out).config == specjax.load_model(tiny_hf_dir).config
    assert sorted(os.listdir(tmp_path)) == ["ck", "mine", "model.bin"]


def test_failed_save_leaves_nothing(tiny, tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_converted(str(tmp_path / "out"), tiny.params, tiny.config, BrokenTokenizer())
    assert os.listdir(tmp_path) == []


def test_stale_partials_are_removed(tiny, tmp_path):
    """A partial of a killed process (dead pid) and an old-style DST.partial are cleaned up; a
    live writer's partial is left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f"out.partial-{dead.pid}", "out.partial", f"out.partial-{os.getppid()}"):
        (tmp_path / name).mkdir()
    save_converted(str(tmp_path / "out"), tiny.params, tiny.config)
    assert sorted(os.listdir(tmp_path)) == ["out", f"out.partial-{os.getppid()}"]


# ------------------------------------------------------------------- 2-3. checksums at load


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "tokenizer", "config"])
def test_damaged_user_checkpoint_is_named(tiny_ckpt, tmp_path, damage):
    """Findings 2-3 on a user path: each kind of damage is an error naming the file and what
    to do, never a raw orbax error or a silent load."""
    bad = str(tmp_path / "bad")
    shutil.copytree(tiny_ckpt, bad)
    data = _biggest_file(os.path.join(bad, "params"))
    rel = os.path.relpath(data, bad)
    if damage == "flip":
        _flip(data)
    elif damage == "truncate":
        os.truncate(data, os.path.getsize(data) // 2)
    elif damage == "delete":
        os.remove(data)
    elif damage == "tokenizer":
        shutil.rmtree(os.path.join(bad, "tokenizer"))
        rel = "tokenizer/"
    else:  # a digit of the config changed: structurally valid, so only the checksum sees it
        cfg = os.path.join(bad, CONFIG_FILE)
        meta = json.load(open(cfg))
        meta["config"]["rms_norm_eps"] *= 10
        json.dump(meta, open(cfg, "w"))
        rel = CONFIG_FILE
    with pytest.raises(DamagedCheckpoint) as err:
        specjax.load_model(bad)
    assert rel in str(err.value) and "--overwrite" in str(err.value)


def test_checkpoint_records_every_file(tiny_ckpt):
    meta = json.load(open(os.path.join(tiny_ckpt, CONFIG_FILE)))
    files = {
        os.path.relpath(os.path.join(d, f), tiny_ckpt)
        for d, _, fs in os.walk(tiny_ckpt)
        for f in fs
    } - {CONFIG_FILE}
    assert set(meta["files"]) == files and any(f.startswith("tokenizer/") for f in files)


# ------------------------------------------------------------------ 3. the cache heals itself


def test_named_cache_is_reconverted_when_damaged(tiny, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
    calls = []

    def convert(want_tokenizer):
        calls.append(want_tokenizer)
        return tiny.params, tiny.config, tiny.tokenizer if want_tokenizer else None

    params, cfg, tok = model_lib.load_cached("tiny", convert)
    assert calls == [True] and "first use" in capfd.readouterr().err
    cached = os.path.join(tmp_path, "models", "tiny")
    _flip(_biggest_file(os.path.join(cached, "params")))
    again, _, tok2 = model_lib.load_cached("tiny", convert)
    err = capfd.readouterr().err
    assert "converting it again" in err and "does not match its checksum" in err
    assert calls == [True, False]  # the intact tokenizer was kept, only the params remade
    assert tok2.get_vocab() == tiny.tokenizer.get_vocab()
    for a, b in zip(*(jax_leaves(p) for p in (params, again))):
        np.testing.assert_array_equal(a, b)
    shutil.rmtree(os.path.join(cached, "tokenizer"))
    model_lib.load_cached("tiny", convert)
    assert calls == [True, False, True]
    model_lib.load_cached("tiny", convert)  # intact: no conversion, nothing said
    assert calls == [True, False, True] and capfd.readouterr().err.count("converting") == 1


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


# ---------------------------------------------------------------------- 4. concurrency

_WORKER = textwrap.dedent("""
    import sys, time, zlib
    sys.path.insert(0, {root!r})
    import numpy as np
    import specjax
    from checkpoints_convert import load_converted
    from specjax import model as model_lib

    def convert(want_tokenizer):
        time.sleep(1.0)  # a slow conversion: the others must wait, not write alongside it
        return load_converted({source!r})  # the tiny model (no torch import: fast workers)

    params, cfg, _ = model_lib.load_cached("tiny", convert)
    model = specjax.Model(params=params, config=cfg).with_layout("unrolled")
    print("OUT", zlib.crc32(np.asarray(model.logits([1, 2, 3])).tobytes()))
""")


def test_processes_starting_at_once_share_one_cache(tiny, tmp_path):
    """Finding 4: several processes on one empty cache all succeed with the same output; one
    of them converts, the cache ends intact, no partial is left behind."""
    cache = tmp_path / "cache"
    stale = cache / "models" / "tiny.partial-999999999"  # left by a killed process
    stale.mkdir(parents=True)
    source = save_converted(str(tmp_path / "source"), tiny.params, tiny.config)
    script = _WORKER.format(root=ROOT, source=source)
    env = dict(os.environ, SPECJAX_CACHE=str(cache), JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    outs = {next(l for l in out.splitlines() if l.startswith("OUT")) for out, _ in results}
    assert len(outs) == 1  # the same logits everywhere
    assert sum("first use" in err for _, err in results) == 1
    assert sorted(os.listdir(cache / "models")) == [".tiny.lock", "tiny"]
    load_converted(str(cache / "models" / "tiny"))  # checksums and shapes hold


# ------------------------------------------------- 2. the real model: same output after healing


def test_damaged_smollm2_cache_heals_with_the_same_output(tmp_path, monkeypatch, capfd):
    """Findings 2-3 on the real default model: one byte flipped in a data file of a cached
    SmolLM2 checkpoint (a copy of the session's, in a tmp cache) is detected at load, the
    params are converted again from the GGUF (the intact tokenizer is kept: the cheapest honest
    repair), and the model's output (its logits over a chat prompt, bit for bit: a stronger check
    than greedy tokens, and one jitted forward instead of compiling the decode loop) is that of
    the undamaged checkpoint."""
    good = specjax.load_model("smollm2-135m")  # the session's cache (converted if needed)
    ids = good.encode("What is the capital of France?")
    want = np.asarray(good.logits(ids))
    source = os.path.join(model_lib.cache_root(), "models", "smollm2-135m")
    gguf = model_lib.find_gguf("smollm2-135m")
    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
    cached = tmp_path / "models" / "smollm2-135m"
    shutil.copytree(source, cached)
    (tmp_path / "downloads" / "smollm2-135m").mkdir(parents=True)
    os.symlink(gguf, tmp_path / "downloads" / "smollm2-135m" / os.path.basename(gguf))
    capfd.readouterr()
    _flip(_biggest_file(str(cached / "params")))
    healed = specjax.load_model("smollm2-135m")
    assert "cannot be used" in capfd.readouterr().err
    np.testing.assert_array_equal(np.asarray(healed.logits(ids)), want)
    load_converted(str(cached))  # the cache is whole again
