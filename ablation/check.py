"""Proof of deactivation: no deactivated expert got weight on any token of an ablation run.

The check reads what was stored, not what the runner meant to do: the run's sequences and token ranges and
its deactivated sets from the warehouse, the top-k expert ids of every token and MoE layer from Zarr. For
each sequence, none of its question's deactivated (layer, expert) pairs may appear in the top-k of any of
its tokens at that layer. A pair outside the top-k has gate weight 0 (method.md, "Notation"), so this is
exactly "no weight on any token".

The same count serves the boost (the experts' logits raised instead): there it is how often the boosted
experts were selected, in the boosted answers and in the recorded answers of the same pairs
(``routing_of``), as a share of the (token, boosted expert) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np

from xici.warehouse import Lake

#: Tokens read from Zarr at a time (whole sequences; a longer sequence is read alone).
TOKENS_PER_READ = 1 << 16


@dataclass(frozen=True)
class DeactivationCheck:
    """Tokens checked, and how many (token, layer) top-k selections fell on a deactivated expert."""

    checked_tokens: int
    violations: int
    opportunities: int = 0  # (token, expert of its set) pairs: what the selections are a share of

    @property
    def proven(self) -> bool:
        return self.violations == 0

    @property
    def selected_share(self) -> float | None:
        """Of the (token, expert of its question's set) pairs, the share in which the expert was selected."""
        return self.violations / self.opportunities if self.opportunities else None


def check_deactivation(
    lake: Lake, run_id: int, *, routing_of: int | None = None, tokens_per_read: int = TOKENS_PER_READ
) -> DeactivationCheck:
    """Check every committed token of ablation run ``run_id`` against its question's deactivated experts;
    ``routing_of``: count in that run's sequences of the same questions instead (the recorded run)."""

    def read(con: duckdb.DuckDBPyConnection) -> tuple[tuple[int, int], dict[str, Any], dict[str, Any]]:
        shape = con.execute("select n_moe_layers, n_experts from runs where run_id = ?", [run_id]).fetchone()
        seqs = con.execute(
            "select seq_id, question_id, coalesce(shard, -1) as shard, token_start, n_tokens from sequences"
            " where run_id = $read and question_id in (select question_id from sequences where run_id = $run)"
            " order by shard nulls first, token_start",
            {"run": run_id, "read": run_id if routing_of is None else routing_of},
        ).fetchnumpy()
        off = con.execute(
            "select question_id, layer, expert from ablation_experts where run_id = ?", [run_id]
        ).fetchnumpy()
        return shape, seqs, off

    (n_layers, n_experts), seqs, off = lake.read(read)
    questions = np.unique(np.concatenate([seqs["question_id"], off["question_id"]]))
    masks = np.zeros((len(questions), n_layers, n_experts), dtype=bool)
    masks[np.searchsorted(questions, off["question_id"]), off["layer"], off["expert"]] = True
    seq_question = np.searchsorted(questions, seqs["question_id"])
    lengths = seqs["n_tokens"].astype(np.int64)

    gates = lake.gates(read_only=True)
    layers = np.arange(n_layers)[None, :, None]
    set_sizes = masks.sum(axis=(1, 2))
    opportunities = int((lengths * set_sizes[seq_question]).sum())
    tokens = violations = 0
    blocks = gates.read_sequences(
        run_id if routing_of is None else routing_of,
        seqs["shard"],
        seqs["token_start"].astype(np.int64),
        lengths,
        tokens_per_read=tokens_per_read,
        seq_ids=seqs["seq_id"],
    )
    for which, block in blocks:
        owner = np.repeat(seq_question[which], lengths[which])
        violations += int(masks[owner[:, None, None], layers, block.topk_ids.astype(np.int64)].sum())
        tokens += len(block)
    return DeactivationCheck(tokens, violations, opportunities)
