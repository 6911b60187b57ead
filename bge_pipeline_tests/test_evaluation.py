"""`bge-pipeline eval`: recall@10 and nDCG@10 of ANN, exact and reranked search on the shipped query set."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from bge_pipeline.core.corpus import Segment, load_segments
from bge_pipeline.core.judged_set import build_queries, load_queries, ndcg_at_k, recall_at_k
from bge_pipeline_tests.test_search import MigratedTable, shared_migrated_table


@pytest.fixture(scope="module")
def migrated(server_url: str, minilm_path: str, segments: list[Segment]) -> MigratedTable:
    return shared_migrated_table(server_url, minilm_path, segments)


def test_metrics_match_hand_computed_values() -> None:
    assert recall_at_k([5, 7, 9], [7], k=10) == 1.0
    assert recall_at_k([5, 7, 9], [7, 8], k=10) == 0.5
    assert recall_at_k([5, 7, 9], [9], k=2) == 0.0
    assert ndcg_at_k([7, 5], [7], k=10) == 1.0
    assert ndcg_at_k([5, 7], [7], k=10) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k([1, 2, 3], [9], k=10) == 0.0


def test_the_shipped_query_set_is_what_build_queries_makes_from_the_sample() -> None:
    shipped = load_queries()
    assert len(shipped) == 100
    assert shipped == build_queries(load_segments())
    by_id = {segment.id: segment.text for segment in load_segments()}
    for query in shipped:
        (relevant,) = query.relevant_ids
        assert query.query in by_id[relevant]  # a verbatim excerpt of its one relevant segment


def _run_eval(table: MigratedTable, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, *args: str, **env: str) -> int:
    from bge_pipeline.cli.main import main

    monkeypatch.chdir(tmp_path)
    values = {"DATABASE_URL": table.url, "EMBEDDING_MODEL": table.minilm_path, "EMBEDDING_DEVICE": "cpu", **env}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return main(["eval", *args])


def test_eval_prints_recall_and_ndcg_for_ann_and_exact_search(
    migrated: MigratedTable, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run_eval(migrated, monkeypatch, tmp_path) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "skipped (their rows are not in the table)" in lines[0]  # 300 of the sample's 1,000 rows
    assert lines[1].split()[:4] == ["method", "recall@10", "nDCG@10", "ms/query"]
    figures = {
        line.split()[0]: [float(x) for x in line.split()[1:]] for line in lines[2:] if not line.startswith("note")
    }
    assert set(figures) == {"ann", "exact"}
    assert figures["exact"][0] >= 0.8  # verbatim excerpts find their segment
    assert figures["ann"][0] == pytest.approx(figures["exact"][0], abs=0.05)  # the index loses (almost) nothing
    assert "ENABLE_RERANKER is false" in out


def test_eval_with_the_reranker_and_json_output(
    migrated: MigratedTable, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        "".join(
            json.dumps({"query": segment.text.split(". ")[0], "relevant_ids": [segment.id]}) + "\n"
            for segment in migrated.segments[:4]
        )
    )
    code = _run_eval(
        migrated,
        monkeypatch,
        tmp_path,
        "--queries",
        str(queries),
        "--k",
        "5",
        "--json",
        ENABLE_RERANKER="true",
        RERANKER_MODEL=migrated.minilm_path,
        RERANK_TOP_K="10",
        RETURN_TOP_K="5",
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["k"] == 5 and report["queries"] == 4 and report["candidates"] == 10
    methods = {score["method"]: score for score in report["scores"]}
    assert set(methods) == {"ann", "exact", "ann+rerank"}
    assert all(0.0 <= score["recall"] <= 1.0 and 0.0 <= score["ndcg"] <= 1.0 for score in methods.values())


def test_eval_explains_a_table_that_holds_none_of_the_queries(
    migrated: MigratedTable, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    queries = tmp_path / "elsewhere.jsonl"
    queries.write_text(json.dumps({"query": "no such row", "relevant_ids": [-1]}) + "\n")
    assert _run_eval(migrated, monkeypatch, tmp_path, "--queries", str(queries)) == 2
    assert "none of the 1 queries" in capsys.readouterr().err
