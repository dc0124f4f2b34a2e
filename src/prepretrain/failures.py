"""Failures a user can cause (bad data, files, disk, a diverging run, preemption): one clear line
and an exit code each, never a traceback. The CLI prints them; the pipeline's workers record them
for their job. Config mistakes (``ConfigError``) exit with 2."""

from __future__ import annotations

import errno

from .config import ConfigError
from .data.labels.hashtags import EmptyVocabulary
from .data.readers.metadata import MetadataError
from .data.readers.releases import DataLayoutError
from .data.shards.index import UnknownSampleCount
from .files import UnsafeCheckpoint
from .models.checkpoints import CheckpointMismatch
from .train.checkpoint import CorruptCheckpoint, SuspectCheckpoint
from .train.engine import Preempted
from .train.limits import NonFiniteLoss, TooManyBadSamples

EXIT_CONFIG = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after a checkpoint; rerun to resume
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (TooManyBadSamples, 3), (UnknownSampleCount, 3), (DataLayoutError, 3), (MetadataError, 3), (EmptyVocabulary, 3),
    (CheckpointMismatch, 4), (UnsafeCheckpoint, 4), (CorruptCheckpoint, 4), (FileNotFoundError, 4),
    (NonFiniteLoss, 6), (SuspectCheckpoint, 6),
    (Preempted, EXIT_PREEMPTED),
]
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.ENOTDIR: "a part of the path is a file, not a folder",
               errno.EISDIR: "a folder stands where a file was expected", errno.EIO: "input/output error"}


def expected_failure(error: BaseException) -> tuple[int, str] | None:
    """(exit code, message) for a failure a user can cause and fix; None for a bug (traceback)."""
    if isinstance(error, ConfigError):
        return EXIT_CONFIG, str(error)
    for kind, code in EXIT_CODES:
        if isinstance(error, kind):
            return code, str(error)
    if isinstance(error, OSError) and error.errno in DISK_ERRORS:
        where = f" at {error.filename}" if error.filename else ""
        detail = f" ({error.strerror})" if error.errno == errno.EIO and error.strerror else ""
        fix = ("free space or point out_dir= elsewhere" if error.errno in (errno.ENOSPC, errno.EDQUOT) else
               "fix the path or its permissions, or point out_dir= elsewhere")
        return 5, f"{DISK_ERRORS[error.errno]}{where}{detail}: {fix}, then rerun to resume"
    return None
