-- m[s, l, e]: the mean gate weight of expert e at MoE layer l over ALL tokens of sequence s
-- (method.md, Eq. 1). A token that did not select the expert contributes 0, so the sum of its weights is
-- divided by the sequence's token count, not by the number of tokens that selected it.
--
-- `gates` names a relation shaped like xici's `token_gates` (seq_id, pos, layer, expert, weight): one row
-- per token, MoE layer and selected expert. It exists only inside xici, streamed from Zarr, which
-- materialises this macro into the table `seq_means` once per run; by hand, point it at any relation
-- with those columns, e.g. a Parquet export:
--     create view my_gates as from 'gates.parquet';
--     select * from sequence_means('my_gates');
--
-- Determinism: weights are summed as integers in units of 2^-32 and the mean is rounded to a multiple of
-- 2^-32 (2.3e-10, far below float16 gate precision). Every later sum of m over sequences (language
-- means) is then exact in DOUBLE, so results do not depend on the order DuckDB's parallel aggregation
-- adds rows in: the same recorded data always gives the same bits.
--
-- Output: run_id, seq_id, layer, expert, m (> 0 only: a missing row means m = 0) and seq_rank, the rank
-- of m among the sequence's (layer, expert) pairs over all layers (1 = largest; ties share a rank),
-- which the blacklist reads, and n_selected, the number of the sequence's tokens that selected the expert
-- (its routing frequency times the token count: what the risk-difference localizer contrasts).
CREATE OR REPLACE MACRO sequence_means(gates) AS TABLE
WITH sums AS (
    SELECT seq_id, layer, expert, sum(round(weight::DOUBLE * 4294967296)::BIGINT) AS weight_sum,
           count(*)::INTEGER AS n_selected
    FROM query_table(gates)
    GROUP BY seq_id, layer, expert
), means AS (
    SELECT s.run_id, w.seq_id, w.layer, w.expert,
           round(w.weight_sum / s.n_tokens) / 4294967296 AS m, w.n_selected
    FROM sums w JOIN sequences s ON s.seq_id = w.seq_id
)
SELECT run_id, seq_id, layer, expert, m,
       rank() OVER (PARTITION BY seq_id ORDER BY m DESC)::INTEGER AS seq_rank, n_selected
FROM means
WHERE m > 0;
