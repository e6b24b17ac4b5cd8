"""EAGLE drafter training: the training-time-test forward equals incremental drafting, exact
resume from orbax checkpoints, clear errors for mismatched or corrupted checkpoints, data
handling, and that training actually teaches the drafter something."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.models import eagle as F
from specjax.models.cache import init_cache
from specjax.models.family import Hiddens
from specjax.models.llama import forward_hidden
from specjax.train import data, losses, trainer


def dataset_prompts() -> list[dict]:
    """The `dataset` fixture's 48 prompts (random, 4-11 tokens)."""
    rng = np.random.default_rng(0)
    return [{"prompt": rng.integers(0, 101, rng.integers(4, 12)).tolist()} for _ in range(48)]


@pytest.fixture(scope="module")
def dataset(target, tmp_path_factory):
    """48 self-distilled rows of the tiny target (random prompts of 4-11 tokens)."""
    prompts = dataset_prompts()
    d = tmp_path_factory.mktemp("ds")
    data.build_dataset(
        target,
        prompts,
        d,
        seq_len=40,
        responses="self",
        max_new_tokens=28,
        batch=16,
        shard_rows=16,
        progress=False,
    )
    return d, [p["prompt"] for p in prompts[:4]]


def small(**kw):
    base = dict(
        kind="eagle3",
        steps=6,
        batch=8,
        lr=3e-3,
        warmup=2,
        log_every=1,
        save_every=3,
        draft_vocab=64,
        ttt_steps=3,
    )
    base.update(kw)
    return trainer.TrainConfig(**base)


@pytest.mark.parametrize("version", [1, 3])
def test_ttt_steps_equal_incremental_drafting(target, version):
    """Step i of the training forward at row L + i - 1 is the i-th chained draft after L
    committed tokens (teacher tokens fed), as the engine computes it slot by slot."""
    cfg = F.make_config(target.config, version, draft_vocab=50)
    p = F.bind_target(F.init_params(cfg, jax.random.key(1)), target.params)
    S, L, steps = 14, 6, 3
    seq = jnp.asarray(np.random.default_rng(2).integers(0, 101, (1, S)), jnp.int32)
    pos = jnp.arange(S, dtype=jnp.int32)[None]
    hid, _ = forward_hidden(
        target.params,
        target.config,
        seq,
        pos,
        init_cache(target.config, 1, S, per_layer=True),
        hidden_layers=cfg.feature_layers,
    )
    feats = F.target_features(cfg, p, hid)[:, : S - 1]
    outs = losses.draft_steps(cfg, p, feats, seq, steps)  # [steps, 1, S-1, D]
    # Incremental: commit pairs j < L with target features, then draft on own outputs.
    cache = init_cache(cfg.layer, 1, 32, per_layer=True)
    o, cache = F.draft_block(cfg, p, feats[:, :L], seq[:, 1 : L + 1], pos[:, :L], cache)
    cache = cache.replace(lengths=jnp.asarray([L]))
    prev = o[:, L - 1]
    np.testing.assert_allclose(outs[0, 0, L - 1], prev[0], atol=1e-5)
    for i in range(1, steps):
        j = L + i - 1
        o, cache = F.draft_block(
            cfg, p, prev[:, None], seq[:, j + 1 : j + 2], pos[:, j : j + 1], cache
        )
        cache = cache.replace(lengths=cache.lengths + 1)
        prev = o[:, 0]
        np.testing.assert_allclose(outs[i, 0, j], prev[0], atol=1e-4)


