"""The evaluation figures: each writes a readable PNG, and what is written in the cells is right."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lm2_jax.eval import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_h=100, min_w=200):
    """A PNG whose pixels make a figure of a sensible size (not a blank 1x1 or a runaway 10^5 px)."""
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert min_h <= h <= 5000 and min_w <= w <= 5000, img.shape
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert np.ptp(img[..., :3]) > 0.1  # something is drawn
    return img


@pytest.fixture()
def captured(monkeypatch):
    """The figures handed to `plots._save`, so the cell texts can be read back before closing."""
    figs = []
    real = plots._save

    def spy(fig, path):
        figs.append([t.get_text() for ax in fig.axes for t in ax.texts])
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return figs


def test_accuracy_heatmap_cells_avg_and_missing(tmp_path, captured):
    tasks = [f"qa{i}" for i in range(1, 11)]
    table = {n: {t: (i + j) / 20 for j, t in enumerate(tasks)} for i, n in enumerate(["0k", "1k", "2k"])}
    table["1k"]["qa3"] = float("nan")  # a cell that failed
    table["2k"] = {t: float("nan") for t in tasks}  # a whole length that failed
    path = tmp_path / "sub" / "dir" / "grid.png"  # parents are created
    assert plots.accuracy_heatmap(table, str(path), "tiny run, BABILong") == str(path)
    _check_png(path)
    texts = captured[0]
    assert len(texts) == 3 * 11
    row0 = texts[:11]
    assert row0[:10] == [f"{100 * j / 20:.0f}" for j in range(10)]
    assert row0[10] == f"{100 * np.mean([j / 20 for j in range(10)]):.0f}"  # Avg = row mean
    row1 = texts[11:22]
    assert row1[2] == "–"
    assert row1[10] == f"{100 * np.mean([(1 + j) / 20 for j in range(10) if j != 2]):.0f}"  # NaN left out
    assert texts[22:] == ["–"] * 11
    assert plt.get_fignums() == []  # closed


def test_top_token_labels_exact():
    attn_SN = np.array([[0.1, 0.2], [0.9, 0.0], [0.3, 0.3], [0.0, 0.5], [0.9, 0.1]])
    labels = ["a", "b", "c", "d", "e"]
    assert plots.top_token_labels(attn_SN, labels, 2) == ["", "b", "", "", "e"]
    assert plots.top_token_labels(attn_SN, labels, 3) == ["", "b", "", "d", "e"]
    assert plots.top_token_labels(attn_SN, labels, 1) == ["", "b", "", "", ""]  # tie: the earlier token
    assert plots.top_token_labels(attn_SN, labels, 0) == [""] * 5
    assert plots.top_token_labels(attn_SN, labels, 10) == labels


def test_memory_read_heatmaps_long_segment(tmp_path):
    rng = np.random.default_rng(0)
    S, N = 300, 64
    before_SN = rng.dirichlet(np.ones(N), size=S)
    after_SN = rng.dirichlet(np.ones(N), size=S)
    labels = [f" tok{i}" for i in range(S)]
    path = tmp_path / "maps" / "read.png"
    assert plots.memory_read_heatmaps(before_SN, after_SN, labels, str(path), "segment 3 of 8", top_tokens=12) \
        == str(path)
    _check_png(path, min_h=300, min_w=600)
    assert plt.get_fignums() == []


def test_memory_trajectories(tmp_path):
    segments = 9
    stats = {"memory_rms": np.linspace(1, 2, segments), "g_in": np.full(segments, 0.5),
             "g_f": np.linspace(0.9, 0.7, segments), "slot_norm_max": np.arange(segments, dtype=float)}
    path = tmp_path / "traj.png"
    assert plots.memory_trajectories(stats, str(path), "memory over segments") == str(path)
    _check_png(path)
    assert plt.get_fignums() == []
