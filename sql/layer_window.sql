-- The MoE layers an analysis keeps (method.md, Stage 2, step 1): the first and last layers do
-- language-specific processing and are excluded. The window is the half-open range of MoE-layer indices
-- [first_layer, stop_layer), counted from 0 and clipped to the run's layers.
-- Qwen3-30B-A3B (48 MoE layers, first 6 and last 6 excluded):   select * from layer_window(1, 6, 42);
-- GLM-4.5-Air (45 MoE layers after one dense layer; model layers 6..40 kept): layer_window(1, 5, 40).
--
-- A reference definition: the analysis selects the window's columns in numpy (analysis/identify.py,
-- QuestionTests.columns; --layers outside the run's layers is refused there rather than clipped), and
-- tests/test_analysis.py keeps the two equal (test_the_tested_layers_are_the_sql_layer_window).
CREATE OR REPLACE MACRO layer_window(run, first_layer, stop_layer) AS TABLE
SELECT unnest(range(greatest(first_layer, 0), least(stop_layer, n_moe_layers)))::SMALLINT AS layer
FROM runs
WHERE run_id = run;
