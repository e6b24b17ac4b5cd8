"""Multi-device decoding on 8 simulated CPU devices: the batch sharded over a mesh "data" axis,
and `generate_pmap`, must give the same greedy tokens as one device.

`--xla_force_host_platform_device_count` only works if it is set before jax is imported, so the
checks run in one subprocess; the tiny model is built here and handed over as a pickle.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import specjax

N_DEVICES = 8

SCRIPT = textwrap.dedent("""
    import json, pickle, sys
    import jax, jax.numpy as jnp
    from specjax import drafters, engine, sharding
    from specjax.api import generate, generate_pmap, prepare
    from specjax.model import Model

    with open(sys.argv[1], "rb") as f:
        data = pickle.load(f)
    model = Model(params=jax.tree.map(jnp.asarray, data["params"]), config=data["config"])
    prompts, new = data["prompts"], data["new"]
    mesh = sharding.make_mesh()
    res = {"devices": jax.device_count(), "mesh": dict(mesh.shape)}

    # The batch really is split: each device holds its own rows of the decode state.
    ec, args, _ = prepare(model, prompts, max_new_tokens=new)
    dparams, max_len = args.pop("dparams"), args.pop("max_len")
    params, dparams, args = sharding.place(mesh, model.params, dparams, args)
    state = engine.prefill(params, dparams, **args, ec=ec, max_len=max_len)
    res["state_devices"] = len(state.out.sharding.device_set)
    res["state_replicated"] = bool(state.out.sharding.is_fully_replicated)
    res["state_shard_rows"] = sorted({s.data.shape[0] for s in state.out.addressable_shards})

    for name, make in (("ar", lambda: None), ("ngram", lambda: drafters.ngram(k=4))):
        single = generate(model, prompts, max_new_tokens=new, drafter=make())
        sharded = generate(model, prompts, max_new_tokens=new, drafter=make(), mesh=mesh)
        pmapped = generate_pmap(model, prompts, max_new_tokens=new, drafter=make())
        for how, out in (("single", single), ("mesh", sharded), ("pmap", pmapped)):
            res[name + "_" + how] = {"tokens": out.tokens,
                                     "hist": out.stats["acceptance_histogram"]}
    # Each row alone (batch 1, one device): the steps a row takes when nothing else shares them.
    res["ngram_rows"] = [
        generate(model, [p], max_new_tokens=new, drafter=drafters.ngram(k=4))
        .stats["acceptance_histogram"] for p in prompts
    ]
    print("RESULT " + json.dumps(res))
""")


def _write_blob(path, model: specjax.Model, prompts: list, new: int, **extra) -> str:
    """The model, prompts and budget pickled for a subprocess script (argv[1])."""
    with open(path, "wb") as f:
        params = jax.tree.map(np.asarray, model.params)
        pickle.dump(dict(params=params, config=model.config, prompts=prompts, new=new, **extra), f)
    return str(path)


def _device_env(devices: int) -> dict:
    """The environment of a subprocess with `devices` simulated CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flag = f" --xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + flag).strip()
    return env


