"""Stage 2 of XICI: from a run's routing means to an expert set per question (method.md, steps 1-6).

The work splits in two, so a sweep pays for the expensive half once:

1. :func:`compute_tests` runs the Mann-Whitney test for every mixed question and every expert of a layer
   range. Per question it builds the dense delta matrix languages x (layer, expert) from the materialised
   tables (``seq_means``: non-zero m only, so a missing row is m = 0; ``lang_means``), i.e.
   delta = m - language mean (Eq. 2, the same definition as the SQL macro ``deltas``), splits its graded
   languages into correct C and wrong W (grades of one grader; NULL grades are left out), and tests
   C greater than W for all columns at once (:mod:`xici.analysis.mwu`, with the ``mwu`` method), along
   with the median difference. The tests do not depend on the window, the blacklist, alpha, tau, the cap
   or the minimum group size: each column is tested on its own, so removing columns later changes nothing
   about the others.
2. :func:`select_experts` applies one parameter point: the minimum group size (a question with fewer
   than ``min_group`` correct or wrong languages is not tested), the layer window and blacklist (columns
   removed), p < alpha (on exact counts where p is exact: :func:`~xici.analysis.mwu.below`), median
   difference > tau, and the cap. When more than ``max_experts`` pass, passing experts
   are ranked by p (ascending) and by median difference (descending), average ranks for ties, the two
   ranks summed, and the lowest sums kept; remaining ties are broken by p, then median difference, then
   (layer, expert), so the order is total; the kept experts are stored with their rank (1 = best).

:func:`analyze` ties it together with the warehouse: an analysis is keyed by a hash of the run's data
(sequence and token counts, the grader's grades), the parameters and the method version; a stored analysis
with the same key is reused, otherwise it is computed and stored with its questions and expert sets in one
transaction. Expert sets are therefore a pure function of the recorded data and the parameters.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace

import duckdb
import numpy as np
import pyarrow as pa
from scipy.stats import rankdata

from xici.analysis.means import RunInfo, ensure_means, run_info
from xici.analysis.mwu import below, exact_fits, mannwhitneyu_greater
from xici.analysis.params import AnalysisParams, analysis_key, param_names
from xici.errors import XiciError
from xici.progress import progress_bar
from xici.sql import apply_views
from xici.warehouse import Lake

#: Sequences per dense block of m, (layers x experts) x sequences float64 (4608 x 4096: 150 MB).
BLOCK_ROWS = 4096
_CHUNK_VIEW = "xici_analysis_chunk"
_QUESTION_ROWS = pa.schema(
    [("analysis_id", pa.int32()), ("question_id", pa.string()), ("outcome", pa.string())]
    + [
        (name, pa.int32())
        for name in ("n_correct", "n_wrong", "n_ungraded", "n_significant", "n_passed", "n_experts")
    ]
)


@dataclass(frozen=True)
class QuestionTests:
    """Test results of every mixed question for the columns (layer, expert) of layers [start, stop)."""

    layer_start: int
    layer_stop: int
    n_experts: int
    question_ids: list[str]
    u: np.ndarray  # [questions, columns]; column = (layer - layer_start) * n_experts + expert
    p: np.ndarray
    median_diff: np.ndarray
    extreme: np.ndarray  # int64 [questions, columns]: exact p = extreme / total; 0 where p is asymptotic
    total: list[int]  # per question, C(n_correct + n_wrong, n_correct)
    n_correct: np.ndarray  # [questions]
    n_wrong: np.ndarray
    #: [questions, columns]: token-weighted mean over C minus over W (risk difference of frequencies)
    pooled_diff: np.ndarray | None = None

    def columns(self, layer_start: int, layer_stop: int, blacklist: np.ndarray) -> np.ndarray:
        """Mask of the columns inside [layer_start, layer_stop) and not blacklisted ([k, 2] layer, expert)."""
        layers = np.repeat(np.arange(self.layer_start, self.layer_stop), self.n_experts)
        keep = (layers >= layer_start) & (layers < layer_stop)
        black = blacklist[(blacklist[:, 0] >= self.layer_start) & (blacklist[:, 0] < self.layer_stop)]
        keep[(black[:, 0] - self.layer_start) * self.n_experts + black[:, 1]] = False
        return keep


@dataclass(frozen=True)
class Selection:
    """The experts kept for one question, best first, and how many passed each step."""

    n_significant: int
    n_passed: int
    columns: np.ndarray  # kept column indices, in rank order


@dataclass(frozen=True)
class AnalysisRecord:
    """The stored analysis of one parameter point; ``created`` when computed now rather than reused."""

    analysis_id: int
    params: AnalysisParams
    created: bool


#: What a localizer contrasts per (sequence, layer, expert): the mean gate weight m (Eq. 1) or the routing
#: frequency f (the share of the sequence's tokens that selected the expert: risk-diff).
VALUES = ("weights", "frequency")


def compute_tests(
    con: duckdb.DuckDBPyConnection,
    info: RunInfo,
    grader: str,
    mwu: str,
    layer_start: int,
    layer_stop: int,
    *,
    values: str = "weights",
    lang_mean: bool = True,
) -> QuestionTests:
    """Mann-Whitney U, p, median and pooled differences for every mixed question and (layer, expert) in the
    range; ``mwu`` is the test's method (auto, exact, asymptotic), ``values`` what is contrasted (VALUES),
    ``lang_mean`` whether each language's mean is subtracted first (Eq. 2)."""
    graded = con.execute(
        "select g.seq_id, g.question_id, g.lang, g.correct, s.n_tokens "
        "from sequence_grades($run, $grader) g join question_outcomes($run, $grader) o using (question_id) "
        "join sequences s using (seq_id) "
        "where o.outcome = 'mixed' and g.correct is not null "
        "order by g.question_id, g.correct desc, g.lang, g.seq_id",
        {"run": info.run_id, "grader": grader},
    ).fetchnumpy()
    # Rows come grouped by question, correct ones first: find each question's run of rows.
    question_of_row = graded["question_id"]
    n_rows = len(question_of_row)
    starts = np.flatnonzero(np.r_[n_rows > 0, question_of_row[1:] != question_of_row[:-1]])
    counts = np.diff(np.append(starts, n_rows))
    correct_before = np.r_[0, np.cumsum(graded["correct"])]
    n_correct = correct_before[starts + counts] - correct_before[starts]
    langs, lang_of_row = np.unique(graded["lang"], return_inverse=True)
    if mwu == "exact" and not all(map(exact_fits, n_correct, counts - n_correct)):
        raise XiciError(
            f"run {info.run_id} has a question with {counts.max()} languages, too many for the exact test",
            where="--mwu exact",
            fix="use --mwu auto or asymptotic (exact counts are kept for up to 66 languages a question)",
        )
    n_columns = (layer_stop - layer_start) * info.n_experts
    lang_means = (
        _lang_means(con, info, langs, layer_start, layer_stop, values)
        if lang_mean
        else np.zeros((n_columns, len(langs)))
    )
    tokens = graded["n_tokens"].astype(np.float64)

    shape = (len(starts), n_columns)
    u, p, median_diff, pooled_diff = np.empty(shape), np.empty(shape), np.empty(shape), np.empty(shape)
    extreme, total = np.zeros(shape, dtype=np.int64), []
    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"tests of run {info.run_id}", total=len(starts))
        for first, stop in _blocks(starts, counts):
            lo, hi = starts[first], starts[stop - 1] + counts[stop - 1]
            dense = _dense_values(con, info, graded["seq_id"][lo:hi], layer_start, layer_stop, values)
            for q in range(first, stop):
                a, b = starts[q] - lo, starts[q] - lo + counts[q]
                deltas = dense[:, a:b] - lang_means[:, lang_of_row[lo + a : lo + b]]  # Eq. 2
                k = n_correct[q]
                correct, wrong = deltas[:, :k], deltas[:, k:]
                test = mannwhitneyu_greater(correct, wrong, mwu)
                u[q], p[q], extreme[q] = test.u, test.p, test.extreme
                total.append(test.total)
                median_diff[q] = _row_medians(correct) - _row_medians(wrong)
                n = tokens[lo + a : lo + b]  # pooled over tokens: SteerMoE's shares
                pooled_diff[q] = correct @ n[:k] / n[:k].sum() - wrong @ n[k:] / n[k:].sum()
            bar.advance(task, stop - first)
    questions = [str(q) for q in question_of_row[starts]]
    n_wrong = counts - n_correct
    return QuestionTests(
        layer_start,
        layer_stop,
        info.n_experts,
        questions,
        u,
        p,
        median_diff,
        extreme,
        total,
        n_correct,
        n_wrong,
        pooled_diff,
    )


