-- Every (question, language) pair a finished ablation run asked, with its grade before (the recorded run) and after
-- (the ablation run), both by the analysis' grader; NULL where a grade is undecided or missing. The
-- per-question and per-expert views of the instruments (expert_necessity, asr_by_set_size) count these;
-- ablation_metrics holds the same counts per run.
--     select question_id, count(*) filter (where before and not after) from ablation_pairs
--     where run_id = 2 group by all;
CREATE OR REPLACE VIEW ablation_pairs AS
SELECT b.run_id, b.analysis_id, a.question_id, a.lang, gb.correct AS before, ga.correct AS after
FROM ablations b
JOIN runs r ON r.run_id = b.run_id AND r.status = 'finished'
JOIN sequences a ON a.run_id = b.run_id
LEFT JOIN grades ga ON ga.seq_id = a.seq_id AND ga.grader = b.grader
LEFT JOIN sequences s ON s.run_id = b.source_run_id AND s.question_id = a.question_id AND s.lang = a.lang
LEFT JOIN grades gb ON gb.seq_id = s.seq_id AND gb.grader = b.grader;
