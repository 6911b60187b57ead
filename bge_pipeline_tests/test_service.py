"""EmbeddingsService, the seed's API, as application code calls it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from bge_pipeline import EmbeddingsService
from bge_pipeline.defs.resources import build_resources
from bge_pipeline_tests.helpers import same_text_rows


@pytest.fixture
def service(minilm_path: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[type[EmbeddingsService]]:
    """The service initialised the guide's way, from the environment (no .env in the working directory)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMBEDDING_MODEL", minilm_path)
    monkeypatch.setenv("EMBEDDING_DEVICE", "cpu")
    monkeypatch.setenv("RERANKER_MODEL", minilm_path)  # random one-label head: real code path, meaningless scores
    EmbeddingsService.init_from_env()
    yield EmbeddingsService
    EmbeddingsService.reset()


def test_encode_texts_returns_normalised_float32_rows(service: type[EmbeddingsService]) -> None:
    texts = ["The state of the Union is strong.", "Tariffs protect American industry.", "?!"]
    vectors = service.encode_texts(texts)
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_batch_size_changes_nothing_but_speed(service: type[EmbeddingsService]) -> None:
    texts = [f"Congress passed law number {i} on the public debt." for i in range(5)]
    assert same_text_rows(service.encode_texts(texts), service.encode_texts(texts, batch_size=2)).all()
    assert service.encode_texts([]).shape == (0, 384)


def test_similar_sentences_are_closer_than_unrelated_ones(service: type[EmbeddingsService]) -> None:
    army, navy, bread = service.encode_texts(
        ["We must strengthen the army.", "Our navy needs more ships.", "Knead the dough and let it rise."]
    )
    assert float(army @ navy) > float(army @ bread)


def test_the_service_and_the_pipeline_share_one_loaded_model(service: type[EmbeddingsService]) -> None:
    resources = build_resources(service.settings(), from_environment=False)
    assert resources["encoder"].get() is service.encoder()


def test_rerank_returns_indices_best_first_by_the_cross_encoder(service: type[EmbeddingsService]) -> None:
    query = "the national debt"
    texts = ["We paid down the public debt.", "The harvest was plentiful.", "Interest on the debt grew.", "A new fort."]
    order = service.rerank(query, texts, top_k=3)
    scores = service.reranker().model.predict([(query, text) for text in texts])
    assert order == [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")[:3]]
    assert sorted(service.rerank(query, texts)) == [0, 1, 2, 3]  # top_k=20 > 4 texts: all of them
    assert service.rerank(query, []) == []


def test_a_single_string_is_refused_rather_than_encoded_letter_by_letter(service: type[EmbeddingsService]) -> None:
    with pytest.raises(TypeError, match="list of texts"):
        service.encode_texts("one text")  # type: ignore[arg-type]


def test_the_service_says_when_it_was_not_initialised() -> None:
    EmbeddingsService.reset()
    with pytest.raises(RuntimeError, match="init_from_env"):
        EmbeddingsService.encode_texts(["x"])