def _result(stdout: str, stderr: str, returncode: int) -> dict:
    """The JSON a subprocess script printed after "RESULT " (its stderr tail on failure)."""
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    assert returncode == 0 and lines, stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _run_script(script: str, blob: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", script, blob],
        env=_device_env(N_DEVICES),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return _result(proc.stdout, proc.stderr, proc.returncode)


def test_mesh_and_pmap_match_single_device(make_hf_model, tmp_path):
    model = specjax.model_from_hf(make_hf_model("llama", seed=3, eos_token_id=None))
    rng = np.random.default_rng(1)
    # 5 ragged prompts -> a batch of 8 (3 padding rows), one row per device.
    prompts = [rng.integers(0, 101, n).tolist() for n in (3, 9, 14)] + [
        [11, 12, 13] * 3,
        [20, 21, 22, 23] * 2 + [20],
    ]
    new = 24
    res = _run_script(SCRIPT, _write_blob(tmp_path / "model.pkl", model, prompts, new))

    assert res["devices"] == N_DEVICES
    assert res["mesh"] == {"data": N_DEVICES}
    assert res["state_devices"] == N_DEVICES and not res["state_replicated"]
    assert res["state_shard_rows"] == [1]

    ref = res["ar_single"]["tokens"]
    assert len(ref) == len(prompts) and all(len(t) == new for t in ref)
    assert len({tuple(t) for t in ref}) == len(prompts)
    for name in ("ar_mesh", "ar_pmap", "ngram_single", "ngram_mesh", "ngram_pmap"):
        assert res[name]["tokens"] == ref, name
    # The drafter did draft (and was verified) on every path.
    for name in ("ngram_single", "ngram_mesh", "ngram_pmap"):
        assert sum(res[name]["hist"][1:]) > 0, name
    # Acceptance histograms. A step verifies the draft at the size the rows that share the
    # step need (`engine.verify`: a plain step when no row has an n-gram match), so a row's
    # steps depend on which rows it shares them with. The mesh runs one program over the whole
    # batch (that choice is a reduction over every row, across devices): the same steps as one
    # device. pmap runs one program per device, one row each here: every row takes the steps
    # it takes alone, so the pmap histogram is the sum of the rows' own histograms.
    assert res["ar_mesh"]["hist"] == res["ar_single"]["hist"] == res["ar_pmap"]["hist"]
    assert res["ngram_mesh"]["hist"] == res["ngram_single"]["hist"]
    alone = [sum(col) for col in zip(*res["ngram_rows"])]
    assert res["ngram_pmap"]["hist"] == alone
    assert res["ngram_single"]["hist"] != alone  # the grouping really matters in this batch


TP_SCRIPT = textwrap.dedent("""
    import dataclasses, json, pickle, sys
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding
    import specjax
    from specjax import drafters, engine, sharding
    from specjax.api import generate, prepare
    from specjax.model import Model

    with open(sys.argv[1], "rb") as f:
        data = pickle.load(f)
    model = Model(params=jax.tree.map(jnp.asarray, data["params"]), config=data["config"])
    prompts, new = data["prompts"], data["new"]
    mesh = specjax.make_mesh(data=4, model=2)
    sm = specjax.shard_model(model, mesh)
    res = {"mesh": dict(mesh.shape), "shards": sm.config.shards}
    res["specs"] = {name: str(x.sharding.spec) for name, x in sm.params["layers"][0].items()}
    res["specs"]["embed"] = str(sm.params["embed"].sharding.spec)
    res["specs"]["lm_head"] = str(sm.params["lm_head"].sharding.spec)
    # Streamed from the HF checkpoint straight into its final sharding: the same arrays.
    import numpy as np
    from checkpoints_convert.hf import stream_hf_dir
    streamed, cfg = stream_hf_dir(data["hf_dir"], np.float32, mesh=mesh)
    res["streamed_equal"] = cfg == sm.config and all(
        np.array_equal(np.asarray(a), np.asarray(b)) and a.sharding.spec == b.sharding.spec
        for a, b in zip(jax.tree.leaves(streamed), jax.tree.leaves(sm.params)))
    res["bytes_total"] = sum(x.nbytes for x in jax.tree.leaves(sm.params))
    res["bytes_per_device"] = [
        sum(s.data.nbytes for x in jax.tree.leaves(sm.params) for s in x.addressable_shards
            if s.device == d) for d in jax.devices()]

    # The KV cache of the running loop is split by rows ("data") and KV heads ("model").
    ec, args, _ = prepare(sm, prompts, max_new_tokens=new)
    dparams, max_len = args.pop("dparams"), args.pop("max_len")
    params, dparams, args = sharding.place(mesh, sm.params, dparams, args)
    ec = dataclasses.replace(ec, kv_sharding=NamedSharding(mesh, sharding.kv_spec(mesh)))
    st = engine.decode(params, dparams, engine.prefill(
        params, dparams, **args, ec=ec, max_len=max_len), args["sp"], ec=ec)
    k0 = st.cache.k[0]
    res["cache"] = [str(k0.sharding.spec), list(k0.shape),
                    sorted({tuple(s.data.shape) for s in k0.addressable_shards})]

    # Drafter params by size: with the threshold at 0 every EAGLE-3 leaf with a dimension the
    # model axis divides is split over it (at the default 1 MiB this tiny drafter stays
    # replicated); the program gives the single-device tokens.
    tree = drafters.DynamicTree(nodes=5, depth=3, top_k=2)
    from specjax.drafters import medusa_heads
    from specjax.models import eagle as feature
    eagle_cfg = feature.make_config(model.config, 3)
    eagle_params = feature.init_params(eagle_cfg, jax.random.key(0))
    eagle = drafters.eagle((eagle_cfg, eagle_params), tree=tree)
    ec, args, _ = prepare(sm, prompts, max_new_tokens=new, drafter=eagle)
    dparams, max_len = args.pop("dparams"), args.pop("max_len")
    params, dparams, args = sharding.place(mesh, sm.params, dparams, args, replicate_below=0)
    res["eagle_specs"] = sorted({str(x.sharding.spec) for x in jax.tree.leaves(dparams)})
    ec = dataclasses.replace(ec, kv_sharding=NamedSharding(mesh, sharding.kv_spec(mesh)))
    st = engine.decode(params, dparams, engine.prefill(
        params, dparams, **args, ec=ec, max_len=max_len), args["sp"], ec=ec)
    res["eagle_split"] = [[int(x) for x in row[:n]] for row, n in zip(
        jax.device_get(st.out), jax.device_get(st.n_out))][:len(prompts)]
    res["eagle_single"] = generate(model, prompts, max_new_tokens=new, drafter=eagle).tokens

    makers = {
        "ar": lambda: None,
        "ngram": lambda: drafters.ngram(k=4),
        "layer_skip_tree": lambda: drafters.layer_skip(layers=1, tree=tree),
        "cascade": lambda: drafters.cascade(
            [drafters.ngram(k=2), drafters.layer_skip(layers=1, k=3)]),
        # a random EAGLE-3 tree (reads the target's hidden states, shares its sharded head)
        "eagle3_tree": lambda: drafters.eagle((eagle_cfg, eagle_params), tree=tree),
        # Medusa heads on the target's features, a static tree
        "medusa_tree": lambda: drafters.medusa(
            medusa_heads.MedusaHeads(medusa_cfg, medusa_heads.init_params(
                medusa_cfg, jax.random.key(1))),
            tree=drafters.StaticTree([[0], [1], [0, 0]])),
        # an independent draft model (its own unsharded config; the unsharded target itself)
        "small_model": lambda: drafters.small_model(model, k=3),
    }
    medusa_cfg = medusa_heads.MedusaConfig(num_heads=2, hidden=model.config.hidden_size)
    sampled = {"temperature": 1.0, "top_k": 20, "key": 5}
    for name in data["makers"]:
        make = makers[name]
        for how, kw in (("greedy", {}), ("sampled", sampled)):
            if how == "sampled" and name not in data["sampled"]:
                continue
            one = generate(model, prompts, max_new_tokens=new, drafter=make(), **kw)
            tp = generate(sm, prompts, max_new_tokens=new, drafter=make(), mesh=mesh, **kw)
            res[f"{name}_{how}"] = [one.tokens, tp.tokens, one.stats["acceptance_histogram"],
                                    tp.stats["acceptance_histogram"]]
    try:  # 2 KV heads cannot be split 8 ways
        generate(model, prompts, max_new_tokens=new, mesh=specjax.make_mesh(data=1, model=8))
    except ValueError as e:
        res["error"] = str(e)
    print("RESULT " + json.dumps(res))
""")


def _tensor_parallel(make_hf_model, tmp_path, makers: tuple, sampled: tuple) -> dict:
    """TP_SCRIPT's results for a tiny Llama on a 4 x 2 mesh, decoding with `makers` greedily
    (and `sampled` with a fixed key too), each also on one device."""
    hf = make_hf_model("llama", seed=3, vocab_size=128, eos_token_id=None)
    hf.save_pretrained(tmp_path / "hf")
    model = specjax.model_from_hf(hf)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 128, n).tolist() for n in (3, 9, 14)] + [
        [11, 12, 13] * 3,
        [20, 21, 22, 23] * 2 + [20],
    ]
    new = 16
    blob = _write_blob(
        tmp_path / "model.pkl",
        model,
        prompts,
        new,
        hf_dir=str(tmp_path / "hf"),
        makers=makers,
        sampled=sampled,
    )
    res = _run_script(TP_SCRIPT, blob)
    for name in makers:
        one, tp, h_one, h_tp = res[f"{name}_greedy"]
        assert one == tp and h_one == h_tp, name
    for name in sampled:
        one, tp, h_one, h_tp = res[f"{name}_sampled"]
        assert one == tp and h_one == h_tp, name
    return res


