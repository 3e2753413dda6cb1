-- Where a sequence's gate sums are in the gate store (runs/R/gate_sums, or its shard's): rows
-- [sums_start, sums_start + n_sums). What sql/gate_sums.sql gives for the sequence, written with its tokens,
-- so that building the means reads these rows instead of every token (warehouse/gates.py). NULL: none kept
-- (a run recorded before xici kept them, or a sequence with a gate weight that is not a finite number); the
-- means of such a run are taken from its gates.
ALTER TABLE sequences ADD COLUMN sums_start BIGINT;
ALTER TABLE sequences ADD COLUMN n_sums INTEGER;
