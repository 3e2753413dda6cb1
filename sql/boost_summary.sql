-- The boost experiment (xici ablate --boost DELTA; method.md "Instruments"): per boost run, of the pairs
-- wrong before the share now right (gain rate) and of those right before the share now wrong (loss rate),
-- and how often the boosted experts were selected, as a share of the (token, boosted expert) pairs, in the
-- boosted answers and in the recorded ones (the routing check: boosted experts must be selected more).
--     select * from boost_summary order by analysis_id, boost, condition;
CREATE OR REPLACE VIEW boost_summary AS
SELECT b.analysis_id, b.run_id, b.boost, b.condition, b.seed, b.questions,
       m.n_questions, m.n_wrong_before, m.n_now_right, m.sgr AS gain_rate,
       m.n_correct_before, m.n_now_wrong, m.asr AS loss_rate,
       b.selected_before, b.selected_after, b.checked_tokens
FROM ablations b
JOIN ablation_metrics m USING (run_id)
WHERE b.mode = 'boost';
