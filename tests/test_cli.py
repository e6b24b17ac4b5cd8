"""The `specjax` command line on a tiny HF checkpoint with a real (byte-level BPE) tokenizer:
convert, generate (plain, streamed, speculative), bench (JSON + Markdown + PNG), and errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import specjax
from specjax import cli


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("generate", "convert", "demo", "bench", "bench-ar"):
        assert cmd in out


def test_convert_then_generate(tiny_dir, tmp_path, capsys):
    dst = str(tmp_path / "converted")
    cli.main(["convert", tiny_dir, dst])
    assert "converted" in capsys.readouterr().out
    a, b = specjax.load_model(tiny_dir), specjax.load_model(dst)
    assert a.config == b.config and b.tokenizer is not None
    ids = a.encode("the cat")
    assert (a.logits(ids) == b.logits(ids)).all()

    cli.main(["generate", "--model", dst, "the cat sat", "--max-new-tokens", "12"])
    plain = capsys.readouterr().out
    cli.main(
        [
            "generate",
            "--model",
            dst,
            "the cat sat",
            "--max-new-tokens",
            "12",
            "--drafter",
            "ngram",
            "--k",
            "3",
        ]
    )
    spec = capsys.readouterr().out
    assert plain == spec  # greedy speculative output is the plain output
    cli.main(["generate", "--model", dst, "the cat sat", "--max-new-tokens", "12", "--stream"])
    streamed = capsys.readouterr().out
    assert streamed.strip() in plain


def test_bench_writes_reports(tiny_dir, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text(
        "\n".join(
            json.dumps({"question_id": i, "category": c, "turns": [t]})
            for i, (c, t) in enumerate(
                [("a", "the cat sat on"), ("b", "the dog"), ("a", "on the mat the")]
            )
        )
    )
    out = tmp_path / "bench"
    cli.main(
        [
            "bench",
            "--model",
            tiny_dir,
            "--questions",
            str(q),
            "--limit",
            "1",
            "--max-new-tokens",
            "8",
            "--drafters",
            "ngram,layer_skip:1",
            "--out",
            str(out),
            "--verify-costs",
            "1:1,2:1.5,9:2",
        ]
    )
    table = capsys.readouterr().out
    assert "| a |" in table and "| b |" in table and "| overall |" in table
    res = json.load(open(out / "results.json"))
    assert {r["method"] for r in res["records"]} == {"ar", "ngram", "layer_skip:1"}
    assert len(res["records"]) == 2 * 3  # limit 1 per category, 2 categories, 3 methods
    assert os.path.getsize(out / "speedup.png") > 1000
    assert (out / "results.md").read_text().startswith("| category |")
    # Greedy speculative outputs are the AR outputs, and the bench says so.
    assert "Greedy outputs identical to ar: ngram 2/2, layer_skip:1 2/2." in table
    ar = [r for r in res["records"] if r["method"] == "ar"]
    assert all(1 <= r["ceiling_steps"] <= max(r["new_tokens"] - 1, 1) for r in ar)
    overall = res["summary"]["overall"]
    assert overall["ngram"]["tau"] <= overall["ar"]["ceiling_tau"] + 1e-9
    assert overall["ngram"]["decode_speedup"] > 0
    # Charging verify forwards their cost can only lower the ceiling.
    assert all(r["ceiling_steps"] <= r["ceiling_cost"] <= max(r["new_tokens"] - 1, 1) for r in ar)
    assert overall["ar"]["bound_speedup"] <= overall["ar"]["ceiling_speedup"] + 1e-9
    assert res["meta"]["verify_costs"] == {"1": 1.0, "2": 1.5, "9": 2.0}
    assert "(T: cost vs T=1; 1: 1.00, 2: 1.50, 9: 2.00)" in table
    for bad, why in (("2=1", "bad verify costs"), ("1:1,2:3,4:2", "non-decreasing")):
        with pytest.raises(SystemExit):  # refused while parsing, before any model is loaded
            cli.main(["bench", "--model", "not-a-model", "--verify-costs", bad])
        assert why in capsys.readouterr().err


def test_bench_batch_sizes(tiny_dir, tmp_path, capsys, monkeypatch):
    """`bench --batch 1,2`: AR and drafters at each batch size on the same rows (`auto` chosen
    for each size); greedy rows equal AR's at batch 1 whatever batch they share; bad sizes and
    HF baselines are refused."""
    from specjax import autotune

    asked = []

    def choose(model, batch=1, **kw):  # auto's measured choice: the n-gram chain at batch 1
        asked.append(batch)
        return ("ngram" if batch == 1 else "none"), []

    monkeypatch.setattr(autotune, "choose_drafter", choose)
    q = tmp_path / "q.jsonl"
    texts = ["the cat sat on", "the dog", "on the mat the cat", "a b c a b c a"]
    q.write_text(
        "\n".join(
            json.dumps({"question_id": i, "category": "a", "turns": [t]})
            for i, t in enumerate(texts)
        )
    )
    out = tmp_path / "bench"
    base = ["bench", "--model", tiny_dir, "--questions", str(q), "--max-new-tokens", "8"]
    cli.main(base + ["--drafters", "ngram,auto", "--batch", "2,1", "--out", str(out)])
    table = capsys.readouterr().out
    res = json.load(open(out / "results_batch.json"))
    got = [(r["batch"], r["method"], r["rows"], r["same_as_ar"]) for r in res["records"]]
    assert got == [
        (b, m, 4, 4) for b in (1, 2) for m in ("ar", "ngram", "auto")
    ]  # fmt: skip
    assert asked == [1, 2]
    auto = {r["batch"]: r for r in res["records"] if r["method"] == "auto"}
    ngram = {r["batch"]: r for r in res["records"] if r["method"] == "ngram"}
    assert ngram[2]["tau"] > 1.0 and auto[1]["tau"] == ngram[1]["tau"]
    assert auto[2]["tau"] == 1.0  # plain decoding at batch 2
    assert not any(r["compiled"] for r in res["records"])  # the warm-up compiled every shape
    assert all(r["new_tokens"] == sum(map(len, r["tokens"])) > 0 for r in res["records"])
    assert all(0 < r["decode_s"] < r["seconds"] for r in res["records"])
    assert "| 2 | ngram |" in table and (out / "results_batch.md").read_text() in table + "\n"
    for bad, why in (
        (["--batch", "0"], "positive ints"),
        (["--batch", "8"], "batch 8 needs at least 8 prompts"),
        (["--batch", "1,2", "--hf-baseline"], "batch 1 only"),
        (["--batch", "1,2", "--temperature", "1"], "--temperature 1.0 runs at batch 1 only"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(base + bad)
        assert why in str(e.value) + capsys.readouterr().err


def test_generate_auto_chooses_for_its_batch(tiny_dir, capsys, monkeypatch):
    """`specjax generate --drafter auto` asks `auto` for the rows it decodes at once: all its
    prompts, or one at a time with --stream."""
    from specjax import autotune

    asked = []

    def choose(model, batch=1, **kw):
        asked.append(batch)
        return "none", []

    monkeypatch.setattr(autotune, "choose_drafter", choose)
    base = ["generate", "--model", tiny_dir, "a b", "c d", "e f", "--max-new-tokens", "3"]
    cli.main(base + ["--drafter", "auto"])
    cli.main(base + ["--drafter", "auto", "--stream"])
    assert asked == [4, 1]  # 3 prompts decode as a batch of 4 (`api.padded_batch`)
    capsys.readouterr()


def test_bench_samples_with_one_key_per_run(tiny_dir, tmp_path, capsys):
    """`bench --temperature T --top-k K --top-p P --seed S`: every method samples with the same
    settings and key (two runs give the same draws), the report says the outputs are draws, and
    an HF runner samples with the same settings (its own top-k default off), seeded."""
    from specjax import bench, load_model

    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 0, "category": "a", "turns": ["the cat sat on"]}))
    args = ["bench", "--model", tiny_dir, "--questions", str(q), "--max-new-tokens", "12"]
    args += ["--drafters", "ngram", "--verify-costs", "none", "--temperature", "1.5"]
    runs = []
    for seed in ("3", "3", "4"):
        out = tmp_path / f"bench{len(runs)}"
        cli.main(args + ["--top-k", "40", "--top-p", "0.95", "--seed", seed, "--out", str(out)])
        runs.append(json.load(open(out / "results.json")))
    table = capsys.readouterr().out
    assert "Sampled (temperature 1.5, top_k 40, top_p 0.95, key 3;" in table
    assert "Greedy outputs identical" not in table
    assert runs[0]["meta"]["sampling"] == {"temperature": 1.5, "top_k": 40, "top_p": 0.95, "key": 3}
    draws = [{r["method"]: r["tokens"] for r in res["records"]} for res in runs]
    assert draws[0] == draws[1] and draws[0]["ar"] != draws[2]["ar"]
    model = load_model(tiny_dir)
    greedy = bench._spec_runner(model, None, 12)(model.encode("the cat sat on"))
    assert draws[0]["ar"] != greedy.tokens  # sampled, not greedy

    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    eos = model.eos_token_ids
    sampled = dict(temperature=1.5, top_k=None, top_p=None, key=3)
    ids = model.encode("the cat sat on")
    hf_draws = [bench._hf_runner(hf, 12, eos, dict(sampled, key=k))(ids).tokens for k in (3, 3, 4)]
    assert hf_draws[0] == hf_draws[1] != hf_draws[2]
    assert bench._hf_runner(hf, 12, eos)(ids).tokens != hf_draws[0]  # greedy without sampling


def test_measured_verify_costs(tiny_dir):
    from specjax import bench, load_model

    model = load_model(tiny_dir)
    prompts = [{"prompt": "the cat sat on"}, {"prompt": "the dog ran after the cat"}]
    costs = bench.measure_verify_costs(
        model, prompts, 8, sizes=(1, 2, 5), repeats=2, progress=False
    )
    assert list(costs) == [1, 2, 5] and costs[1] == 1.0
    assert bench.check_costs(costs) == costs  # positive, non-decreasing


def _min_steps_exhaustive(prompt, output, k):
    """Fewest steps over every choice of accepted length (0..longest copy) at every step."""
    ctx, n, p = list(prompt) + list(output), len(output), len(prompt)
    best = {n: 0}
    for t in range(n - 1, 0, -1):
        seen, longest = p + t, 0
        for j in range(seen):
            a = 0
            while a < k and t + a < n and j + a < seen and ctx[j + a] == output[t + a]:
                a += 1
            longest = max(longest, a)
        best[t] = 1 + min(best[min(t + a + 1, n)] for a in range(longest + 1))
    return best.get(1, 0)


def _min_cost_exhaustive(prompt, output, k, cost):
    """Least total cost over every draft a lookup drafter could make at every step: any
    source j, any length r <= k (rejected tokens included), emitting the accepted prefix + 1."""
    ctx, n, p = list(prompt) + list(output), len(output), len(prompt)
    best = {n: 0.0}
    for t in range(n - 1, 0, -1):
        seen, options = p + t, [cost(1) + best[t + 1]]
        for j in range(seen):
            for r in range(1, min(k, seen - j) + 1):
                a = 0
                while a < r and t + a < n - 1 and ctx[j + a] == output[t + a]:
                    a += 1
                options.append(cost(r + 1) + best[t + a + 1])
        best[t] = min(options)
    return best.get(1, 0.0)


def test_lookup_bound_is_the_least_cost():
    from specjax.bench import check_costs, lookup_bound

    # Copying 4 tokens at once (T=5) costs 2.0; at T=5 costing 6, two shorter steps win.
    assert lookup_bound([1, 2, 3, 4, 5], [9, 1, 2, 3, 4, 5], {1: 1, 2: 1.5, 5: 2.0}) == 2.0
    assert lookup_bound([1, 2, 3, 4, 5], [9, 1, 2, 3, 4, 5], {1: 1, 2: 1.5, 5: 6}) == 2.5
    assert lookup_bound([1, 2, 3], [7, 8, 9, 10], {1: 1, 2: 1.5}) == 3.0  # AR
    assert check_costs({2: 45.0, 1: 30.0}) == {1: 1.0, 2: 1.5}  # e.g. milliseconds
    with pytest.raises(ValueError, match="T = 1"):
        check_costs({2: 1.0})
    with pytest.raises(ValueError, match="T = 1"):
        check_costs({0: 0.5, 1: 1.0})
    with pytest.raises(ValueError, match="non-decreasing"):
        check_costs({1: 1.0, 2: 0.9})
    rng = np.random.default_rng(1)
    for _ in range(40):
        prompt = rng.integers(0, 3, rng.integers(1, 10)).tolist()
        output = rng.integers(0, 3, rng.integers(1, 12)).tolist()
        table = {1: 1.0, 2: 1.0 + rng.random(), 4: 2.0 + rng.random(), 9: 3.0 + rng.random()}
        cost = lambda T, table=table: table[max(s for s in table if s <= T)]  # noqa: E731
        for k in (2, 5):
            assert (
                abs(
                    lookup_bound(prompt, output, table, k)
                    - _min_cost_exhaustive(prompt, output, k, cost)
                )
                < 1e-9
            ), (prompt, output)
        # With every block costing one forward it is the fewest steps.
        assert lookup_bound(prompt, output, {1: 1.0}) == _min_steps_exhaustive(
            prompt, output, len(output)
        )


def test_lookup_ceiling_is_the_fewest_steps():
    from specjax.bench import lookup_ceiling

    assert lookup_ceiling([1, 2, 3, 4, 5], [9, 1, 2, 3, 4, 5]) == 1  # one copy of 4 + bonus
    assert lookup_ceiling([1, 2, 3, 4, 5], [9, 1, 2, 3, 4, 5], k=2) == 2
    assert lookup_ceiling([1, 2, 3], [7, 8, 9, 10]) == 3  # nothing to copy: AR
    assert lookup_ceiling([1, 2], [5, 5, 5, 5, 5]) == 2  # copies its own output once seen
    rng = np.random.default_rng(0)
    for _ in range(60):  # small vocabularies make many overlapping copies
        prompt = rng.integers(0, 3, rng.integers(1, 12)).tolist()
        output = rng.integers(0, 3, rng.integers(1, 16)).tolist()
        for k in (1, 3, None):
            assert lookup_ceiling(prompt, output, k) == _min_steps_exhaustive(
                prompt, output, k or len(output)
            ), (prompt, output, k)


def test_ngram_names():
    assert cli.make_drafter("ngram", None).binder(None)[0].adaptive
    fixed = cli.make_drafter("ngram_fixed@4", None)
    spec = fixed.binder(None)[0]
    assert not spec.adaptive and spec.k == 4


def test_ngram_verify_rule():
    """Tokens the chain asks to verify by match length n (0: none) and copied tokens known."""
    from specjax.drafters.ngram import NgramSpec

    n = np.array([0, 1, 2, 3, 4, 4])
    known = np.array([9, 9, 9, 9, 9, 2])  # the last match's copy runs out after 2 tokens
    default = cli.make_drafter("ngram", None).binder(None)[0]  # k 7, 3 from 2-token matches
    assert default.verify_sizes == (3, 7)
    assert default.request(n, known).tolist() == [0, 0, 3, 3, 7, 2]
    old = NgramSpec(k=8, short=1, short_from=3)  # the rule before 2026-12-06
    assert old.request(n, known).tolist() == [0, 0, 0, 1, 8, 2]
    # max_ngram 2: short_from defaults to min_ngram (1); k 2 caps the default short at 2
    assert NgramSpec(k=2, max_ngram=2).request(n, known).tolist() == [0, 2, 2, 2, 2, 2]
    assert NgramSpec(k=5, adaptive=False).request(n, known).tolist() == [0, 5, 5, 5, 5, 5]
    for bad in (0, 4, 2.5):
        with pytest.raises(
            ValueError, match=rf"short_from must be an int in \[min_ngram=1, .*=3\], got {bad}"
        ):
            NgramSpec(k=4, short_from=bad)


def test_cli_errors(tiny_dir, capsys):
    # Argument errors are argparse's (exit 2, message on stderr), before the model loads.
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", tiny_dir, "hi", "--drafter", "medusa2"])
    assert "unknown drafter 'medusa2'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown model"):
        cli.main(["generate", "--model", "not-a-model", "hi"])
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", tiny_dir, "hi", "--max-new-tokens", "0"])
    assert "--max-new-tokens: expected a positive int, got 0" in capsys.readouterr().err


def test_train_drafter_then_generate_with_it(tiny_dir, tmp_path, monkeypatch, capsys):
    from test_train import write_train_data

    monkeypatch.setenv("SPECJAX_DATA", str(write_train_data(tmp_path / "data")))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "kind: eagle3\nsteps: 4\nbatch: 4\nwarmup: 1\nlog_every: 2\nsave_every: 2\n"
        "draft_vocab: 64\neval_every: 4\neval_prompts: 2\neval_new_tokens: 8\n"
        "data:\n  prompts: 8\n  given_prompts: 4\n  heldout: 2\n  seq_len: 48\n"
        "  max_new_tokens: 16\n  gen_batch: 4\n"
    )
    out = tmp_path / "run"
    cli.main(["train-drafter", "--target", tiny_dir, "--out", str(out), "--config", str(cfg)])
    said = capsys.readouterr().out
    assert "trained EAGLE-3 drafter" in said and "held-out tau" in said
    shards = sorted(p.name for p in (out / "data").glob("shard_*.npz"))
    assert shards == ["shard_given_00000.npz", "shard_self_00000.npz"]
    hist = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in hist if "loss" in r] == [2, 4]
    args = ["generate", "--model", tiny_dir, "the cat sat", "--max-new-tokens", "12"]
    cli.main(args)
    plain = capsys.readouterr().out
    for name in ("eagle3", "eagle3_tree"):
        cli.main(args + ["--drafter", f"{name}:{out / 'drafter'}"])
        assert capsys.readouterr().out == plain
    with pytest.raises(SystemExit, match="no bundled eagle3 drafter"):
        cli.main(args + ["--drafter", "eagle3"])
    with pytest.raises(ValueError, match="not found; give a YAML path or one of"):
        cli.main(["train-drafter", "--target", tiny_dir, "--out", str(out), "--config", "nope"])