def test_hard_weight_adds_the_argmax_cross_entropy(target):
    """`hard_weight` w adds w x (each TTT step's cross-entropy to the target's argmax, weighted
    0.8^i) to the soft loss, on the rows the soft loss trains."""
    cfg = F.make_config(target.config, 3, draft_vocab=50)
    p = F.bind_target(F.init_params(cfg, jax.random.key(1)), target.params)
    rng = np.random.default_rng(3)
    B, S, D = 2, 9, cfg.hidden
    hid = Hiddens(
        last=jnp.asarray(rng.normal(size=(B, S - 1, D)), jnp.float32),
        layers=jnp.asarray(rng.normal(size=(3, B, S - 1, D)), jnp.float32),
    )
    tl = jnp.asarray(rng.normal(size=(B, S - 1, 50)) * 3, jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 101, (B, S)), jnp.int32)
    mask = jnp.asarray(np.arange(S)[None] >= np.array([[3], [5]]))
    args = (cfg, p, target.config, hid, tl, tokens, mask)
    soft, _ = losses.eagle_loss(*args)
    both, _ = losses.eagle_loss(*args, hard_weight=0.5)
    outs = losses.draft_steps(cfg, p, F.target_features(cfg, p, hid), tokens, 3)
    valid = np.concatenate([np.asarray(mask)[:, 2:], np.zeros((B, 1), bool)], axis=1)
    extra = 0.0
    for i in range(3):
        lp = jax.nn.log_softmax(F.draft_logits(cfg, p, outs[i], target.config, full=False))
        hard = -np.take_along_axis(np.asarray(lp), np.asarray(tl.argmax(-1))[..., None], -1)
        rows = valid & (np.arange(S - 1)[None] >= i)
        extra += 0.8**i * hard[..., 0][rows].mean()
    np.testing.assert_allclose(float(both - soft), 0.5 * extra, rtol=1e-4)
    with pytest.raises(ValueError, match="hard_weight must be >= 0, got -1"):
        small(hard_weight=-1.0)


def test_ttt_mask_structure():
    m = losses.ttt_masks(5, 3)
    assert m.shape == (3, 5, 15)
    np.testing.assert_array_equal(m[0, :, :5], np.tril(np.ones((5, 5), bool)))
    assert not m[0, :, 5:].any()
    # step 2, row 4: committed rows 0..2, step-1 row 3, itself (step 2 row 4).
    assert np.flatnonzero(m[2, 4]).tolist() == [0, 1, 2, 5 + 3, 10 + 4]


def test_resume_gives_the_same_loss_curve(target, dataset, tmp_path):
    ds, held = dataset
    _, p_full, h_full = trainer.train(target, small(), ds, tmp_path / "a", progress=False)
    trainer.train(target, small(), ds, tmp_path / "b", progress=False, stop_after=3)
    hist = [json.loads(x) for x in (tmp_path / "b/history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in hist] == [1, 2, 3]
    _, p_res, h_res = trainer.train(target, small(), ds, tmp_path / "b", progress=False)
    full = [(r["step"], r["loss"]) for r in h_full if "loss" in r]
    res = [(r["step"], r["loss"]) for r in h_res if "loss" in r]
    assert [s for s, _ in res] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in res], [v for _, v in full], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_res)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # The exported drafter loads by path and drafts exactly.
    assert (tmp_path / "b/drafter/config.json").exists()
    # A warm start (init_from) begins from the params run "a" ended with, under its own schedule.
    warm = small(init_from=str(tmp_path / "a"))
    _, p_warm, _ = trainer.train(target, warm, ds, tmp_path / "w", progress=False, stop_after=0)
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_warm)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A warm start from the exported drafter (what survives a new machine) begins from the same
    # params, draft vocabulary included, whatever this run's draft_vocab says.
    exported = small(init_from=str(tmp_path / "a" / "drafter"), draft_vocab=32)
    _, p_exp, _ = trainer.train(target, exported, ds, tmp_path / "e", progress=False, stop_after=0)
    assert jax.tree.structure(p_exp) == jax.tree.structure(p_full)
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_exp)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # A deeper drafter grown from the exported one: the same params plus an added layer that
    # starts as the identity (zero output projections), so it drafts exactly as the shallower
    # one; training then moves the added layer.
    deep = small(init_from=str(tmp_path / "a" / "drafter"), draft_layers=2)
    dcfg, p_deep, _ = trainer.train(target, deep, ds, tmp_path / "d", progress=False, stop_after=0)
    assert dcfg.depth == 2 and len(p_deep["layers"]) == 1
    assert not np.any(np.asarray(p_deep["layers"][0]["wo"]))
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves({**p_deep, "layers": []})):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # A wider MLP grown from it: fresh gate/up columns over zero w_down rows, the same drafter.
    wide = small(init_from=str(tmp_path / "a" / "drafter"), intermediate_size=64)
    wcfg, p_wide, _ = trainer.train(target, wide, ds, tmp_path / "v", progress=False, stop_after=0)
    assert wcfg.layer.intermediate_size == 64 and p_wide["layer"]["w_down"].shape[0] == 64
    assert not np.any(np.asarray(p_wide["layer"]["w_down"][48:]))
    assert np.any(np.asarray(p_wide["layer"]["w_gate_up"][:, 48:64]))
    cfg1 = dataclasses.replace(dcfg, layer=dataclasses.replace(dcfg.layer, num_layers=1))
    feats = jax.random.normal(jax.random.key(0), (1, 5, cfg1.hidden))
    toks, pos = jnp.arange(5)[None], jnp.arange(5)[None]
    outs = [
        F.draft_block(
            c,
            F.bind_target(p, target.params),
            feats,
            toks,
            pos,
            init_cache(c.layer, 1, 8, per_layer=True),
        )[0]
        for c, p in ((cfg1, p_full), (dcfg, p_deep), (wcfg, p_wide))
    ]
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[2]), atol=1e-6)
    _, p_deep, _ = trainer.train(target, deep, ds, tmp_path / "d", progress=False, stop_after=2)
    assert np.any(np.asarray(p_deep["layers"][0]["wo"]))
    with pytest.raises(trainer.CheckpointError, match="another drafter .*intermediate_size"):
        trainer.train(
            target,
            small(init_from=str(tmp_path / "a" / "drafter"), intermediate_size=20),
            ds,
            tmp_path / "z",
            progress=False,
        )
    with pytest.raises(trainer.CheckpointError, match="no checkpoint"):
        trainer.train(
            target, small(init_from=str(tmp_path / "none")), ds, tmp_path / "x", progress=False
        )
    with pytest.raises(trainer.CheckpointError, match="no checkpoint .* smollm2-135m-eagle3"):
        trainer.train(target, small(init_from="no-such-drafter"), ds, tmp_path / "n")
    # Other shapes: refused from the checkpoint's metadata, before any array is read.
    with pytest.raises(
        trainer.CheckpointError,
        match=r"step 6: params/d2t has shape \(64,\), this run expects \(32,\)",
    ):
        trainer.train(
            target,
            small(init_from=str(tmp_path / "a"), draft_vocab=32),
            ds,
            tmp_path / "y",
            progress=False,
        )


