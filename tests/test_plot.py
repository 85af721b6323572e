"""The --plot figure: a readable PNG written atomically, +inf scores drawn, a clear hint without matplotlib."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxrepair.errors import OnnxRepairError
from onnxrepair.plot import plot_importance


def euclid_scores(count: int = 64, seed: int = 0) -> np.ndarray:
    """Euclid = sqrt(af + ns) over random spectrum counts, as localize computes it."""
    rng = np.random.default_rng(seed)
    scores: np.ndarray = np.sqrt(rng.poisson(3, count) + rng.poisson(20, count)).astype(np.float64)
    return scores


def top(scores: np.ndarray, n: int) -> list[int]:
    chosen: list[int] = np.argsort(-scores, kind="stable")[:n].tolist()
    return chosen


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        image.load()  # decodes the whole file: a truncated PNG fails here
    assert 600 <= width <= 3000 and 300 <= height <= 2000
    assert width > height  # two panels side by side


def test_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    scores = euclid_scores()
    path = tmp_path / "importance.png"
    plot_importance(scores, path, metric="Euclid", layer="/fc1/Gemm", selected=top(scores, 10))
    assert_png(path)
    assert [p.name for p in tmp_path.iterdir()] == ["importance.png"]  # no temporary file left behind


def test_overwrites_an_existing_file(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "importance.png"
    path.write_bytes(b"old")
    plot_importance(euclid_scores(), path, metric="Euclid", layer="/fc1/Gemm")
    assert_png(path)
    assert [p.name for p in tmp_path.iterdir()] == ["importance.png"]


@pytest.mark.parametrize(
    "scores",
    [
        pytest.param(np.array([np.inf, 3.0, 0.0, np.inf, 1.5, 0.0]), id="some-inf"),
        pytest.param(np.full(5, np.inf), id="all-inf"),
        pytest.param(np.array([np.inf, 2.0, 2.0, 2.0]), id="inf-and-constant"),
        pytest.param(np.full(24, 0.5), id="constant"),
        pytest.param(np.zeros(10), id="all-zero"),
        pytest.param(np.array([-2.8, -1.0, 0.0, 3.0]), id="negative-wong3"),
        pytest.param(np.array([1.0]), id="one-neuron"),
    ],
)
def test_awkward_scores_draw(tmp_path: Path, scores: np.ndarray) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "importance.png"
    plot_importance(scores, path, metric="DStar", layer="/fc1/Gemm", selected=top(scores, min(2, scores.size)))
    assert_png(path)


def test_large_layer(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    scores = np.random.default_rng(1).exponential(0.2, 1000)
    path = tmp_path / "importance.png"
    plot_importance(scores, path, metric="Tarantula", layer="classifier", selected=top(scores, 100))
    assert_png(path)


@pytest.mark.parametrize(
    ("scores", "selected"),
    [
        (np.array([]), ()),
        (np.zeros((2, 3)), ()),
        (np.array([1.0, np.nan]), ()),
        (np.array([1.0, -np.inf]), ()),
        (np.array([1.0, 2.0]), (2,)),
        (np.array([1.0, 2.0]), (-1,)),
    ],
)
def test_rejects_what_cannot_be_drawn(tmp_path: Path, scores: np.ndarray, selected: tuple[int, ...]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "importance.png"
    with pytest.raises(ValueError):
        plot_importance(scores, path, metric="Euclid", layer="x", selected=selected)
    assert not path.exists()


def test_missing_matplotlib_gives_the_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    path = tmp_path / "importance.png"
    with pytest.raises(OnnxRepairError, match=r"pip install 'onnxrepair\[plot\]'"):
        plot_importance(euclid_scores(), path, metric="Euclid", layer="/fc1/Gemm")
    assert list(tmp_path.iterdir()) == []
