"""The docs match the code: README's test command is the one CI runs, every file README and
benchmarks/RESULTS.md link to or tell the reader to run exists, and every `specjax` subcommand
README shows is one the CLI has (and every one it has is shown). No model is loaded."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md"]


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_readme_test_command_is_what_ci_runs():
    readme = _text(ROOT / "README.md")
    block = re.search(r"Run the tests:\s*```bash\n(.*?)```", readme, re.S).group(1)
    readme_cmd = block.split("&&")[-1].strip()
    ci = [ln.strip() for ln in _text(ROOT / ".ci" / "run").splitlines()]
    assert readme_cmd.startswith("python -m pytest") and readme_cmd in ci, (readme_cmd, ci[-3:])


def test_linked_and_named_files_exist():
    """Markdown links with a relative target, and `python benchmarks/X.py` / `bash
    benchmarks/X.sh` commands, in README and the measurement log."""
    missing = []
    for doc in DOCS:
        text = _text(doc)
        links = re.findall(r"\]\(([^)#\s]+)\)", text)
        scripts = re.findall(r"(?:python|bash)\s+(benchmarks/[\w./-]+\.(?:py|sh))", text)
        for target in links:
            if "://" not in target and not (doc.parent / target).exists():
                missing.append(f"{doc.name}: link {target}")
        missing += [f"{doc.name}: {s}" for s in scripts if not (ROOT / s).exists()]
        for table in re.findall(r"`(benchmarks/results/[\w.-]+\.(?:md|png))`", text):
            if not (ROOT / table).exists():
                missing.append(f"{doc.name}: {table}")
    assert not missing, missing


def test_readme_cli_block_lists_every_subcommand():
    from specjax import cli

    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "cmd"]
    have = set(sub.choices)
    readme = _text(ROOT / "README.md")
    block = readme[readme.index("## CLI") :]
    block = block[block.index("```") + 3 :]
    block = block[: block.index("```")]
    shown = set(re.findall(r"^specjax ([a-z-]+)", block, re.M))
    assert shown == have, (sorted(shown - have), sorted(have - shown))