def test_tensor_parallel_matches_single_device(make_hf_model, tmp_path):
    """A 4 x 2 (data x model) mesh of 8 CPU devices: params split over "model" (per-device bytes
    about half), the KV cache by rows and KV heads, and greedy tokens (and sampled tokens with the
    same key) identical to one device for plain decoding, an n-gram chain, a cascade and an
    EAGLE-3 tree (more drafters: the test below, extended tier)."""
    res = _tensor_parallel(
        make_hf_model, tmp_path, ("ar", "ngram", "cascade", "eagle3_tree"), sampled=("ar",)
    )
    assert res["mesh"] == {"data": 4, "model": 2} and res["shards"] == 2
    assert res["streamed_equal"]
    assert "P(None, 'model')" in res["eagle_specs"], res["eagle_specs"]
    assert res["eagle_split"] == res["eagle_single"]
    assert res["specs"] == {
        "attn_norm": "P()",
        "mlp_norm": "P()",
        "wqkv": "P(None, 'model')",
        "w_gate_up": "P(None, 'model')",
        "wo": "P('model', None)",
        "w_down": "P('model', None)",
        "embed": "P('model', None)",
        "lm_head": "P(None, 'model')",
    }
    # every device holds about half the params (only the norms are replicated)
    for b in res["bytes_per_device"]:
        assert 0.5 * res["bytes_total"] <= b <= 0.52 * res["bytes_total"], res["bytes_per_device"]
    spec, shape, shards = res["cache"]
    assert spec == "P('data', 'model')"
    assert shards == [[shape[0] // 4, shape[1] // 2, shape[2], shape[3]]]
    assert sum(res["ngram_greedy"][2][1:]) > 0  # the drafter's tokens were accepted
    assert "not divisible by the 8 tensor-parallel shards" in res["error"]


def test_tensor_parallel_more_drafters(make_hf_model, tmp_path):
    """The same mesh for a layer-skip tree (greedy and sampled), a Medusa tree and an
    independent draft model (extended tier)."""
    _tensor_parallel(
        make_hf_model,
        tmp_path,
        ("layer_skip_tree", "medusa_tree", "small_model"),
        sampled=("layer_skip_tree",),
    )


MULTIHOST_SCRIPT = textwrap.dedent("""
    import json, pickle, sys
    import specjax
    specjax.distributed.initialize(sys.argv[2], num_processes=2, process_id=int(sys.argv[3]))
    import jax, jax.numpy as jnp
    from specjax import drafters
    from specjax.model import Model

    with open(sys.argv[1], "rb") as f:
        data = pickle.load(f)
    model = Model(params=jax.tree.map(jnp.asarray, data["params"]), config=data["config"])
    prompts, new = data["prompts"], data["new"]
    mesh = specjax.make_mesh(data=4, model=2)  # over both processes' devices
    sm = specjax.shard_model(model, mesh)
    res = {"process": jax.process_index(), "devices": jax.device_count(),
           "local": jax.local_device_count(),
           "mesh_processes": sorted({d.process_index for d in mesh.devices.ravel()})}
    for name, make in (("ar", lambda: None), ("ngram", lambda: drafters.ngram(k=4))):
        out = specjax.generate(sm, prompts, max_new_tokens=new, drafter=make(), mesh=mesh)
        res[name] = [out.tokens, out.stats["acceptance_histogram"]]
    out = specjax.generate(sm, prompts, max_new_tokens=new, mesh=mesh, temperature=1.0, key=5)
    res["ar_sampled"] = out.tokens
    print("RESULT " + json.dumps(res), flush=True)
    specjax.distributed.shutdown()
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_one_global_mesh(make_hf_model, tmp_path):
    """Two processes on localhost (4 CPU devices each, JAX's gloo CPU collectives) joined by
    `specjax.distributed.initialize` decode on one 4 x 2 (data x model) mesh over all 8 devices:
    every process gets the tokens of a single-process, single-device run. Plain decoding,
    greedy and sampled, and the n-gram chain: the cross-process collectives are those of any
    decode; tree drafters on a mesh are checked in one process (`test_tensor_parallel_*`: an
    EAGLE-3 tree here, more in the extended tier); without a tree decode of their own the two
    processes take 18.3 s instead of 22.8 (alone on the 2-core VM, 2026-12-06)."""
    model = specjax.model_from_hf(make_hf_model("llama", seed=3, vocab_size=128, eos_token_id=None))
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 128, n).tolist() for n in (4, 11, 7)] + [[5, 6, 7] * 3]
    new = 12
    blob = _write_blob(tmp_path / "model.pkl", model, prompts, new)
    address = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MULTIHOST_SCRIPT, blob, address, str(i)],
            env=_device_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(_result(stdout, stderr, p.returncode))

    ref = {
        "ar": specjax.generate(model, prompts, max_new_tokens=new),
        "ngram": specjax.generate(
            model, prompts, max_new_tokens=new, drafter=specjax.drafters.ngram(k=4)
        ),
    }
    sampled = specjax.generate(model, prompts, max_new_tokens=new, temperature=1.0, key=5)
    assert sorted(r["process"] for r in outs) == [0, 1]
    for r in outs:
        assert r["devices"] == 8 and r["local"] == 4 and r["mesh_processes"] == [0, 1]
        for name, out in ref.items():
            assert r[name][0] == out.tokens, (r["process"], name)
            assert r[name][1] == out.stats["acceptance_histogram"], (r["process"], name)
        assert r["ar_sampled"] == sampled.tokens


def test_cli_generate_on_a_mesh(tiny_dir, capsys):
    """`specjax generate --mesh 4x2` (8 CPU devices, tensor parallel) prints what one device
    prints (the one-device run is this process: a second 8-device subprocess cost ~8 s).
    Extended tier: the API's mesh decoding is checked by the tests above."""
    from specjax import cli

    args = ["generate", "the cat sat", "the dog", "--model", tiny_dir, "--max-new-tokens", "8"]
    args += ["--drafter", "ngram@2"]
    run = subprocess.run(
        [sys.executable, "-m", "specjax.cli", *args, "--mesh", "4x2"],
        env=_device_env(N_DEVICES),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    capsys.readouterr()
    assert cli.main(args) in (None, 0)
    one_device = capsys.readouterr().out
    assert run.stdout == one_device and "### the dog" in one_device


def test_cli_refuses_a_bad_mesh(tiny_dir, capsys):
    """A bad --mesh is refused before anything loads (argparse checks it: in this process, no
    need for 8 devices)."""
    from specjax import cli

    args = ["generate", "the cat sat", "--model", tiny_dir, "--mesh", "4y2"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code != 0 and "bad mesh '4y2'" in capsys.readouterr().err