def select_experts(
    tests: QuestionTests, q: int, params: AnalysisParams, columns: np.ndarray, budget: int | None = None
) -> Selection | None:
    """Steps 4-6 for question ``q`` of ``tests`` over the allowed ``columns`` (a mask), or a rival
    localizer's ranking (:func:`scores`); at most ``budget`` experts when given (and never more than the
    cap). None when the question has fewer than ``min_group`` correct or wrong languages and is not tested."""
    if min(tests.n_correct[q], tests.n_wrong[q]) < params.min_group:
        return None
    p, diff = tests.p[q], tests.median_diff[q]
    significant = columns & below(p, tests.extreme[q], tests.total[q], params.alpha)
    if params.method == "xici":
        passing = np.flatnonzero(significant & (diff > params.tau))
        combined = rankdata(p[passing]) + rankdata(-diff[passing])
        order = np.lexsort((passing, -diff[passing], p[passing], combined))
    else:
        score = scores(tests, params.method)[q]
        threshold = params.tau if params.method == "median-diff" else 0.0
        passing = np.flatnonzero(columns & (score > threshold))
        order = np.lexsort((passing, -score[passing]))
    cap = params.max_experts if budget is None else min(budget, params.max_experts)
    return Selection(int(significant.sum()), len(passing), passing[order][:cap])


