"""Magpie prompts (`specjax.train.magpie`): the user-turn prefix, resumable sampling, cleaning,
the eval-leak check, and the `magpie` data source."""

from __future__ import annotations

import json

import pytest

import specjax
from specjax.train import data, magpie


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return specjax.load_model(tiny_dir)


def test_user_turn_prefix_stops_where_the_message_starts(tiny):
    prefix = tiny.decode(magpie.user_turn_prefix(tiny))
    assert prefix.endswith("<user>") and "<assistant>" not in prefix


def test_sampling_resumes_after_the_last_whole_batch(tiny, tmp_path):
    work = tmp_path / "w.jsonl"
    magpie.sample_instructions(tiny, work, 2, batch=4, max_new_tokens=8, progress=False)
    whole = work.read_text()
    rows = magpie.read_samples(work)
    assert [(r["batch"], r["row"]) for r in rows] == [(b, r) for b in range(2) for r in range(4)]
    # A kill while batch 1 was written leaves two of its rows and a cut line: they are removed
    # and batch 1 is sampled again, the same (batch i depends only on (seed, i)).
    lines = whole.splitlines(keepends=True)  # 4 rows + marker, 4 rows + marker
    work.write_text("".join(lines[:7]) + lines[7][:5])
    magpie.sample_instructions(tiny, work, 2, batch=4, max_new_tokens=8, progress=False)
    assert work.read_text() == whole
    # Asking for more batches continues after the existing ones.
    magpie.sample_instructions(tiny, work, 3, batch=4, max_new_tokens=8, progress=False)
    assert work.read_text().startswith(whole)
    assert [r["batch"] for r in magpie.read_samples(work)] == [0] * 4 + [1] * 4 + [2] * 4


def test_clean_keeps_ended_unique_messages():
    rows = [
        {"text": "How do I bake bread at home?", "ended": True},
        {"text": "how do I bake   bread at home", "ended": True},  # the same, differently typed
        {"text": "Write a poem about the sea and the sky", "ended": False},  # cut off
        {"text": "Hi", "ended": True},  # too short
        {"text": "Explain how a rainbow forms after rain.", "ended": True},
    ]
    assert magpie.clean(rows) == [
        "How do I bake bread at home?",
        "Explain how a rainbow forms after rain.",
    ]


def test_leaks_finds_shared_ngrams():
    evals = ["Compose an engaging travel blog post about a recent trip to Hawaii, highlighting"]
    texts = [
        "compose an ENGAGING travel blog post about a recent trip to Hawaii please",
        "Write a travel blog post about Hawaii.",
        "Tell me about Hawaii",
    ]
    assert magpie.leaks(texts, evals) == [0]


def test_magpie_source_reads_the_prompt_set(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl.gz"
    magpie.write_prompts(["Question one?", "Question two?"], path)
    monkeypatch.setitem(data.MAGPIE_FILES, "magpie", path)
    got = data.load_prompts(["magpie"])
    assert [(r["prompt"], r["answer"], r["source"]) for r in got] == [
        ("Question one?", "", "magpie"),
        ("Question two?", "", "magpie"),
    ]
    with pytest.raises(
        ValueError, match="valid: \\['gsm8k', 'codealpaca', 'magpie', 'magpie_b', 'magpie_c'\\]"
    ):
        data.load_prompts(["alpaca"])


def test_build_prompt_set_drops_eval_leaks(tiny, tmp_path, monkeypatch):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    work = tmp_path / "w.jsonl"
    magpie.sample_instructions(tiny, work, 1, batch=4, max_new_tokens=12, progress=False)
    rows = magpie.read_samples(work)
    # Make every sample a clean, distinct message, one of them an eval prompt.
    for i, r in enumerate(rows):
        r.update(text=f"message number {i} about the cat and the mat today", ended=True)
    work.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"done": 0}) + "\n")
    (eval_dir / "e.jsonl").write_text(json.dumps({"turns": [rows[2]["text"]]}) + "\n")
    out = tmp_path / "p.jsonl.gz"
    counts = magpie.build_prompt_set(tiny, work, out, 1, eval_dir=eval_dir, progress=False)
    assert counts == {"sampled": 4, "ended": 4, "unique": 4, "leaked": 1, "excluded": 0, "kept": 3}
    assert magpie.read_prompts(out) == [rows[i]["text"] for i in (0, 1, 3)]
    # A second set repeats none of an earlier one (compared ignoring case and punctuation).
    earlier = [rows[1]["text"].upper() + "!"]
    counts = magpie.build_prompt_set(
        tiny, work, out, 1, eval_dir=eval_dir, exclude=earlier, progress=False
    )
    assert counts["excluded"] == 1 and counts["kept"] == 2
    assert magpie.read_prompts(out) == [rows[i]["text"] for i in (0, 3)]


def test_mix_draws_the_asked_number_of_each_source(tmp_path, monkeypatch):
    from test_train import write_train_data

    monkeypatch.setenv("SPECJAX_DATA", str(write_train_data(tmp_path)))
    path = tmp_path / "m.jsonl.gz"
    magpie.write_prompts([f"Tell me fact number {i} about owls." for i in range(6)], path)
    monkeypatch.setitem(data.MAGPIE_FILES, "magpie", path)
    mix = {"magpie": 4, "gsm8k": 3, "codealpaca": 2}
    pool = data.mix_prompts(mix, seed=0)
    assert [p["source"] for p in pool] == ["magpie"] * 4 + ["gsm8k"] * 3 + ["codealpaca"] * 2
    assert len({p["prompt"] for p in pool}) == 9
    assert pool == data.mix_prompts(mix, seed=0)  # fixed by the seed
    assert pool != data.mix_prompts(mix, seed=1)
    with pytest.raises(ValueError, match="asks for 7 prompts of 'magpie'; it has 6"):
        data.mix_prompts({"magpie": 7})
