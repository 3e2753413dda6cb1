-- Per sequence, MoE layer and expert: the sum of the gate weights of the sequence's tokens that selected
-- the expert, and how many did. The first half of the sequence means (method.md, Eq. 1; seq_means.sql
-- takes it from here).
--
-- `gates` names a relation shaped like xici's `token_gates` (seq_id, pos, layer, expert, weight): one row
-- per token, MoE layer and selected expert, e.g. a Parquet export:
--     create view my_gates as from 'gates.parquet';
--     create view my_sums as from gate_sums('my_gates');
--     select * from seq_means('my_sums');
-- Inside xici the same integers are added in compiled code as each sequence is recorded and kept next to its
-- gates (warehouse/sums_kernel.py; gate_sums in the gate store), and seq_means and lang_means are taken from
-- them (analysis/means_kernel.py), so no row of token_gates is built; tests check that both give the same
-- bits.
--
-- Determinism: each weight is rounded to a whole number of units of 2^-32 (2.3e-10, far below float16 gate
-- precision) and the integers are added, so the sum does not depend on the order DuckDB's parallel
-- aggregation adds rows in.
--
-- Output: seq_id, layer, expert, weight_sum (BIGINT, units of 2^-32), n_selected (tokens that selected it).
CREATE OR REPLACE MACRO gate_sums(gates) AS TABLE
SELECT seq_id, layer, expert, sum(round(weight::DOUBLE * 4294967296)::BIGINT)::BIGINT AS weight_sum,
       count(*)::INTEGER AS n_selected
FROM query_table(gates)
GROUP BY seq_id, layer, expert;