def scores(tests: QuestionTests, method: str) -> np.ndarray | None:
    """What a rival localizer ranks by [questions, columns]: the median difference (median-diff, which
    also needs it above tau) or the pooled difference of frequencies (risk-diff, above 0); None for XICI."""
    return {"median-diff": tests.median_diff, "risk-diff": tests.pooled_diff}.get(method)


def data_fingerprint(con: duckdb.DuckDBPyConnection, info: RunInfo, grader: str) -> dict[str, object]:
    """What identifies the run's data for an analysis: its size and the grader's grades."""
    digest = con.execute(
        "select md5(coalesce(string_agg(seq_id::VARCHAR || ':' || coalesce(correct::VARCHAR, '-'), ',' "
        "order by seq_id), '')) from sequence_grades(?, ?)",
        [info.run_id, grader],
    ).fetchall()[0][0]
    return {"n_sequences": info.n_sequences, "n_tokens": info.n_tokens, "grades_md5": digest}


def changed_analyses(con: duckdb.DuckDBPyConnection) -> list[tuple[int, int]]:
    """(analysis_id, run_id) of the stored analyses whose inputs changed since: the run's sequences or
    grades now give another key (or the method version did), or the run is gone. For ``xici lake check``."""
    rows = con.execute("select analysis_id, analysis_key, run_id, grader, params from analyses order by 1")
    changed = []
    for analysis_id, key, run_id, grader, params in rows.fetchall():
        try:
            fingerprint = data_fingerprint(con, run_info(con, run_id), grader)
        except XiciError:  # the run is gone or has no sequences
            changed.append((analysis_id, run_id))
            continue
        if analysis_key(run_id, fingerprint, json.loads(params)) != key:
            changed.append((analysis_id, run_id))
    return changed


