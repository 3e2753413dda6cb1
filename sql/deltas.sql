-- Language-subtracted deltas (method.md, Eq. 2): delta[s, l, e] = m[s, l, e] - mean of m[., l, e] over the
-- run's sequences in the language of s.
--
-- Dense on purpose: one row for EVERY sequence of run `run` and every (layer, expert) of the model. An
-- expert the sequence never used has m = 0 and delta = -(language mean): zeros are values, not missing
-- rows, and the Mann-Whitney test ranks them. Reads the materialised tables seq_means and lang_means.
--
-- A reference definition: the analysis builds the same matrices in numpy, a question at a time
-- (analysis/identify.py, compute_tests), and tests/test_analysis.py keeps the two equal
-- (test_python_deltas_are_the_sql_deltas_macro). Use this macro to look at deltas by hand.
--     select * from deltas(1) where question_id = 'q0007' and layer = 12 and expert = 3;
CREATE OR REPLACE MACRO deltas(run) AS TABLE
WITH shape AS (
    SELECT n_moe_layers, n_experts FROM runs WHERE run_id = run
), grid AS (
    SELECT l.layer::SMALLINT AS layer, e.expert::SMALLINT AS expert
    FROM (SELECT unnest(range(n_moe_layers)) AS layer FROM shape) l,
         (SELECT unnest(range(n_experts)) AS expert FROM shape) e
)
SELECT s.seq_id, s.question_id, s.lang, g.layer, g.expert,
       coalesce(m.m, 0) AS m,
       coalesce(lm.mean, 0) AS lang_mean,
       coalesce(m.m, 0) - coalesce(lm.mean, 0) AS delta
FROM sequences s
CROSS JOIN grid g
LEFT JOIN seq_means m
       ON m.run_id = run AND m.seq_id = s.seq_id AND m.layer = g.layer AND m.expert = g.expert
LEFT JOIN lang_means lm
       ON lm.run_id = run AND lm.lang = s.lang AND lm.layer = g.layer AND lm.expert = g.expert
WHERE s.run_id = run;