def test_mismatched_and_corrupted_checkpoints(target, dataset, tmp_path):
    ds, _ = dataset
    trainer.train(target, small(), ds, tmp_path / "r", progress=False, stop_after=3)
    with pytest.raises(trainer.CheckpointError, match="different configuration.*lr"):
        trainer.train(target, small(lr=1e-2), ds, tmp_path / "r", progress=False)
    # A run saved before a TrainConfig field existed (here draft_layers) ran with its default:
    # it resumes under today's config.
    shutil.copytree(tmp_path / "r", tmp_path / "old")
    record = json.loads((tmp_path / "old/run.json").read_text())
    del record["train"]["draft_layers"]
    (tmp_path / "old/run.json").write_text(json.dumps(record))
    trainer.train(target, small(), ds, tmp_path / "old", progress=False, stop_after=3)
    with pytest.raises(trainer.CheckpointError, match="different configuration.*draft_layers"):
        trainer.train(target, small(draft_layers=2), ds, tmp_path / "old", progress=False)
    # Same config, but the saved arrays were written for another drafter shape.
    shutil.copytree(tmp_path / "r", tmp_path / "s")
    (tmp_path / "s/run.json").unlink()
    with pytest.raises(trainer.CheckpointError, match="step 3"):
        trainer.train(target, small(intermediate_size=24), ds, tmp_path / "s", progress=False)
    # Corrupted: garbage over every file of the saved step.
    for f in (tmp_path / "r/checkpoints/3").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    with pytest.raises(trainer.CheckpointError, match="cannot restore the checkpoint of step 3"):
        trainer.train(target, small(), ds, tmp_path / "r", progress=False)


def test_training_raises_agreement(target, dataset, tmp_path):
    """60 steps on the tiny target's own outputs: top-1 agreement at the first draft position
    rises well above its start (the drafter learns the target, not noise)."""
    ds, held = dataset
    tc = small(steps=60, log_every=10, save_every=60, lr=1e-2, warmup=5, ttt_steps=2)
    _, _, hist = trainer.train(target, tc, ds, tmp_path / "t", progress=False, heldout_prompts=held)
    accs = [r["acc"][0] for r in hist if "acc" in r]
    assert accs[-1] > accs[0] + 0.15, accs
    assert any("tau" in r for r in hist)


