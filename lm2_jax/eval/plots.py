"""Figures of the evaluation: the BABILong accuracy grid and the memory's read attention."""

from __future__ import annotations

import os

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def accuracy_heatmap(table: dict[str, dict[str, float]], path: str, title: str) -> str:
    """`table[length][task]` in [0, 1] (NaN: not run) as a lengths x tasks grid with an Avg column,
    the percentage written in every cell, as BABILong's figures."""
    plt = _pyplot()
    lengths = list(table)
    tasks = list(dict.fromkeys(t for row in table.values() for t in row))
    grid = np.array([[table[n].get(t, np.nan) for t in tasks] for n in lengths], float)
    with np.errstate(all="ignore"):
        avg = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in grid])
    grid = np.concatenate([grid, avg[:, None]], axis=1)
    cols = tasks + ["Avg"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(cols), 1.2 + 0.5 * len(lengths)))
    cmap = plt.get_cmap("RdYlGn").copy()
    cmap.set_bad("#cccccc")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            ax.text(j, i, "–" if not np.isfinite(v) else f"{100 * v:.0f}", ha="center", va="center", fontsize=9,
                    fontweight="bold" if j == len(cols) - 1 else "normal")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(lengths)), lengths)
    ax.set_xlabel("task")
    ax.set_ylabel("context length")
    ax.axvline(len(cols) - 1.5, color="black", lw=1)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="accuracy")
    return _save(fig, path)


def top_token_labels(attn_SN: np.ndarray, labels: list[str], k: int) -> list[str]:
    """`labels` with all but the k tokens of highest peak attention blanked (ties: the earlier)."""
    peak_S = np.asarray(attn_SN).max(axis=1)
    keep = set(np.argsort(-peak_S, kind="stable")[:k].tolist())
    return [label if i in keep else "" for i, label in enumerate(labels)]


def memory_read_heatmaps(attn_before_SN, attn_after_SN, token_labels: list[str], path: str, title: str,
                         top_tokens: int = 12) -> str:
    """Token x slot read attention of one segment's tokens against the memory before and after
    that segment's update, side by side; only the `top_tokens` most attending tokens are named."""
    plt = _pyplot()
    before, after = np.asarray(attn_before_SN), np.asarray(attn_after_SN)
    S, N = before.shape
    vmax = float(max(before.max(), after.max()))
    fig, axes = plt.subplots(1, 2, figsize=(11, 2.5 + min(S, 64) * 0.12), sharey=True)
    for ax, attn, name in zip(axes, (before, after), ("before the update (M_s)", "after the update (M_s+1)")):
        im = ax.imshow(attn, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("memory slot")
        step = max(1, N // 16)
        ax.set_xticks(range(0, N, step))
    labels = top_token_labels(np.maximum(before, after), [str(t).strip() or repr(t) for t in token_labels], top_tokens)
    axes[0].set_yticks(range(S), labels, fontsize=7)
    axes[0].tick_params(axis="y", length=0)
    axes[0].set_ylabel("token of the segment")
    fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02, label="read attention (mean over heads)")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def memory_trajectories(stats: dict[str, np.ndarray], path: str, title: str) -> str:
    """One small line plot per statistic, over segments."""
    plt = _pyplot()
    names = list(stats)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        y = np.asarray(stats[name], float).reshape(-1)
        ax.plot(np.arange(len(y)), y, marker="o", ms=2, lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("segment", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
