"""Filters on ``sequences`` that reach a token relation through a join, turned into the seq_ids it may read.

DuckDB hands a scan the filters on its own columns, also those it derives through a join key (``t.seq_id =
s.seq_id and s.seq_id < 10``), but not a filter on another column of the joined table: for ``token_gates g
join sequences s using (seq_id) where s.question_id = 'q1'`` the token scan is offered nothing, and its
hash join would only drop the other rows after every token was read (DuckDB 2.0 gives Python scans no
join filters at run time). So before the query runs, its syntax tree (``json_serialize_sql``) is searched
for that shape, in every SELECT of the query: a token relation inner-joined to ``sequences`` on seq_id,
and conditions (WHERE, or the ON of an inner join) that read only that ``sequences``. Those conditions are
run on ``sequences`` alone, and the seq_ids they keep are all that scan needs to read.

The result is used only when it holds for every mention of the relation: a token relation also read
elsewhere without such a join (or named inside a string, as the ``sql/`` macros take it) is read in full.
Anything this module does not recognise leaves the reads as they were; results never depend on it.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import duckdb
import numpy as np

from xici.warehouse.scan import TOKEN_RELATIONS

Node = dict[str, Any]


def sequence_restrictions(con: duckdb.DuckDBPyConnection, query: str) -> dict[str, np.ndarray]:
    """Token relation name -> the seq_ids every one of its mentions in ``query`` is restricted to."""
    tree = _serialized(con, query)
    if tree is None:
        return {}
    mentions: dict[str, int] = {}
    found: dict[str, list[np.ndarray]] = {}
    for select in _selects(tree):
        for ref, seq_ids in _restricted_refs(con, select):
            found.setdefault(ref, []).append(seq_ids)
    for node in _walk(tree):
        if node.get("type") == "BASE_TABLE" and node.get("table_name", "").lower() in TOKEN_RELATIONS:
            name = node["table_name"].lower()
            mentions[name] = mentions.get(name, 0) + 1
    shadowed = {key.lower() for node in _walk(tree) for key in _cte_names(node)}
    restrictions = {}
    for name, parts in found.items():
        in_text = len(re.findall(rf"\b{name}\b", query, flags=re.IGNORECASE))
        if len(parts) == mentions.get(name) == in_text and name not in shadowed:
            restrictions[name] = np.unique(np.concatenate(parts))
    return restrictions


def _serialized(con: duckdb.DuckDBPyConnection, query: str) -> Node | None:
    try:
        tree = json.loads(con.execute("select json_serialize_sql(?)", [query]).fetchone()[0])
    except duckdb.Error:
        return None
    if tree.get("error") or len(tree.get("statements", [])) != 1:
        return None
    return tree["statements"][0]["node"]


def _walk(node: Any) -> Iterator[Node]:
    """Every dict in the tree."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _selects(tree: Node) -> Iterator[Node]:
    return (node for node in _walk(tree) if node.get("type") == "SELECT_NODE")


def _cte_names(node: Node) -> list[str]:
    entries = node.get("cte_map", {}).get("map", []) if isinstance(node.get("cte_map"), dict) else []
    return [entry["key"] for entry in entries if isinstance(entry, dict) and "key" in entry]


def _conjuncts(node: Node | None) -> list[Node]:
    if not node:
        return []
    if node.get("type") == "CONJUNCTION_AND":
        return [part for child in node["children"] for part in _conjuncts(child)]
    return [node]


def _from_items(table: Node | None, conditions: list[Node], using: list[tuple[set, set, list]]) -> list[Node]:
    """The base tables of a FROM reached through inner (and cross) joins only; collects the join
    conditions and USING columns. A FROM holding any other join gives nothing."""
    if not table:
        return []
    if table.get("type") == "BASE_TABLE":
        return [table]
    if table.get("type") != "JOIN" or table.get("join_type") != "INNER":
        raise _Unknown
    left = _from_items(table["left"], conditions, using)
    right = _from_items(table["right"], conditions, using)
    conditions.extend(_conjuncts(table.get("condition")))
    if table.get("using_columns"):
        using.append(({_binding(t) for t in left}, {_binding(t) for t in right}, table["using_columns"]))
    return left + right


class _Unknown(Exception):
    """A shape this module does not follow."""


def _binding(table: Node) -> str:
    return (table.get("alias") or table["table_name"]).lower()


