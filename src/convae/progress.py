"""Progress bars: one way to make one, and one way to have none.

Library functions take ``progress: bool`` and call :func:`progress_bar`; with False they get
a bar that does nothing, so no caller branches on whether a bar exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class NoBar:
    """Stands in for a tqdm bar when progress is off: every call does nothing."""

    n = 0
    total = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_bar(
    enabled: bool,
    total: float | None = None,
    *,
    initial: float = 0,
    unit: str = "img",
    desc: str | None = None,
    leave: bool = True,
    unit_scale: bool = False,
):
    """A tqdm bar on stderr, or a :class:`NoBar` when not `enabled`; the caller closes it."""
    if not enabled:
        return NoBar()
    from tqdm.auto import tqdm  # only when a bar is wanted: tqdm's import is not free

    return tqdm(
        total=total, initial=initial, unit=unit, desc=desc, leave=leave, unit_scale=unit_scale, dynamic_ncols=True
    )


@contextlib.contextmanager
def progress_bar(
    enabled: bool,
    total: float | None = None,
    *,
    initial: float = 0,
    unit: str = "img",
    desc: str | None = None,
    leave: bool = True,
    unit_scale: bool = False,
) -> Iterator[Any]:
    """:func:`make_bar` as a context manager that closes the bar however the block ends."""
    bar = make_bar(enabled, total, initial=initial, unit=unit, desc=desc, leave=leave, unit_scale=unit_scale)
    try:
        yield bar
    finally:
        bar.close()