def analyze(lake: Lake, run_id: int, points: list[AnalysisParams]) -> list[AnalysisRecord]:
    """Analyses of a run for each parameter point, reusing the stored ones with the same key."""

    def look_up(con: duckdb.DuckDBPyConnection) -> tuple[RunInfo, list[str], dict[str, int]]:
        apply_views(con)
        info = run_info(con, run_id)
        fingerprints = {g: data_fingerprint(con, info, g) for g in sorted({pt.grader for pt in points})}
        keys = [analysis_key(run_id, fingerprints[pt.grader], pt) for pt in points]
        stored = con.execute(
            "select analysis_key, analysis_id from analyses where analysis_key in (select unnest(?))", [keys]
        ).fetchall()
        return info, keys, dict(stored)

    info, keys, stored = lake.write(look_up)
    missing = [i for i, key in enumerate(keys) if key not in stored]
    if missing:
        ensure_means(lake, run_id)

        def compute(con: duckdb.DuckDBPyConnection) -> None:
            inputs = _Inputs(con, info, [points[i] for i in missing])
            for i in missing:
                stored[keys[i]] = _store(con, info, points[i], keys[i], inputs)

        lake.write(compute)
    return [AnalysisRecord(stored[keys[i]], pt, i in missing) for i, pt in enumerate(points)]


def reference(params: AnalysisParams) -> AnalysisParams:
    """The XICI point (with both of its steps) whose set sizes a rival localizer with budget ``matched``
    follows."""
    return replace(params, method="xici", lang_mean=True, blacklist=True, budget="matched")


class _Inputs:
    """Tests, outcomes and blacklists of one run, computed once for all the points of a call (a sweep):
    tests per grader, test method, contrasted values and language-mean step, over the widest window."""

    def __init__(self, con: duckdb.DuckDBPyConnection, info: RunInfo, points: list[AnalysisParams]) -> None:
        self.con, self.info = con, info
        self.window = {
            grader: (
                min(pt.layer_start for pt in points if pt.grader == grader),
                max(pt.layer_stop for pt in points if pt.grader == grader),
            )
            for grader in {pt.grader for pt in points}
        }
        self._graded: dict[tuple[str, str, str, bool], _Graded] = {}
        self._blacklists: dict[tuple[float, float], np.ndarray] = {}

    def graded(self, params: AnalysisParams) -> _Graded:
        values = "frequency" if params.method == "risk-diff" else "weights"
        key = (params.grader, params.mwu, values, params.lang_mean)
        if key not in self._graded:
            start, stop = self.window[params.grader]
            self._graded[key] = _graded(self.con, self.info, *key, start, stop)
        return self._graded[key]

    def blacklist(self, params: AnalysisParams) -> np.ndarray:
        if not params.blacklist:
            return np.empty((0, 2), dtype=np.int64)
        pair = (params.blacklist_top, params.blacklist_share)
        if pair not in self._blacklists:
            self._blacklists[pair] = _blacklist(self.con, self.info, *pair)
        return self._blacklists[pair]

    def selections(self, params: AnalysisParams) -> dict[str, Selection]:
        """The selected experts of every tested question (skipped ones left out)."""
        tests = self.graded(params).tests
        columns = tests.columns(params.layer_start, params.layer_stop, self.blacklist(params))
        budgets: dict[str, int | None] = dict.fromkeys(tests.question_ids)
        if params.method != "xici" and params.budget == "matched":
            matched = self.selections(reference(params))
            budgets = {qid: len(matched[qid].columns) if qid in matched else 0 for qid in tests.question_ids}
        selections = {
            qid: select_experts(tests, q, params, columns, budgets[qid])
            for q, qid in enumerate(tests.question_ids)
        }
        return {qid: selection for qid, selection in selections.items() if selection is not None}


@dataclass(frozen=True)
class _Graded:
    """What every analysis of one run and grader shares, computed once for a sweep."""

    tests: QuestionTests
    outcomes: list[tuple[str, str, int, int, int]]  # question_id, outcome, n_correct, n_wrong, n_ungraded
    accuracy: tuple[int, float | None, float | None]  # languages, English accuracy, average accuracy


