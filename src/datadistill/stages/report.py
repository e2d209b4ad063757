"""``report.html``: one self-contained page (images embedded) that shows why the student is better.

AP table, training curves, the score histogram with the threshold, pseudo-label precision/recall against
the threshold where held-back labels exist, and a gallery of pseudo-labeled images.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from datadistill.data.coco import CocoDataset, load_coco
from datadistill.data.images import read_image, resolve_image_path
from datadistill.errors import UserError
from datadistill.layout import RunLayout
from datadistill.runtime.io import write_text_atomic

log = logging.getLogger(__name__)
GALLERY_SIZE = 8


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _plt().close(fig)
    return _img_tag(buf.getvalue())


def _img_tag(data: bytes, alt: str = "") -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def ap_table(models: list[tuple[str, dict[str, Any]]]) -> str:
    """An HTML table of AP figures (in percent) for each named model's metrics."""
    tasks = [t for t in ("bbox", "keypoints") if any(t in m for _, m in models)]
    keys = ("AP", "AP50", "AP75")
    head = "".join(f"<th>{t} {k}</th>" for t in tasks for k in keys)
    rows = []
    for name, m in models:
        cells = "".join(f"<td>{_fmt(m.get(t, {}).get(k))}</td>" for t in tasks for k in keys)
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def _curves(runs: list[tuple[str, Path]]) -> str:
    plt = _plt()
    series = [(name, _read_jsonl(folder / "metrics.jsonl")) for name, folder in runs]
    series = [(n, rows) for n, rows in series if rows]
    if not series:
        return "<p>No training metrics found.</p>"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, rows in series:
        steps = [r for r in rows if r.get("type") == "step" and "loss" in r]
        if steps:
            axes[0].plot([r["iteration"] for r in steps], [r["loss"] for r in steps], label=name, lw=1)
        evals = [r for r in rows if r.get("type") == "epoch" and isinstance(r.get("val"), dict)]
        for task in ("bbox", "keypoints"):
            pts = [(r.get("epoch"), r["val"].get(task, {}).get("AP")) for r in evals]
            pts = [(e, a) for e, a in pts if e is not None and a is not None]
            if pts:
                axes[1].plot(*zip(*pts, strict=True), marker="o", label=f"{name} {task}")
    axes[0].set(xlabel="iteration", ylabel="training loss", title="loss")
    axes[1].set(xlabel="epoch", ylabel="val AP", title="validation AP")
    for ax in axes:
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def pr_figure(curve: list[dict[str, float]], threshold: float | None) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    t = [c["threshold"] for c in curve]
    ax.plot(t, [c["precision"] if c["kept"] else float("nan") for c in curve], label="precision")
    ax.plot(t, [c["recall"] for c in curve], label="recall")
    if threshold is not None:
        ax.axvline(threshold, color="#c44e52", lw=1.5, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="score threshold", ylim=(0, 1.02), title="pseudo-labels vs held-back labels (IoU 0.5)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def gallery(dataset: CocoDataset, image_root: Path, *, count: int = GALLERY_SIZE, title: str = "") -> str:
    """Up to ``count`` images with their (pseudo-)labels drawn: boxes, class and score, keypoints and skeleton."""
    plt = _plt()
    images = [im for im in dataset.images if len(dataset.labels.get(im.id, ())) > 0][:count]
    if not images:
        return "<p>No labeled image to show.</p>"
    cols = min(4, len(images))
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    cat = dataset.keypoint_category
    for ax in axes.ravel():
        ax.axis("off")
    for ax, im in zip(axes.ravel(), images, strict=False):
        try:
            img = read_image(resolve_image_path(image_root, im.file_name)).permute(1, 2, 0).numpy()
        except UserError:
            continue
        ax.imshow(img)
        lab = dataset.labels[im.id]
        for j in range(len(lab)):
            x1, y1, x2, y2 = lab.boxes[j]
            if lab.iscrowd[j]:  # an ignore region
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="silver", lw=1, ls="--"))
                continue
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="yellow", lw=1))
            text = dataset.class_names[int(lab.labels[j])]
            if lab.scores is not None:
                text += f" {lab.scores[j]:.2f}"
            ax.text(x1, y1, text, color="black", fontsize=6, va="bottom", bbox={"color": "yellow", "pad": 0.5})
            if lab.keypoints is not None and cat is not None:
                kp = lab.keypoints[j]
                for a, b in cat.skeleton:
                    if kp[a - 1, 2] > 0 and kp[b - 1, 2] > 0:
                        ax.plot([kp[a - 1, 0], kp[b - 1, 0]], [kp[a - 1, 1], kp[b - 1, 1]], color="lime", lw=1)
                for k, name in enumerate(cat.keypoints):
                    if kp[k, 2] > 0:
                        colour = "red" if "left" in name else "dodgerblue" if "right" in name else "white"
                        ax.plot(kp[k, 0], kp[k, 1], "o", ms=2.5, color=colour)
        ax.set_title(im.file_name, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th:first-child{text-align:left}img{max-width:100%}code{background:#f4f4f4;padding:1px 4px}
.note{color:#555;font-size:90%}
"""


def write_report(run_dir: str | Path, *, extra_sections: list[tuple[str, str]] | None = None) -> Path:
    """Write ``RUN_DIR/report.html`` from what the run folder holds; missing parts are said to be missing."""
    layout = RunLayout(Path(run_dir))
    if not layout.root.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    cfg_path = layout.config
    cfg: dict[str, Any] = {}
    if cfg_path.exists():
        from datadistill.config import read_recorded_config

        try:
            cfg = read_recorded_config(cfg_path)
        except UserError as exc:
            log.warning("%s; the report leaves out what needs it", exc)
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    base = Path(cfg.get("_base", ".")) if cfg else Path(".")
    sections: list[tuple[str, str]] = []

    models: list[tuple[str, dict[str, Any]]] = []
    teacher = _read_json(layout.teacher_metrics())
    if teacher:
        models.append(("teacher (supervised)", teacher))
    rounds = layout.rounds()
    for r in rounds:
        m = _read_json(layout.student_metrics(r))
        if m:
            models.append((f"student, round {r}", m))
    sections.append(("Accuracy on the validation set", ap_table(models) if models else "<p>No evaluation yet.</p>"))
    sections.append(
        ("Training", _curves([("teacher", layout.teacher)] + [(f"student {r}", layout.student(r)) for r in rounds]))
    )
    for r in rounds:
        sel = _read_json(layout.selection(r))
        parts = []
        if sel:
            thr = ", ".join(f"{k}: {v:.3f}" if v is not None else f"{k}: none" for k, v in sel["thresholds"].items())
            parts.append(
                f"<p>Policy <code>{html.escape(sel['policy'])}</code>; thresholds {html.escape(thr)}. "
                f"Kept {sel['achieved_objects']} objects on {sel['unlabeled_images']} unlabeled images "
                f"({sel['achieved_per_image']:.2f} per image; labeled data: {sel.get('target_per_image') or 0:.2f})"
                f" out of {sel['candidates']} candidates"
                + (f", and {sel['ignore_regions']} ignore regions" if sel.get("ignore_regions") else "")
                + ".</p>"
                + (
                    f"<p>{sel['cross_class_duplicates']} objects above the threshold were dropped as a higher-scoring"
                    f" object of another class (IoU {sel['cross_class_iou']:g} or more); the curve below is before"
                    " that step.</p>"
                    if sel.get("cross_class_duplicates")
                    else ""
                )
            )
        if layout.scores_png(r).exists():
            parts.append(_img_tag(layout.scores_png(r).read_bytes(), "score histogram"))
        truth = data.get("unlabeled_truth")
        if truth and layout.pseudo(r).exists() and sel:
            from datadistill.stages.quality import match_shards

            matched = match_shards(layout.label(r), load_coco(base / truth), class_names=tuple(sel["thresholds"]))
            thresholds = [v for v in sel["thresholds"].values() if v is not None]
            curve = matched.curve(np.linspace(0.05, 0.95, 19))
            parts.append(pr_figure(curve, thresholds[0] if len(set(thresholds)) == 1 else None))
        if layout.pseudo(r).exists():
            pseudo = load_coco(layout.pseudo(r))
            root = _unlabeled_root(layout, r)
            if root is not None:
                parts.append(gallery(pseudo, root, title="pseudo-labels"))
        sections.append((f"Pseudo-labels, round {r}", "".join(parts) or "<p>Not selected yet.</p>"))
    sections += extra_sections or []
    body = "".join(f"<h2>{html.escape(t)}</h2>{content}" for t, content in sections)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>datadistill report</title><style>{CSS}</style>"
        f"</head><body><h1>datadistill report</h1><p class='note'>{html.escape(str(layout.root))}</p>{body}"
        "</body></html>"
    )
    write_text_atomic(layout.report, page)
    return layout.report


def _unlabeled_root(layout: RunLayout, r: int) -> Path | None:
    manifest = _read_json(layout.label(r) / "manifest.json")
    if not manifest:
        return None
    root = manifest.get("config", {}).get("image_root")
    return Path(root) if root else None
