"""Stable keys: what identifies a run or an analysis, as the sha256 of its defining fields in JSON.

Keys are stored in the warehouse and compared across versions and machines, so the serialisation must never
change: keys sorted, JSON's default separators, no fallback for values JSON cannot hold (a key field that
is not plain data is a bug, not something to stringify).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def stable_key(fields: Mapping[str, Any]) -> str:
    """The hex sha256 of ``fields`` as sorted JSON: equal fields give equal keys, in any order."""
    return hashlib.sha256(json.dumps(dict(fields), sort_keys=True).encode()).hexdigest()