def _graded(
    con: duckdb.DuckDBPyConnection,
    info: RunInfo,
    grader: str,
    mwu: str,
    values: str,
    lang_mean: bool,
    layer_start: int,
    layer_stop: int,
) -> _Graded:
    [(graded,)] = con.execute(
        "select count(correct) from sequence_grades(?, ?)", [info.run_id, grader]
    ).fetchall()
    if not graded:  # a grader that never graded this run is a typo or a missing step
        known = con.execute(
            "select distinct g.grader from grades g join sequences s using (seq_id) "
            "where s.run_id = ? order by 1",
            [info.run_id],
        ).fetchall()
        raise XiciError(
            f"run {info.run_id} has no grades from grader {grader!r}",
            where="--grader",
            fix=f"use one of the run's graders: {', '.join(r[0] for r in known)}"
            if known
            else "grade it first",
        )
    outcomes = con.execute(
        "select question_id, outcome, n_correct, n_wrong, n_ungraded from question_outcomes(?, ?) "
        "order by question_id",
        [info.run_id, grader],
    ).fetchall()
    [accuracy] = con.execute(
        "select count(*), max(accuracy) filter (where lang = 'en'), avg(accuracy) "
        "from language_accuracy(?, ?)",
        [info.run_id, grader],
    ).fetchall()
    tests = compute_tests(con, info, grader, mwu, layer_start, layer_stop, values=values, lang_mean=lang_mean)
    return _Graded(tests, outcomes, accuracy)


def _blacklist(con: duckdb.DuckDBPyConnection, info: RunInfo, top: float, share: float) -> np.ndarray:
    """The blacklisted (layer, expert) pairs [k, 2] (sql/blacklist.sql)."""
    rows = con.execute("select layer, expert from blacklist(?, ?, ?)", [info.run_id, top, share]).fetchall()
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def _store(
    con: duckdb.DuckDBPyConnection, info: RunInfo, params: AnalysisParams, key: str, inputs: _Inputs
) -> int:
    """Select the experts of one parameter point and write the analysis; returns its id."""
    graded = inputs.graded(params)
    tests = graded.tests
    blacklist = inputs.blacklist(params)
    picked = inputs.selections(params)
    [(analysis_id,)] = con.execute("select coalesce(max(analysis_id), 0) + 1 from analyses").fetchall()
    names = param_names()
    con.execute(
        f"insert into analyses (analysis_id, analysis_key, run_id, {', '.join(names)}, params, n_languages, "
        f"english_accuracy, average_accuracy, n_blacklisted) values ({', '.join('?' * (len(names) + 8))})",
        [
            analysis_id,
            key,
            info.run_id,
            *(getattr(params, n) for n in names),
            json.dumps(params.as_dict(), sort_keys=True),
            *graded.accuracy,
            len(blacklist),
        ],
    )
    question_rows = pa.Table.from_pylist(
        schema=_QUESTION_ROWS,
        mapping=[
            {
                "analysis_id": analysis_id,
                "question_id": qid,
                "outcome": outcome,
                "n_correct": n_correct,
                "n_wrong": n_wrong,
                "n_ungraded": n_ungraded,
                "n_significant": picked[qid].n_significant if qid in picked else None,
                "n_passed": picked[qid].n_passed if qid in picked else None,
                "n_experts": len(picked[qid].columns) if qid in picked else 0,
            }
            for qid, outcome, n_correct, n_wrong, n_ungraded in graded.outcomes
        ],
    )
    expert_rows = _expert_rows(analysis_id, tests, picked, scores(tests, params.method))
    for table, rows in (("analysis_questions", question_rows), ("analysis_experts", expert_rows)):
        con.register(_CHUNK_VIEW, rows)
        con.execute(f"insert into {table} by name select * from {_CHUNK_VIEW}")
        con.unregister(_CHUNK_VIEW)
    return analysis_id


