-- Per-expert necessity (xici ablate --per-expert; method.md "Instruments"): for every expert of a
-- question's set, the pairs correct before and how many of them switching off that expert alone
-- (mode 'single') turned wrong, and how many stay wrong when it is the only one of the set left on
-- (mode 'all-but-one'; NULL when not run, or for a set of one). An expert is individually necessary for a
-- language when, alone off, it turns that language's correct answer wrong. question_limit: the runs'
-- --questions N (NULL: all questions with experts).
--     select avg((n_now_wrong > 0)::int) from expert_necessity where analysis_id = 1;
CREATE OR REPLACE VIEW expert_necessity AS
WITH counts AS (
    SELECT b.analysis_id, b.questions, b.mode, b.position, p.question_id,
           count(*) FILTER (WHERE p.before AND p.after IS NOT NULL) AS n_correct_before,
           count(*) FILTER (WHERE p.before AND NOT p.after) AS n_now_wrong
    FROM ablations b
    JOIN ablation_pairs p USING (run_id)
    WHERE b.mode IN ('single', 'all-but-one') AND b.condition = 'xici'
    GROUP BY ALL
)
SELECT e.analysis_id, s.questions AS question_limit, e.question_id, e.rank AS position, e.layer, e.expert,
       q.n_experts AS set_size,
       s.n_correct_before, s.n_now_wrong,
       o.n_now_wrong AS n_wrong_all_but_it
FROM analysis_experts e
JOIN analysis_questions q USING (analysis_id, question_id)
JOIN counts s ON s.analysis_id = e.analysis_id AND s.question_id = e.question_id
              AND s.position = e.rank AND s.mode = 'single'
LEFT JOIN counts o ON o.analysis_id = e.analysis_id AND o.question_id = e.question_id
                   AND o.position = e.rank AND o.mode = 'all-but-one'
                   AND o.questions IS NOT DISTINCT FROM s.questions;
