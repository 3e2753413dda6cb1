-- Two more things an ablation run records (docs/method.md, "Choices where the paper is open"):
-- the condition 'none' (every question asked again with nothing switched off: the noise floor), and
-- random_pool, where a random baseline drew its sets: 'window' (every expert of the analysed layers, the
-- paper's reading) or 'window-minus-blacklist' (the same without the analysis' generalists). Random runs
-- made before there was a choice drew from the window minus the blacklist.
-- DuckDB cannot alter a CHECK constraint, so the table is copied into its new shape.
CREATE TABLE ablations_0008 (
    run_id         INTEGER PRIMARY KEY,        -- the ablation run (runs.kind = 'ablation')
    analysis_id    INTEGER NOT NULL,
    source_run_id  INTEGER NOT NULL,           -- the recorded run the analysis read: the answers before
    condition      VARCHAR NOT NULL CHECK (condition IN ('xici', 'random', 'shuffle', 'none')),
    seed           INTEGER,                    -- seed of a baseline's draw; NULL where nothing is drawn
    grader         VARCHAR NOT NULL,           -- the analysis' grader: grades before and after ablation
    checked_tokens BIGINT,                     -- tokens whose stored routing was checked; NULL until finished
    violations     BIGINT,                     -- selections of a deactivated expert among them (0 = proven)
    random_pool    VARCHAR CHECK (random_pool IN ('window', 'window-minus-blacklist')),  -- random only
    CHECK ((condition = 'random') = (random_pool IS NOT NULL))
);
INSERT INTO ablations_0008
SELECT run_id, analysis_id, source_run_id, condition, seed, grader, checked_tokens, violations,
       CASE WHEN condition = 'random' THEN 'window-minus-blacklist' END
FROM ablations;
DROP TABLE ablations;
ALTER TABLE ablations_0008 RENAME TO ablations;
