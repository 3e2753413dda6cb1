-- Rival localizers and the ablations of the method's own steps (docs/method.md, "Rival localizers").
-- analyses: which localizer chose the sets (xici, risk-diff, median-diff), whether the language mean was
-- subtracted and the blacklist applied, and how many experts a rival keeps per question (matched: as many
-- as XICI's set of the same parameters; cap: up to max_experts). Analyses stored before are XICI's with
-- both steps.
ALTER TABLE analyses ADD COLUMN method VARCHAR DEFAULT 'xici';
ALTER TABLE analyses ADD COLUMN lang_mean BOOLEAN DEFAULT true;
ALTER TABLE analyses ADD COLUMN blacklist BOOLEAN DEFAULT true;
ALTER TABLE analyses ADD COLUMN budget VARCHAR DEFAULT 'matched';
-- What a rival localizer ranked a kept expert by (risk difference, median difference); NULL for XICI,
-- which ranks by p and median difference together.
ALTER TABLE analysis_experts ADD COLUMN score DOUBLE;
-- Tokens of the sequence that selected the expert (routing frequency x token count). Means built before
-- lack it, so every run's means are rebuilt on next use (they are a pure function of the stored gates).
ALTER TABLE seq_means ADD COLUMN n_selected INTEGER;
-- The language mean of that frequency (sql/lang_means.sql), beside the mean of m.
ALTER TABLE lang_means ADD COLUMN frequency DOUBLE;
DELETE FROM seq_means_builds;
