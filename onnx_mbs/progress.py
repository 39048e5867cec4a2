"""One progress bar for every long loop: on stderr, only when a person is watching."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "img") -> tqdm:
    """A tqdm bar on stderr, shown only when enabled and stderr is a terminal (not in CI logs)."""
    from tqdm import tqdm  # here: `reduce` without data shows no bar

    return tqdm(
        total=total,
        unit=unit,
        desc=desc,
        file=sys.stderr,
        disable=not (enabled and sys.stderr.isatty()),
        leave=False,
    )
