-- What else an ablation run can do with a question's experts (docs/method.md, "Instruments"):
-- mode 'deactivate' (switch the set off together, as before), 'boost' (add `boost` to their router logits:
-- the paper's "necessary but not sufficient"), 'single' (switch off only the expert ranked `position` of
-- each question's set) or 'all-but-one' (switch off the set but the expert ranked `position`).
ALTER TABLE ablations ADD COLUMN mode VARCHAR DEFAULT 'deactivate';
ALTER TABLE ablations ADD COLUMN boost DOUBLE;                 -- added to the logits; mode 'boost' only
ALTER TABLE ablations ADD COLUMN position INTEGER;             -- rank in the set; 'single', 'all-but-one'
ALTER TABLE ablations ADD COLUMN questions INTEGER;            -- only the first N questions with experts
-- Boost's routing check: the share of (token, boosted expert) pairs in which the expert was selected, in the
-- boosted answers and in the recorded answers of the same (question, language) pairs.
ALTER TABLE ablations ADD COLUMN selected_before DOUBLE;
ALTER TABLE ablations ADD COLUMN selected_after DOUBLE;
