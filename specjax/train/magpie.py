"""Instructions written by the target itself (Magpie): give an instruct model its chat template
up to the start of a user turn and sample what it writes there. The user messages it writes cover
what it was tuned on (writing, roleplay, reasoning, math, coding, extraction, STEM, humanities),
which is what users ask; the target then answers them (self-distillation, `data.build_dataset`).

The sampled file is a JSONL of `{"id", "prompt"}`, appended one batch at a time: a killed run
resumes after the last whole batch, and batch i's sample depends only on (seed, i). `clean` keeps
the messages that ended on their own, deduplicated; `leaks` finds any that share a word n-gram
with an eval prompt, so that none reaches training.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specjax.model import Model
    from specjax.paths import StrPath

MARK = "\x00MAGPIE\x00"


def user_turn_prefix(model: Model) -> list[int]:
    """Token ids of the chat template up to where a user's message starts (system turn
    included when the template adds one)."""
    tok = model.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError(f"model {model.name!r} has no chat template: Magpie needs one")
    text = tok.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False)
    if MARK not in text:
        raise ValueError("the chat template does not place the user's message in its text")
    return [int(i) for i in tok.encode(text.split(MARK)[0], add_special_tokens=False)]


def _done_batches(path: Path) -> int:
    """Whole batches already in `path`: each batch ends with a {"done": b} line, and whatever
    follows the last one (a batch cut by a kill) is removed."""
    if not path.exists():
        return 0
    done, good, offset = 0, 0, 0
    with open(path, "rb") as f:
        for line in f:
            offset += len(line)
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except ValueError:
                break
            if "done" in rec:
                done, good = rec["done"] + 1, offset
    with open(path, "r+b") as f:
        f.truncate(good)
    return done


def read_samples(path: StrPath) -> list[dict]:
    """The sampled rows of a `sample_instructions` file (without the batch markers)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "done" not in r]


def sample_instructions(
    model: Model,
    out: StrPath,
    n_batches: int,
    *,
    batch: int = 32,
    seed: int = 0,
    max_new_tokens: int = 96,
    temperature: float = 1.0,
    top_p: float | None = None,
    progress: bool = True,
) -> Path:
    """Append `n_batches` batches of sampled user messages to the JSONL `out` (resuming after
    the batches already there). Each line: {"batch", "row", "text", "ended"}, where `ended`
    says the model closed the turn itself (EOS) rather than running out of tokens; a
    {"done": batch} line closes each batch (`read_samples` reads the rows)."""
    import jax
    from tqdm.auto import tqdm

    from specjax.api import generate

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = user_turn_prefix(model)
    eos = model.tokenizer.eos_token_id
    start = _done_batches(out)
    bar = tqdm(
        total=n_batches,
        initial=min(start, n_batches),
        desc="magpie instructions",
        disable=not progress,
    )
    for b in range(start, n_batches):
        key = jax.random.fold_in(jax.random.key(seed), b)
        res = generate(
            model,
            [prefix] * batch,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            key=key,
            chat=False,
        )
        lines = []
        for r, ids in enumerate(res.tokens):
            ended = bool(ids) and ids[-1] == eos
            text = model.decode(ids[:-1] if ended else ids)
            lines.append(json.dumps({"batch": b, "row": r, "text": text, "ended": ended}))
        lines.append(json.dumps({"done": b}))
        with open(out, "a") as f:
            f.write("\n".join(lines) + "\n")
        bar.update(1)
    bar.close()
    return out


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def clean(rows: Iterable[dict], min_chars: int = 16, max_chars: int = 2000) -> list[str]:
    """Messages the model ended itself, of a sane length, first copy of each (compared with
    case, punctuation and spacing ignored), in sample order."""
    seen, out = set(), []
    for r in rows:
        text = r["text"].strip()
        key = _norm(text)
        if not r["ended"] or not min_chars <= len(text) <= max_chars or key in seen:
            continue
        if len(key.split()) < 4:
            continue
        seen.add(key)
        out.append(text)
    return out


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _norm(text).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def leaks(texts: Sequence[str], eval_texts: Iterable[str], n: int = 8) -> list[int]:
    """Indices of `texts` sharing any word n-gram (lower-cased, punctuation dropped) with any of
    `eval_texts`."""
    bad: set[tuple[str, ...]] = set()
    for t in eval_texts:
        bad |= ngrams(t, n)
    return [i for i, t in enumerate(texts) if ngrams(t, n) & bad]


def eval_prompt_texts(eval_dir: StrPath) -> list[str]:
    """Every turn of every eval file (*.jsonl with "turns")."""
    texts = []
    for path in sorted(Path(eval_dir).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                texts.extend(json.loads(line).get("turns", []))
    return texts


def write_prompts(texts: Sequence[str], path: StrPath) -> None:
    """The compact committed form: gzipped JSONL of {"prompt"}."""
    with gzip.open(path, "wt", compresslevel=9) as f:
        for t in texts:
            f.write(json.dumps({"prompt": t}) + "\n")


def read_prompts(path: StrPath) -> list[str]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def build_prompt_set(
    model: Model,
    work: StrPath,
    out: StrPath,
    n_batches: int,
    *,
    eval_dir: StrPath | None = None,
    batch: int = 32,
    seed: int = 0,
    exclude: Sequence[str] = (),
    progress: bool = True,
) -> dict:
    """Sample `n_batches` batches into the JSONL `work` (resuming), then write the cleaned
    messages that share no 8-word n-gram with any eval prompt (of `eval_dir`, default the
    shared data's eval/ folder; it must exist) and repeat none of `exclude` (an earlier set:
    compared as `clean` compares) to `out` (`write_prompts`) -> counts."""
    from specjax.paths import data_file

    eval_dir = eval_dir or data_file("eval")
    if eval_dir is None or not Path(eval_dir).is_dir():
        raise FileNotFoundError(
            "the eval prompts are needed to check that none leaks into training: set "
            "SPECJAX_DATA to the data folder holding eval/*.jsonl, or pass eval_dir"
        )
    sample_instructions(model, work, n_batches, batch=batch, seed=seed, progress=progress)
    rows = read_samples(work)
    texts = clean(rows)
    bad = set(leaks(texts, eval_prompt_texts(eval_dir)))
    seen = {_norm(t) for t in exclude}
    repeats = {i for i, t in enumerate(texts) if _norm(t) in seen}
    dropped = bad | repeats
    keep = [t for i, t in enumerate(texts) if i not in dropped]
    write_prompts(keep, out)
    return {
        "sampled": len(rows),
        "ended": sum(r["ended"] for r in rows),
        "unique": len(texts),
        "leaked": len(bad),
        "excluded": len(repeats - bad),
        "kept": len(keep),
    }
