"""Free-space check before writing: fail in the preflight, not hours later with a full disk.

Each planned output says how many bytes it should take; outputs on the same filesystem are summed
and compared with that filesystem's free space plus a margin (predictions of quantized sizes are
estimates, and a full disk hurts other programs too).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from quantkit.errors import InputError
from quantkit.table import human_bytes

MARGIN_FRACTION = 0.05  # on top of the predicted bytes
MARGIN_BYTES = 64 * 1024 * 1024  # filesystem metadata, logs, the page cache's dirty pages


class DiskSpaceError(InputError):
    """Not enough free space for the planned outputs."""


def _existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def needed(predicted: int) -> int:
    """Bytes that must be free to write ``predicted`` bytes."""
    return int(predicted * (1 + MARGIN_FRACTION)) + MARGIN_BYTES


def check_free_space(planned: Iterable[tuple[Path, int]]) -> None:
    """``planned``: (output path, predicted bytes). Raise DiskSpaceError naming the folder, the
    bytes needed (predicted + margin) and the bytes free, for the first filesystem that falls
    short."""
    by_dev: dict[int, tuple[Path, int]] = {}
    for path, size in planned:
        where = _existing(path.parent)
        dev = os.stat(where).st_dev
        first, total = by_dev.get(dev, (where, 0))
        by_dev[dev] = (first, total + max(0, int(size)))
    for where, total in by_dev.values():
        need = needed(total)
        free = shutil.disk_usage(where).free
        if need > free:
            raise DiskSpaceError(
                f"{where}: not enough free space: need {human_bytes(need)} "
                f"({human_bytes(total)} predicted + margin), {human_bytes(free)} free",
                "free some space or write elsewhere with -o",
            )
