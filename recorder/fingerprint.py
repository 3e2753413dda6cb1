"""What a run was recorded with: a fingerprint of the checkpoint's files, fast on 60 GB of weights.

Every file of the checkpoint folder is named with its size and a hash, but those that cannot change the
model: hidden files and folders (the hub's download metadata), documentation, licences and pictures
(:data:`IGNORED_SUFFIXES`, :data:`IGNORED_PREFIXES`). Files up to :data:`FULL_HASH_BYTES` (config,
tokenizer, chat template, index) are hashed whole. Larger ones (the weights) are hashed from their
safetensors header (tensor names, dtypes, shapes and offsets) and :data:`SAMPLES` blocks of
:data:`SAMPLE_BYTES` spread evenly over the file, first and last included: about 4 MiB read per weight
file, so a 60 GB checkpoint is fingerprinted in seconds, and any replaced or retrained weights change it.
An edit of a few values that falls between the samples is not seen; the sizes, names and headers always are.

A hub id is fingerprinted from its snapshot in the local hub cache (the files the model is loaded from).
Recording stores the fingerprint with the run; ablating, judging with the recorded model and resuming a
recording compare the checkpoint they are given with it (:func:`check_model`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from xici.errors import XiciError

FULL_HASH_BYTES = 64 << 20
SAMPLES = 64
SAMPLE_BYTES = 64 << 10
#: Files that cannot change what the model computes: a README or licence edited or added is no new model.
IGNORED_SUFFIXES = (".md", ".pdf", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".ipynb")
IGNORED_PREFIXES = ("LICENSE", "LICENCE", "NOTICE", "USE_POLICY")
#: Bump when the way files are hashed changes (fingerprints of two versions are not compared).
FINGERPRINT_VERSION = 1


def checkpoint_folder(model: str) -> Path | None:
    """The folder a model is loaded from: a local checkpoint, or a hub id's snapshot in the hub cache
    (None when it is not cached)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError, OSError, ValueError):
        return None


def fingerprint(model: str, *, full_hash_bytes: int = FULL_HASH_BYTES) -> dict[str, Any] | None:
    """{"version", "files": {relative path: {"size", "sha256"}}} of a checkpoint; None when it has no
    local folder (a hub id that is not cached: then it cannot be loaded either)."""
    folder = checkpoint_folder(model)
    if folder is None:
        return None
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file() or _ignored(path):
            continue
        size = path.stat().st_size
        files[relative.as_posix()] = {"size": size, "sha256": _file_hash(path, size, full_hash_bytes)}
    return {"version": FINGERPRINT_VERSION, "files": files}


def _ignored(path: Path) -> bool:
    return path.suffix.lower() in IGNORED_SUFFIXES or path.name.upper().startswith(IGNORED_PREFIXES)


def _file_hash(path: Path, size: int, full_hash_bytes: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= full_hash_bytes:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
            return digest.hexdigest()
        digest.update(b"sampled:")
        if path.suffix == ".safetensors":
            length = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(min(length, size - 8)))
        last = size - SAMPLE_BYTES
        for i in range(SAMPLES):
            handle.seek(last * i // (SAMPLES - 1))
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def changes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, file by file (empty: the same checkpoint)."""
    if recorded.get("version") != now.get("version"):
        return []  # hashed differently: nothing to compare
    before, after = recorded["files"], now["files"]
    found = [f"{name} is missing" for name in sorted(before.keys() - after.keys())]
    found += [f"{name} was added" for name in sorted(after.keys() - before.keys())]
    for name in sorted(before.keys() & after.keys()):
        if before[name]["size"] != after[name]["size"]:
            found.append(f"{name} changed size ({before[name]['size']:,} -> {after[name]['size']:,} bytes)")
        elif before[name]["sha256"] != after[name]["sha256"]:
            found.append(f"{name} changed content")
    return found


@dataclass(frozen=True)
class ModelCheck:
    """A checkpoint compared with the one a run was recorded with: where it is, its fingerprint, and the
    changes ``--allow-changed-model`` let through (stored with the run that uses it: :attr:`params`)."""

    model: str
    fingerprint: dict[str, Any] | None
    allowed: bool = False
    changes: tuple[str, ...] = ()

    @property
    def params(self) -> dict[str, Any]:
        return {
            "model_fingerprint": self.fingerprint,
            "allow_changed_model": self.allowed,
            "model_changes": list(self.changes),
        }


def note_changes(con: duckdb.DuckDBPyConnection, run_id: int, check: ModelCheck) -> None:
    """Store the changes ``--allow-changed-model`` let through with a run that already existed (a new run
    gets them in its params)."""
    if check.changes:
        allowed = {"allow_changed_model": True, "model_changes": list(check.changes)}
        con.execute(
            "update runs set params = json_merge_patch(params, ?) where run_id = ?",
            [json.dumps(allowed), run_id],
        )


def check_model(
    model: str,
    recorded: dict[str, Any] | None,
    *,
    run_id: int,
    allow_changed: bool,
    where: str,
    moved: str = "--model",
) -> ModelCheck:
    """Refuse a checkpoint whose fingerprint is not the one run ``run_id`` was recorded with, naming what
    changed, unless ``allow_changed``. A run recorded before runs were fingerprinted (``recorded`` None)
    passes: only its config hash is known, checked where the config is read. So does a hub id that is not in
    the hub cache (it is downloaded when loaded: nothing local to compare). ``moved`` is the option that
    names a checkpoint that moved."""
    if checkpoint_folder(model) is None and (Path(model).is_absolute() or model.startswith((".", "~"))):
        raise XiciError(
            f"the checkpoint run {run_id} was recorded with is not at {model}",
            where=where,
            fix=f"pass {moved} with the folder it is in now (it is accepted when its files are the same), or "
            "restore it there",
        )
    now = fingerprint(model)
    found = changes(recorded, now) if recorded is not None and now is not None else []
    if found and not allow_changed:
        listed = "; ".join(found[:6]) + (f"; and {len(found) - 6} more" if len(found) > 6 else "")
        raise XiciError(
            f"the checkpoint at {model} is not the one run {run_id} was recorded with: {listed}",
            where=where,
            fix=f"restore the checkpoint the run was recorded with (or pass {moved} with where it is now); "
            "--allow-changed-model goes on with this one and stores that with the run",
        )
    return ModelCheck(model, now, allow_changed, tuple(found))
