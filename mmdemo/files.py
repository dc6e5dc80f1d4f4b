"""Small file-system helpers shared by the parts that publish folders (exports, fine-tuned checkpoints)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_folder(staging: Path, final: Path) -> None:
    """Put the complete folder ``staging`` at ``final`` by renames, so that ``final`` is never half written.

    An earlier ``final`` is moved aside first (a hidden sibling), then deleted once the new one is in place.
    ``staging`` must be on the same file system as ``final`` (a sibling, typically).
    """
    if final.is_dir():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
