-- One row per stored analysis, like the paper's Table 1 and the top of its Table 2: per dataset and model,
-- questions, languages, English and average accuracy, the three outcomes, blacklisted experts, questions
-- with experts identified and the average set size over those questions. tested: the mixed questions with
-- enough correct and wrong languages for the analysis' min_group (all of them at the default 1).
--     select * from analysis_summary order by analysis_id;
CREATE OR REPLACE VIEW analysis_summary AS
WITH per_analysis AS (
    SELECT analysis_id,
           count(*) AS questions,
           count(*) FILTER (WHERE outcome = 'all_correct') AS all_correct,
           count(*) FILTER (WHERE outcome = 'all_wrong') AS all_wrong,
           count(*) FILTER (WHERE outcome = 'mixed') AS mixed,
           count(*) FILTER (WHERE n_significant IS NOT NULL) AS tested,
           count(*) FILTER (WHERE outcome = 'ungraded') AS ungraded,
           sum(n_ungraded) AS ungraded_languages,
           count(*) FILTER (WHERE n_experts > 0) AS with_experts,
           sum(n_experts) AS experts,
           avg(n_experts) FILTER (WHERE n_experts > 0) AS avg_experts
    FROM analysis_questions
    GROUP BY analysis_id
)
SELECT a.analysis_id, a.run_id, r.dataset, r.model, a.grader,
       coalesce(q.questions, 0) AS questions,
       a.n_languages AS languages,
       a.english_accuracy, a.average_accuracy,
       coalesce(q.all_correct, 0) AS all_correct,
       coalesce(q.all_wrong, 0) AS all_wrong,
       coalesce(q.mixed, 0) AS mixed,
       coalesce(q.tested, 0) AS tested,
       coalesce(q.ungraded, 0) AS ungraded,
       coalesce(q.ungraded_languages, 0) AS ungraded_languages,
       a.n_blacklisted AS blacklisted,
       coalesce(q.with_experts, 0) AS with_experts,
       coalesce(q.experts, 0) AS experts,
       q.avg_experts,
       a.alpha, a.tau, a.layer_start, a.layer_stop, a.max_experts, a.blacklist_top, a.blacklist_share,
       a.mwu, a.min_group, a.method, a.lang_mean, a.blacklist, a.budget
FROM analyses a
JOIN runs r ON r.run_id = a.run_id
LEFT JOIN per_analysis q ON q.analysis_id = a.analysis_id;
