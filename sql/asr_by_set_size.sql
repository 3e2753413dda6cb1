-- How ablation success grows with the size of a question's set (method.md "Instruments"): per analysis
-- and set size, over the questions whose whole set XICI's own run switched off (mode 'deactivate'), the
-- pairs correct before and the share of them now wrong (ASR), pooled over the questions of that size
-- (runs of the first N questions only, xici ablate --questions N, apart: question_limit).
--     select * from asr_by_set_size where analysis_id = 1 order by set_size;
CREATE OR REPLACE VIEW asr_by_set_size AS
SELECT b.analysis_id, b.questions AS question_limit, q.n_experts AS set_size,
       count(DISTINCT p.question_id) AS n_questions,
       count(*) FILTER (WHERE p.before AND p.after IS NOT NULL) AS n_correct_before,
       count(*) FILTER (WHERE p.before AND NOT p.after) AS n_now_wrong,
       count(*) FILTER (WHERE p.before AND NOT p.after)
           / nullif(count(*) FILTER (WHERE p.before AND p.after IS NOT NULL), 0) AS asr
FROM ablations b
JOIN ablation_pairs p USING (run_id)
JOIN analysis_questions q ON q.analysis_id = b.analysis_id AND q.question_id = p.question_id
WHERE b.mode = 'deactivate' AND b.condition = 'xici'
GROUP BY b.analysis_id, b.questions, q.n_experts;
