"""The agreement measures of benchmarks/fidelity.py, on constructed vectors (the authors' code is never
imported here: only the script's pure helpers)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "fidelity", Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity.py")
fidelity = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fidelity)


def test_ranks_share_the_average_rank_on_ties():
    assert fidelity.ranks([10, 30, 20, 30]).tolist() == [1.0, 3.5, 2.0, 3.5]


def test_spearman_is_one_for_any_increasing_transform_and_minus_one_reversed():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    assert fidelity.spearman(a, np.exp(3 * a)) == pytest.approx(1.0)
    assert fidelity.spearman(a, -a ** 3) == pytest.approx(-1.0)
    assert fidelity.pearson(a, np.exp(3 * a)) < 0.95  # Pearson sees the non-linearity, Spearman does not


def test_spearman_matches_the_textbook_formula_without_ties():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0]
    d2 = sum((x - y) ** 2 for x, y in zip(fidelity.ranks(a), fidelity.ranks(b), strict=True))
    assert fidelity.spearman(a, b) == pytest.approx(1 - 6 * d2 / (5 * (25 - 1)))


def test_top_k_overlap_counts_shared_members_of_the_two_top_sets():
    a = np.arange(10.0)                                    # top 30%: 9, 8, 7
    b = np.array([0, 1, 2, 3, 4, 5, 9, 7, 8, 6.0])       # top 30%: 6, 8, 7
    assert fidelity.top_k_overlap(a, b, 0.3) == pytest.approx(2 / 3)
    assert fidelity.top_k_overlap(a, b, 0.1) == 0.0        # 9 versus 6
    assert fidelity.top_k_overlap(a, a[::-1], 0.05) == 0.0  # k is at least one row


def test_agreement_reports_every_measure_on_flattened_matrices():
    kernel = np.arange(16.0).reshape(4, 4)
    report = fidelity.agreement(kernel, kernel + 0.5)
    assert report["n"] == 16
    assert report["spearman"] == report["pearson"] == 1.0
    assert report["top10_overlap"] == report["top30_overlap"] == 1.0
    assert report["max_abs_diff"] == 0.5


def test_subtask_order_lays_each_subtask_out_consecutively_as_matching_reshapes():
    tasks = ["a", "b", "a", "c", "b", "d", "c", "a"]
    order = fidelity.subtask_order(tasks, per_subtask=2, n_subtasks=3)
    assert [tasks[i] for i in order] == ["a", "a", "b", "b", "c", "c"]
    with pytest.raises(ValueError, match="need 4 tasks with 2 rows"):
        fidelity.subtask_order(tasks, per_subtask=2, n_subtasks=4)
