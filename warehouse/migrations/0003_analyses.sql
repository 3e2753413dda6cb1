-- Analyses (method.md, Stage 2): routing means materialised once per run, and the expert sets found.
-- The views and macros that read these tables live in the package `xici.sql` (folder sql/).

-- Which runs have their means materialised, and the run's size when they were built: a run that has
-- grown since (more sequences or tokens committed) no longer matches and its means are rebuilt.
CREATE TABLE seq_means_builds (
    run_id      INTEGER PRIMARY KEY,
    n_sequences INTEGER   NOT NULL,
    n_tokens    BIGINT    NOT NULL,
    built_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- m[s, l, e] (Eq. 1): mean gate weight of expert e at MoE layer l over all tokens of sequence s.
-- Only non-zero means are stored; a missing row means m = 0. Filled from sql/seq_means.sql.
CREATE TABLE seq_means (
    run_id   INTEGER  NOT NULL,
    seq_id   BIGINT   NOT NULL,
    layer    SMALLINT NOT NULL,           -- MoE-layer index from 0
    expert   SMALLINT NOT NULL,
    m        DOUBLE   NOT NULL,           -- > 0, a multiple of 2^-32 (see sql/seq_means.sql)
    seq_rank INTEGER  NOT NULL            -- rank of m among the sequence's (layer, expert) pairs, 1 = largest
);

-- Language means of m over all sequences of the run in the same language, zeros included (Eq. 2).
-- Only non-zero means are stored. Filled from sql/lang_means.sql.
CREATE TABLE lang_means (
    run_id INTEGER  NOT NULL,
    lang   VARCHAR  NOT NULL,
    layer  SMALLINT NOT NULL,
    expert SMALLINT NOT NULL,
    mean   DOUBLE   NOT NULL,
    PRIMARY KEY (run_id, lang, layer, expert)
);

-- One row per analysis: a run, a grader and the Stage 2 parameters. The same key is the same result.
CREATE TABLE analyses (
    analysis_id      INTEGER PRIMARY KEY,
    analysis_key     VARCHAR NOT NULL UNIQUE,  -- sha256 of the run's data, the grader and the parameters
    run_id           INTEGER NOT NULL,
    grader           VARCHAR NOT NULL,         -- whose grades split languages into correct and wrong
    alpha            DOUBLE  NOT NULL,         -- significance of the one-tailed Mann-Whitney U test
    tau              DOUBLE  NOT NULL,         -- magnitude threshold on the median difference
    layer_start      INTEGER NOT NULL,         -- MoE layers analysed: [layer_start, layer_stop)
    layer_stop       INTEGER NOT NULL,
    max_experts      INTEGER NOT NULL,         -- cap per question
    blacklist_top    DOUBLE  NOT NULL,         -- share of a sequence's ranking that counts as its top
    blacklist_share  DOUBLE  NOT NULL,         -- share of sequences above which a top expert is blacklisted
    params           JSON    NOT NULL,         -- all of the above and the preset, exactly as hashed
    n_languages      INTEGER NOT NULL,         -- languages in the run
    english_accuracy DOUBLE,                   -- accuracy of the 'en' sequences; NULL without any
    average_accuracy DOUBLE,                   -- mean over languages of each language's accuracy
    n_blacklisted    INTEGER NOT NULL,         -- generalist experts removed (all layers)
    created_at       TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- Every question of the run, tested or skipped, and how many experts survived each step.
CREATE TABLE analysis_questions (
    analysis_id   INTEGER NOT NULL,
    question_id   VARCHAR NOT NULL,
    outcome       VARCHAR NOT NULL CHECK (outcome IN ('mixed', 'all_correct', 'all_wrong', 'ungraded')),
    n_correct     INTEGER NOT NULL,            -- languages graded correct
    n_wrong       INTEGER NOT NULL,            -- languages graded wrong
    n_ungraded    INTEGER NOT NULL,            -- languages without a grade (NULL or missing): left out
    n_significant INTEGER,                     -- experts with p < alpha; NULL when the question was skipped
    n_passed      INTEGER,                     -- ... whose median difference is also > tau
    n_experts     INTEGER NOT NULL,            -- ... kept after the cap
    PRIMARY KEY (analysis_id, question_id)
);

-- The expert set of each question, best first.
CREATE TABLE analysis_experts (
    analysis_id INTEGER  NOT NULL,
    question_id VARCHAR  NOT NULL,
    rank        INTEGER  NOT NULL,             -- 1 = lowest combined rank (p ascending + median_diff descending)
    layer       SMALLINT NOT NULL,             -- MoE-layer index from 0
    expert      SMALLINT NOT NULL,
    u           DOUBLE   NOT NULL,             -- Mann-Whitney U of the correct languages
    p           DOUBLE   NOT NULL,             -- one-tailed p-value (correct greater)
    median_diff DOUBLE   NOT NULL,             -- median delta (correct) - median delta (wrong)
    PRIMARY KEY (analysis_id, question_id, rank)
);
