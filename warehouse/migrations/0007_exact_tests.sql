-- How an analysis tested (issue: exact statistics, docs/method.md "Choices where the paper is open"):
-- mwu is the Mann-Whitney method (auto: scipy's choice, exact without ties for groups of at most 8;
-- exact: the permutation distribution with ties; asymptotic: the normal approximation), min_group the
-- fewest correct and fewest wrong languages a question needs to be tested. Analyses stored before had
-- auto and 1.
ALTER TABLE analyses ADD COLUMN mwu VARCHAR DEFAULT 'auto';
ALTER TABLE analyses ADD COLUMN min_group INTEGER DEFAULT 1;
