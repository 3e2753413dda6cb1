"""User-facing errors: what was wrong, where, and what to do.

Anything a user can cause (bad input file, unknown model, wrong parameter) raises :class:`XiciError`; the CLI
prints it as one paragraph and exits non-zero without a traceback. Programming errors stay ordinary
exceptions so that they do show a traceback.
"""

from __future__ import annotations

import errno
import os


class XiciError(Exception):
    """An error the user can fix.

    Parameters
    ----------
    what:
        What is wrong, in one sentence.
    where:
        Where it is (a file and line, a parameter, a run id); optional.
    fix:
        What to do about it; optional.
    """

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [self.what.rstrip(".") + "."]
        if self.where:
            parts.append(f"Where: {self.where}.")
        if self.fix:
            parts.append(self.fix.rstrip(".") + ".")
        return " ".join(parts)


# OS errors that mean the machine refused a write, and what to call them. The first three are about space,
# recognised anywhere; the others only where the caller knows it was writing the lake.
_STORAGE_FAULTS = {
    errno.ENOSPC: "the disk holding the lake is full",
    errno.EDQUOT: "the disk quota of the lake's folder is used up",
    errno.EFBIG: "a file of the lake reached the size limit for files",
    errno.EACCES: "the lake is not writable",
    errno.EPERM: "the lake is not writable",
    errno.EROFS: "the lake is not writable",
}
_SPACE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# torch's CUDA and DuckDB's out-of-memory errors, named so that this module imports neither (torch's CPU
# allocator raises a RuntimeError holding the OS's ENOMEM message).
_MEMORY_FAULTS = ("OutOfMemoryError", "OutOfMemoryException")
_RESUME = "then run the same command again: committed work is kept and it continues where it stopped"


def storage_error(exc: BaseException, where: str | None = None) -> XiciError | None:
    """The error for a write of the lake the machine refused (disk full, quota, size limit, not writable),
    else None. An OSError tells by its errno; DuckDB reports space faults as text holding the OS's message.
    """
    code = getattr(exc, "errno", None)
    if code not in _STORAGE_FAULTS:
        code = next((c for c in _SPACE_FAULTS if os.strerror(c) in str(exc)), None)
    if code is None:
        return None
    return XiciError(
        f"{_STORAGE_FAULTS[code]} ({os.strerror(code)})",
        where=where,
        fix=f"free space or fix permissions, {_RESUME}",
    )


def machine_fault(exc: BaseException) -> XiciError | None:
    """The error for a fault of the machine met anywhere below a command (no space left, no memory), else
    None. Looks through the chain of causes, since libraries wrap what the OS said."""
    seen: BaseException | None = exc
    while seen is not None:
        if (
            isinstance(seen, MemoryError)
            or type(seen).__name__ in _MEMORY_FAULTS
            or os.strerror(errno.ENOMEM) in str(seen)
        ):
            first_line = (str(seen).strip().splitlines() or [type(seen).__name__])[0]
            return XiciError(
                f"out of memory ({first_line})",
                fix="lower --batch-size (or --max-new-tokens, or --gpu-memory-utilization with vLLM), or "
                f"free memory, {_RESUME}",
            )
        code = getattr(seen, "errno", None)
        if code in _SPACE_FAULTS or any(os.strerror(c) in str(seen) for c in _SPACE_FAULTS):
            return storage_error(seen)
        seen = seen.__cause__ or seen.__context__
    return None
