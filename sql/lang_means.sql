-- lang_means, the language means (method.md, Eq. 2): for every language of run `run`, the mean of m[s, l, e] over ALL the
-- run's sequences in that language. A sequence that never used the expert has m = 0 and counts in the
-- denominator: the sum runs over the stored (non-zero) rows, the division is by the language's sequence
-- count. A run covers one dataset, so this is the mean "over the dataset in the same language".
--
-- frequency is the same mean of the routing frequency f[s, l, e] = n_selected / (tokens of s), the share of
-- the sequence's tokens that selected the expert (the risk-difference localizer, method.md "Rival
-- localizers").
--
-- Reads the table seq_means. xici stores what this macro gives in the table of the same name, `lang_means`
-- (non-zero means only), whenever it (re)builds a run's means: `from lang_means` is the stored table,
-- `from lang_means(1)` computes it. The build adds the same sums up as it computes seq_means
-- (analysis/means_kernel.py): the mean has this macro's bits (sums of multiples of 2^-32 are exact in
-- any order); the frequency, a sum of floats, is added in a fixed order there and in the order DuckDB's
-- threads take here, so the two can differ in the last bits.
--     select * from lang_means(1) where layer = 10 order by mean desc limit 20;
CREATE OR REPLACE MACRO lang_means(run) AS TABLE
WITH sizes AS (
    SELECT lang, count(*) AS n_sequences
    FROM sequences
    WHERE run_id = run
    GROUP BY lang
)
SELECT m.run_id, s.lang, m.layer, m.expert, sum(m.m) / any_value(z.n_sequences) AS mean,
       sum(m.n_selected / s.n_tokens) / any_value(z.n_sequences) AS frequency
FROM seq_means m
JOIN sequences s ON s.seq_id = m.seq_id
JOIN sizes z ON z.lang = s.lang
WHERE m.run_id = run
GROUP BY m.run_id, s.lang, m.layer, m.expert;
