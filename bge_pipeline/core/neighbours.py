"""Exact nearest neighbours in memory (numpy), for comparing two sets of vectors of the same rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def unit_rows(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """The vectors as rows of a float32 matrix, each scaled to length 1 (cosine becomes a dot product)."""
    matrix = np.vstack(vectors).astype(np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def nearest(matrix: np.ndarray, row: int, k: int) -> set[int]:
    """Positions of the k rows nearest to `row` by cosine, itself excluded."""
    similarity = matrix @ matrix[row]
    similarity[row] = -np.inf
    return set(np.argpartition(-similarity, k)[:k].tolist())


def neighbour_overlap(first: np.ndarray, second: np.ndarray, queries: int, k: int) -> float:
    """The mean share of the k nearest neighbours that two unit-row matrices of the same rows agree on, over the
    first `queries` rows (each row's neighbours taken among all the others)."""
    rows = range(min(queries, len(first)))
    return float(np.mean([len(nearest(first, q, k) & nearest(second, q, k)) / k for q in rows])) if rows else 0.0
