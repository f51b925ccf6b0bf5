"""CRIU: the image directory (``images``) and the ``criu`` binary (``runner``).

CRIU does the final checkpoint and the restore; migrator only reads and
rewrites the memory part of its image directory, so that the pages that
were pre-copied need not cross the network again (see ARCHITECTURE.md,
"Data flow").
"""

from migrator.criu.images import (  # noqa: F401
    ImageError,
    Pagemap,
    PagemapEntry,
    dumped_runs,
    image_files,
    iter_pages,
    read_pagemap,
)
from migrator.criu.runner import CriuError  # noqa: F401
