"""The accuracy benchmark's report (``bench.accuracy``): the target check at one M/N, the
Markdown table with the task description, and the accuracy-vs-steps / -vs-time plots."""

from __future__ import annotations

from typing import Any

from bench.formatting import fmt_count, fmt_seconds, markdown_table
from bench.output import pyplot, save_figure


def summary(data: dict[str, Any], fraction: float = 0.01) -> dict[str, Any]:
    """Target check at M/N = ``fraction``: gaps to full and to random (points of top-1)."""
    res = data["results"]
    full = next((r for r in res if r["sampler"] == "full"), None)
    at = {r["sampler"]: r for r in res if r["fraction"] == fraction}
    out: dict[str, Any] = {"fraction": fraction, "full": full["top1"] if full else None}
    for s in ("annoy", "hnsw"):
        if s in at and full is not None:
            gap_full = 100 * (full["top1"] - at[s]["top1"])
            gap_rand = 100 * (at[s]["top1"] - at["random"]["top1"]) if "random" in at else None
            out[s] = {
                "top1": at[s]["top1"],
                "below_full_points": gap_full,
                "above_random_points": gap_rand,
                "met": gap_full <= 1.0 and (gap_rand is None or gap_rand > 0),
            }
    if "random" in at:
        out["random"] = at["random"]["top1"]
    return out


def _row_rule(t: dict[str, Any]) -> str:
    """How the sampled rows moved (``classifier.row_norm`` / ``row_momentum``)."""
    if "row_norm" not in t:
        return "Sampled rows free to grow, lazy momentum (before `classifier.row_norm`)."
    return (f"Sampled rows: `row_norm` {t['row_norm']}, `row_momentum` {t['row_momentum']}; "
            "`full` is the plain dense softmax (W free, torch SGD).")  # fmt: skip


def render(data: dict[str, Any]) -> str:
    t = data["meta"]["task"]
    rows = []
    for r in data["results"]:
        rows.append(
            {
                **r,
                "frac": "100% (dense)" if r["fraction"] is None else f"{r['fraction']:.1%}",
                "top1_pct": 100 * r["top1"],
                "fam_pct": 100 * r["family_top1"],
                "rebuild_s": r["rebuild_s"] if r["sampler"] not in ("full", "random") else None,
            }
        )
    cols = [
        ("frac", "M/N", None),
        ("num", "M", None),
        ("sampler", "sampler", None),
        ("top1_pct", "held-out top-1 %", lambda x: f"{x:.2f}"),
        ("fam_pct", "family top-1 %", lambda x: f"{x:.2f}"),
        ("wall_s", "train wall time", fmt_seconds),
        ("rebuild_s", "of which index builds", fmt_seconds),
    ]
    p1, p2 = plot(data)
    return "\n".join(
        [
            f"N = {fmt_count(t['num_classes'])} classes in families of {t['family']} "
            f"(class offset {t['fine']} around unit family centres, input noise {t['noise']}), "
            f"input dim {t['input_dim']}, embedding Linear({t['input_dim']}→{t['dim']}) + "
            f"`{t['head']}` head (scale {t['scale']}, margin {t['margin']}); {t['steps']} steps "
            f"of B = {t['batch']} (same data order for "
            f"every run), SGD lr {t['lr']}, momentum 0.9, wd 5e-4; index rebuilt (blocking) "
            f"every {t['interval']} steps by `IndexMaintainer` (full builds; annoy "
            f"ntrees 10, hnsw m 8 / ef_construction 40 / ef 64, one build thread). "
            f"Top-1 over all N classes on "
            f"{t['test_size']} held-out samples; *family top-1* counts a sibling as right "
            f"(what random sampling already learns). B is small because M/N = 0.5% of "
            f"{fmt_count(t['num_classes'])} leaves M = "
            f"{max(int(round(0.005 * t['num_classes'])), 2 * t['batch'])} active classes. "
            f"{_row_rule(t)}",
            "",
            markdown_table(rows, cols),
            "",
            f"![accuracy vs steps]({p1.name}) ![accuracy vs time]({p2.name})",
        ]
    )


def plot(data: dict[str, Any]):
    plt = pyplot()
    paths = []
    for xkey, xlabel, name in (
        ("step", "training step", "accuracy_vs_steps.png"),
        ("seconds", "wall time (s, incl. index builds)", "accuracy_vs_time.png"),
    ):
        fracs = sorted({r["fraction"] for r in data["results"] if r["fraction"] is not None})
        fig, axes = plt.subplots(1, len(fracs), figsize=(5 * len(fracs), 4), squeeze=False)
        full = next((r for r in data["results"] if r["sampler"] == "full"), None)
        for ax, frac in zip(axes[0], fracs, strict=True):
            runs = [r for r in data["results"] if r["fraction"] == frac]
            if full is not None:
                runs = [full, *runs]
            for r in runs:
                xs = [c[xkey] for c in r["curve"]]
                ys = [100 * c["top1"] for c in r["curve"]]
                ax.plot(xs, ys, marker=".", label=r["sampler"])
            ax.set_title(f"M/N = {frac:.1%}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out top-1 (%)")
            ax.grid(True, alpha=0.3)
            ax.legend()
        paths.append(save_figure(fig, name))
    return paths