def _restricted_refs(con: duckdb.DuckDBPyConnection, select: Node) -> Iterator[tuple[str, np.ndarray]]:
    conditions: list[Node] = []
    using: list[tuple[set, set, list]] = []
    try:
        tables = _from_items(select.get("from_table"), conditions, using)
    except _Unknown:
        return
    conditions += _conjuncts(select.get("where_clause"))
    sequences = [t for t in tables if _plain(t) == "sequences"]
    tokens = [t for t in tables if _plain(t) in TOKEN_RELATIONS]
    # Bare column names are read as those of sequences only where no other table could have them.
    bare = len(sequences) == 1 and all(_plain(t) in ("sequences", *TOKEN_RELATIONS) for t in tables)
    for token in tokens:
        for seqs in sequences:
            if not _joined(_binding(token), _binding(seqs), conditions, using):
                continue
            kept = [c for c in conditions if _only_reads(c, _binding(seqs), allow_bare=bare)]
            if kept:
                seq_ids = _seq_ids(con, seqs, kept)
                if seq_ids is not None:
                    yield _plain(token), seq_ids
                    break


def _plain(table: Node) -> str:
    """The table's name when it is unqualified (a qualified name is someone else's table)."""
    if table.get("schema_name") or table.get("catalog_name"):
        return ""
    return table["table_name"].lower()


def _column(node: Node) -> list[str] | None:
    return [n.lower() for n in node["column_names"]] if node.get("class") == "COLUMN_REF" else None


def _joined(token: str, seqs: str, conditions: list[Node], using: list[tuple[set, set, list]]) -> bool:
    """Whether the two are joined on seq_id: ``t.seq_id = s.seq_id`` or a USING (seq_id) between them."""
    for left, right, columns in using:
        if "seq_id" in [c.lower() for c in columns] and (
            (token in left and seqs in right) or (token in right and seqs in left)
        ):
            return True
    for c in conditions:
        if c.get("type") == "COMPARE_EQUAL":
            sides = {tuple(_column(c["left"]) or ()), tuple(_column(c["right"]) or ())}
            if sides == {(token, "seq_id"), (seqs, "seq_id")}:
                return True
    return False


def _only_reads(condition: Node, seqs: str, *, allow_bare: bool) -> bool:
    """Whether a condition reads columns of ``seqs`` only (bare names too where nothing else has them),
    holds no subquery or parameter, and reads at least one column."""
    columns = 0
    for node in _walk(condition):
        if node.get("class") in ("SUBQUERY", "PARAMETER", "LAMBDA", "WINDOW"):
            return False
        if node.get("class") == "FUNCTION" and node.get("function_name", "").lower() in _VOLATILE:
            return False
        name = _column(node)
        if name is None:
            continue
        columns += 1
        if len(name) == 2 and name[0] == seqs:
            continue
        if len(name) == 1 and allow_bare and name[0] not in _TOKEN_COLUMNS:
            continue
        return False
    return columns > 0


# Functions whose value may differ between the query and the one run beforehand on sequences.
_VOLATILE = {
    "random",
    "uuid",
    "gen_random_uuid",
    "nextval",
    "currval",
    "setseed",
    "now",
    "current_timestamp",
    "get_current_timestamp",
    "get_current_time",
    "current_time",
    "current_date",
    "today",
}
_TOKEN_COLUMNS = {field.name for schema in TOKEN_RELATIONS.values() for field in schema}


def _seq_ids(con: duckdb.DuckDBPyConnection, seqs: Node, conditions: list[Node]) -> np.ndarray | None:
    """The seq_ids of ``sequences`` (under its alias) where every condition holds; None if that fails."""
    alias = _binding(seqs).replace('"', '""')
    template = _serialized_statement(con, f'select seq_id from sequences as "{alias}" where true and true')
    if template is None:
        return None
    node = template["statements"][0]["node"]
    if len(conditions) == 1:
        node["where_clause"] = copy.deepcopy(conditions[0])
    else:
        node["where_clause"]["children"] = copy.deepcopy(conditions)
    try:
        [(sql,)] = con.execute("select json_deserialize_sql(?)", [json.dumps(template)]).fetchall()
        return con.execute(sql).fetchnumpy()["seq_id"].astype(np.int64)
    except duckdb.Error:
        return None


def _serialized_statement(con: duckdb.DuckDBPyConnection, query: str) -> Node | None:
    tree = json.loads(con.execute("select json_serialize_sql(?)", [query]).fetchone()[0])
    return None if tree.get("error") else tree
