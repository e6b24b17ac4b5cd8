"""Drafters shipped inside the package (trained by specjax for the default model)."""

from __future__ import annotations

from pathlib import Path

# name -> (target model name, directory under specjax/)
BUNDLED_DRAFTERS = {
    "smollm2-135m-eagle3": ("smollm2-135m", "weights/smollm2-135m-eagle3"),
    "smollm2-135m-eagle": ("smollm2-135m", "weights/smollm2-135m-eagle"),
    "smollm2-135m-medusa": ("smollm2-135m", "weights/smollm2-135m-medusa"),
}


def bundled_path(name: str) -> Path:
    """Directory of a drafter shipped with specjax (see BUNDLED_DRAFTERS)."""
    if name not in BUNDLED_DRAFTERS:
        raise ValueError(f"no bundled drafter {name!r}; bundled: {sorted(BUNDLED_DRAFTERS)}")
    path = Path(__file__).resolve().parents[1] / BUNDLED_DRAFTERS[name][1]
    if not path.exists():
        raise FileNotFoundError(f"bundled drafter {name!r} is missing from this install ({path})")
    return path