def test_data_helpers(tmp_path):
    a = [idx.tolist() for _, (_, idx) in zip(range(7), data.iterate_batches(10, 3, seed=5))]
    b = [
        idx.tolist()
        for _, (_, idx) in zip(range(4), data.iterate_batches(10, 3, seed=5, start_step=3))
    ]
    assert a[3:] == b
    assert all(len(set(x)) == 3 for x in a)
    toks = np.array([[1, 2, 2, 3, 3, 3]])
    mask = np.array([[False, True, True, True, True, True]])
    np.testing.assert_array_equal(data.draft_vocab(toks, mask, 2, 10, always=[9]), [3, 9])
    with pytest.raises(ValueError, match="draft vocabulary size"):
        data.draft_vocab(toks, mask, 0, 10)
    with pytest.raises(ValueError, match="unknown training sources"):
        data.load_prompts(["sharegpt"])
    with pytest.raises(ValueError, match="unknown drafter kind"):
        trainer.TrainConfig(kind="hydra")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        trainer.TrainConfig(steps=0)


def test_dataset_resumes_only_over_its_own_shards(target, dataset, tmp_path):
    """A rerun over a finished dataset generates nothing; one whose prompts or shard size
    (`gen_batch`) differ is refused by name instead of reusing rows built from other prompts;
    shards written before the prompt CRCs were stored are checked by row count."""
    d = tmp_path / "ds"
    shutil.copytree(dataset[0], d)
    prompts = dataset_prompts()
    before = {p.name: p.stat().st_mtime_ns for p in d.glob("shard_*.npz")}
    kw = dict(seq_len=40, max_new_tokens=28, progress=False)
    data.build_dataset(target, prompts, d, batch=16, shard_rows=16, **kw)
    assert {p.name: p.stat().st_mtime_ns for p in d.glob("shard_*.npz")} == before
    with pytest.raises(
        ValueError,
        match=r"shard_self_00000.npz holds 16 rows, but this run "
        r"puts 8 prompts there \(shard_rows 8\)",
    ):
        data.build_dataset(target, prompts, d, batch=8, shard_rows=8, **kw)
    with pytest.raises(ValueError, match="holds rows of other prompts"):
        data.build_dataset(target, prompts[::-1], d, batch=16, shard_rows=16, **kw)
    first = d / "shard_self_00000.npz"
    with np.load(first) as f:  # as a shard from before the CRCs
        old = {k: f[k] for k in f.files if k != "prompt_crc"}
    np.savez(first, **old)
    data.build_dataset(target, prompts[::-1][:16] + prompts[16:], d, batch=16, shard_rows=16, **kw)


def write_train_data(root, n_gsm=30, n_code=20):
    """Files in the format of ../shared/data/train (tests must not depend on that folder)."""
    d = root / "train"
    d.mkdir(parents=True, exist_ok=True)
    (d / "gsm8k_train.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "question": f"What is {i} + {i}?",
                    "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}",
                }
            )
            + "\n"
            for i in range(n_gsm)
        )
    )
    (d / "codealpaca.json").write_text(
        json.dumps(
            [
                {
                    "instruction": f"Write a function returning {i}.",
                    "input": "" if i % 2 else f"n={i}",
                    "output": f"def f():\n    return {i}",
                }
                for i in range(n_code)
            ]
        )
    )
    return root


