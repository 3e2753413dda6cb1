-- seq_means: m[s, l, e], the mean gate weight of expert e at MoE layer l over ALL tokens of sequence s
-- (method.md, Eq. 1). A token that did not select the expert contributes 0, so the sum of its weights is
-- divided by the sequence's token count, not by the number of tokens that selected it.
--
-- `sums` names a relation shaped like the output of gate_sums.sql (seq_id, layer, expert, weight_sum,
-- n_selected). xici stores what this macro gives in the table of the same name, `seq_means`, once per run
-- (`from seq_means` is the stored table, `from seq_means('...')` computes it), computed from the gate sums
-- recorded with the sequences (analysis/means_kernel.py; a test checks the bits); by hand, over any
-- relation shaped like `token_gates` (see gate_sums.sql):
--     with sums as (from gate_sums('my_gates')) select * from seq_means('sums');
--
-- Determinism: weights are summed as integers in units of 2^-32 (gate_sums.sql) and the mean is rounded
-- to a multiple of 2^-32 (2.3e-10, far below float16 gate precision). Every later sum of m over
-- sequences (language means) is then exact in DOUBLE, so results do not depend on the order DuckDB's
-- parallel aggregation adds rows in: the same recorded data always gives the same bits.
--
-- Output: run_id, seq_id, layer, expert, m (> 0 only: a missing row means m = 0) and seq_rank, the rank
-- of m among the sequence's (layer, expert) pairs over all layers (1 = largest; ties share a rank),
-- which the blacklist reads, and n_selected, the number of the sequence's tokens that selected the expert
-- (its routing frequency times the token count: what the risk-difference localizer contrasts).
CREATE OR REPLACE MACRO seq_means(sums) AS TABLE
WITH means AS (
    SELECT s.run_id, w.seq_id, w.layer, w.expert,
           round(w.weight_sum / s.n_tokens) / 4294967296 AS m, w.n_selected
    FROM query_table(sums) w JOIN sequences s ON s.seq_id = w.seq_id
)
SELECT run_id, seq_id, layer, expert, m,
       rank() OVER (PARTITION BY seq_id ORDER BY m DESC)::INTEGER AS seq_rank, n_selected
FROM means
WHERE m > 0;
