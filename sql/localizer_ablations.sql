-- Rival localizers side by side (method.md, "Rival localizers"): one row per ablated analysis and
-- condition, with the localizer that chose the sets, the steps it kept, how many experts it chose, and the
-- ablation's rates (a baseline's seeds pooled: counts summed, rates recomputed; runs limited to the first
-- N questions, xici ablate --questions N, apart).
--     select * from localizer_ablations where run_id = 1 order by analysis_id, condition;
CREATE OR REPLACE VIEW localizer_ablations AS
WITH pooled AS (
    SELECT b.analysis_id, b.condition, b.questions,
           sum(m.n_questions) AS n_questions,
           sum(m.n_correct_before) AS n_correct_before,
           sum(m.n_now_wrong) AS n_now_wrong,
           sum(m.n_wrong_before) AS n_wrong_before,
           sum(m.n_now_right) AS n_now_right,
           sum(b.violations) AS violations
    FROM ablations b
    JOIN ablation_metrics m USING (run_id)
    WHERE b.mode = 'deactivate' AND b.position IS NULL
    GROUP BY b.analysis_id, b.condition, b.questions
), rates AS (
    SELECT *,
           n_now_wrong / nullif(n_correct_before, 0) AS asr,
           n_now_right / nullif(n_wrong_before, 0) AS sgr
    FROM pooled
)
SELECT a.analysis_id, a.run_id, a.method, a.lang_mean, a.blacklist, a.budget,
       s.with_experts, s.avg_experts,
       r.condition, r.questions AS question_limit, r.n_questions, r.n_correct_before,
       r.asr, r.sgr, r.asr - r.sgr AS rate_diff, r.violations
FROM rates r
JOIN analyses a USING (analysis_id)
JOIN analysis_summary s USING (analysis_id);