def test_answers_are_not_cut_by_a_longer_prompt_in_the_batch(target, tmp_path):
    """Every answer gets its own room, seq_len minus its prompt (per-row budgets), so long
    prompts in the batch do not cut short prompts' answers (here 28 tokens each against the
    long ones' 20; one room per batch would give all 20), and the shard keeps the prompts'
    order."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 101, 20 if i % 2 else 4).tolist() for i in range(16)]
    data.build_dataset(
        target, [{"prompt": p} for p in prompts], tmp_path, seq_len=40, max_new_tokens=28,
        batch=8, shard_rows=16, progress=False,
    )  # fmt: skip
    tokens, mask = data.read_dataset(tmp_path)
    assert mask.sum(1).tolist() == [28, 20] * 8
    for row, p in zip(tokens, prompts):
        assert row[: len(p)].tolist() == p


def test_a_later_stage_excludes_earlier_recipes_prompts(tmp_path, monkeypatch):
    """`exclude_recipes`: a stage's pool leaves out every prompt (trained or held out) of the
    recipes it names, still with the counts it asks for; without it the pool is unchanged."""
    from specjax.train import load_configs, select_prompts

    monkeypatch.setenv("SPECJAX_DATA", str(write_train_data(tmp_path, n_gsm=40, n_code=30)))
    stage = "kind: eagle3\ndata:\n  mix: {gsm8k: %d, codealpaca: %d}\n  prompts: %d\n"
    stage += "  heldout: 4\n  seed: %d\n"
    a, b, c = (tmp_path / f"{n}.yaml" for n in "abc")
    a.write_text(stage % (20, 10, 26, 0))
    b.write_text(stage % (20, 20, 36, 1) + f"  exclude_recipes: [{a}]\n")
    c.write_text(stage % (21, 10, 26, 0) + f"  exclude_recipes: [{a}]\n")
    train_a, held_a, _ = select_prompts(load_configs(str(a))[1])
    train_b, held_b, _ = select_prompts(load_configs(str(b))[1])
    used_a = {p["prompt"] for p in train_a + held_a}
    assert len(used_a) == 30 and len(train_b) == 36 and len(held_b) == 4
    assert not used_a & {p["prompt"] for p in train_b + held_b}
    without = data.mix_prompts({"gsm8k": 20, "codealpaca": 10}, 0)  # no exclusion at all
    assert [p["prompt"] for p in without] == [
        p["prompt"] for p in data.mix_prompts({"gsm8k": 20, "codealpaca": 10}, 0, exclude=set())
    ]
    assert {p["prompt"] for p in without} == used_a
    with pytest.raises(ValueError, match=r"21 prompts of 'gsm8k'; it has 20 \(20 excluded\)"):
        select_prompts(load_configs(str(c))[1])


def test_prompts_interleave_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECJAX_DATA", str(write_train_data(tmp_path)))
    prompts = data.load_prompts()
    assert len(prompts) == 50
    assert [p["source"] for p in prompts[:4]] == ["gsm8k", "codealpaca"] * 2
    assert prompts[3]["prompt"] == "Write a function returning 1."
    assert prompts[1]["prompt"] == "Write a function returning 0.\n\nn=0"
    train, held = data.split_prompts(prompts, 30, 10)
    assert len(train) == 30 and len(held) == 10
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in held}
    with pytest.raises(ValueError, match="only 50 exist"):
        data.split_prompts(prompts, 45, 10)
    with pytest.raises(FileNotFoundError, match="gsm8k_train.jsonl not found.*SPECJAX_DATA"):
        data.load_prompts(data_dir=tmp_path / "nowhere")


def test_medusa_kind_trains_and_exports(target, dataset, tmp_path):
    """kind=medusa: sampled-position training from the shared feature cache, export, load by
    path, exact greedy decoding with the trained heads."""
    import specjax

    ds, held = dataset
    tc = small(
        kind="medusa",
        steps=60,
        log_every=1,
        save_every=60,
        lr=3e-3,
        medusa_heads=3,
        medusa_positions=256,
    )
    cfg, _, hist = trainer.train(
        target, tc, ds, tmp_path / "m", progress=False, heldout_prompts=held
    )
    loss = [r["loss"] for r in hist if "loss" in r]
    assert len(hist[0]["acc"]) == 3
    assert np.mean(loss[-10:]) < 0.97 * np.mean(loss[:10]), (
        loss
    )  # it learns (slowly: 256 positions a step)
    d = specjax.drafters.medusa(
        str(tmp_path / "m/drafter"), tree=specjax.drafters.StaticTree([[0], [1], [0, 0], [0, 0, 0]])
    )
    prompts = [list(p) for p in held]
    ar = specjax.generate(target, prompts, max_new_tokens=12)
    assert specjax.generate(target, prompts, max_new_tokens=12, drafter=d).tokens == ar.tokens
    with pytest.raises(ValueError, match="no config.json"):
        specjax.drafters.medusa(str(tmp_path))


def test_bfloat16_compute(target, dataset, tmp_path):
    """dtype=bfloat16 runs the step in bfloat16 (optimizer state and the saved params stay
    float32) and still learns: the loss falls over a few steps."""
    ds, _ = dataset
    _, params, hist = trainer.train(
        target, small(dtype="bfloat16", steps=8, save_every=8), ds, tmp_path / "bf", progress=False
    )
    loss = [r["loss"] for r in hist if "loss" in r]
    assert np.all(np.isfinite(loss)) and loss[-1] < loss[0], loss
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"float32", "int32"}