def _expert_rows(
    analysis_id: int, tests: QuestionTests, picked: dict[str, Selection], score: np.ndarray | None
) -> pa.Table:
    q_index = {qid: q for q, qid in enumerate(tests.question_ids)}
    parts = [(q_index[qid], s.columns) for qid, s in picked.items() if len(s.columns)]
    q = np.concatenate([np.full(len(c), q, dtype=np.int64) for q, c in parts]) if parts else np.empty(0, int)
    col = np.concatenate([c for _, c in parts]) if parts else np.empty(0, int)
    rank = np.concatenate([np.arange(1, len(c) + 1) for _, c in parts]) if parts else np.empty(0, int)
    return pa.table(
        {
            "analysis_id": pa.array(np.full(len(q), analysis_id), pa.int32()),
            "question_id": pa.array(np.array(tests.question_ids, dtype=object)[q], pa.string()),
            "rank": pa.array(rank, pa.int32()),
            "layer": pa.array(tests.layer_start + col // tests.n_experts, pa.int16()),
            "expert": pa.array(col % tests.n_experts, pa.int16()),
            "u": pa.array(tests.u[q, col]),
            "p": pa.array(tests.p[q, col]),
            "median_diff": pa.array(tests.median_diff[q, col]),
            "score": pa.nulls(len(q), pa.float64()) if score is None else pa.array(score[q, col]),
        }
    )


def _blocks(starts: np.ndarray, counts: np.ndarray) -> Iterator[tuple[int, int]]:
    """Runs of whole questions [first, stop) of about BLOCK_ROWS sequences each."""
    first = 0
    while first < len(starts):
        stop, rows = first, 0
        while stop < len(starts) and (stop == first or rows + counts[stop] <= BLOCK_ROWS):
            rows += counts[stop]
            stop += 1
        yield first, stop
        first = stop


def _lang_means(
    con: duckdb.DuckDBPyConnection,
    info: RunInfo,
    langs: np.ndarray,
    layer_start: int,
    layer_stop: int,
    values: str = "weights",
) -> np.ndarray:
    """Dense language means of the ``values`` [columns, languages] (zero where no row is stored)."""
    value = "mean" if values == "weights" else "frequency"
    rows = con.execute(
        f"select lang, layer, expert, {value} as mean from lang_means "
        "where run_id = ? and layer >= ? and layer < ?",
        [info.run_id, layer_start, layer_stop],
    ).fetchnumpy()
    dense = np.zeros(((layer_stop - layer_start) * info.n_experts, len(langs)))
    known = np.isin(rows["lang"], langs)
    column = (rows["layer"][known].astype(np.int64) - layer_start) * info.n_experts + rows["expert"][known]
    dense[column, np.searchsorted(langs, rows["lang"][known])] = rows["mean"][known]
    return dense


def _dense_values(
    con: duckdb.DuckDBPyConnection,
    info: RunInfo,
    seq_ids: np.ndarray,
    layer_start: int,
    layer_stop: int,
    values: str = "weights",
) -> np.ndarray:
    """m (or the routing frequency f) [columns, sequences] for these sequences, in their order; 0 wherever no
    row is stored."""
    dense = np.zeros(((layer_stop - layer_start) * info.n_experts, len(seq_ids)))
    value = "m.m" if values == "weights" else "m.n_selected / s.n_tokens"
    con.register(_CHUNK_VIEW, pa.table({"seq_id": seq_ids, "row": np.arange(len(seq_ids))}))
    found = con.sql(
        f"select ((m.layer::BIGINT - $start) * $experts + m.expert) * $rows + c.row as cell, {value} as v "
        f"from seq_means m join {_CHUNK_VIEW} c using (seq_id) join sequences s using (seq_id) "
        "where m.run_id = $run and m.layer >= $start and m.layer < $stop",
        params={
            "run": info.run_id,
            "start": layer_start,
            "stop": layer_stop,
            "experts": info.n_experts,
            "rows": len(seq_ids),
        },
    ).to_arrow_table()
    con.unregister(_CHUNK_VIEW)
    dense.reshape(-1)[found.column("cell").to_numpy()] = found.column("v").to_numpy()
    return dense


def _row_medians(values: np.ndarray) -> np.ndarray:
    """Median of every row of ``values`` [F, n]."""
    ordered = np.sort(values, axis=1)
    n = ordered.shape[1]
    return (ordered[:, (n - 1) // 2] + ordered[:, n // 2]) / 2
