"""``report.html``: one self-contained page (images embedded) that shows why the student is better.

AP table (percent) with the student's gain over the teacher, training curves on an iteration axis, the
score histogram with the threshold, pseudo-label precision/recall against the threshold where held-back
labels exist, a gallery of pseudo-labeled images, a gallery of the images the views disagree on most (with
the held-back truth beside them where it is known), and the time of each stage.
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
from datadistill.data.images import as_image_root, read_image, resolve_image_path
from datadistill.data.label_folder import open_label_folder
from datadistill.data.label_table import TABLE_NAME, first_images
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


def _gain(a: Any, b: Any) -> str:
    return "–" if a is None or b is None else f"{100 * (a - b):+.1f}"


def ap_table(models: list[tuple[str, dict[str, Any]]], *, baseline: str | None = None) -> str:
    """An HTML table of AP figures (in percent) for each named model's metrics; with ``baseline`` (one of
    the names), a gain row (in AP points) for every other model."""
    tasks = [t for t in ("bbox", "keypoints") if any(t in m for _, m in models)]
    keys = ("AP", "AP50", "AP75")
    head = "".join(f"<th>{t} {k}</th>" for t in tasks for k in keys)
    rows = []
    for name, m in models:
        cells = "".join(f"<td>{_fmt(m.get(t, {}).get(k))}</td>" for t in tasks for k in keys)
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    base = dict(models).get(baseline) if baseline is not None else None
    for name, m in models if base is not None else ():
        if name != baseline:
            cells = "".join(f"<td>{_gain(m.get(t, {}).get(k), base.get(t, {}).get(k))}</td>" for t in tasks
                            for k in keys)  # fmt: skip
            rows.append(f"<tr><th>gain: {html.escape(name)} − {html.escape(str(baseline))}</th>{cells}</tr>")
    note = "AP in percent; gains in AP points." if base is not None else ""
    counted = sorted({int(m["bbox"].get("max_dets", 100)) for _, m in models if "bbox" in m})  # absent: COCO's 100
    if counted != [100] and counted:
        note += f" Box AP counts at most {' or '.join(map(str, counted))} detections per image."
    note = f"<p class='note'>{note.strip()}</p>" if note else ""
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>{note}"


def eval_points(rows: list[dict[str, Any]], task: str) -> list[tuple[int, float]]:
    """``(iteration, validation AP in percent)`` at each evaluation of a ``metrics.jsonl``. An epoch line
    gives its iteration (``iteration``), else the iterations are counted from its ``it_s * time_s`` (the
    steps of that epoch), so that runs whose epochs differ in length share one axis."""
    points, done = [], 0
    for r in rows:
        if r.get("type") != "epoch":
            continue
        done = int(r["iteration"]) if "iteration" in r else done + round(r.get("it_s", 0.0) * r.get("time_s", 0.0))
        ap = r["val"].get(task, {}).get("AP") if isinstance(r.get("val"), dict) else None
        if ap is not None:
            points.append((done, 100 * ap))
    return points


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
        for task in ("bbox", "keypoints"):
            pts = eval_points(rows, task)
            if pts:
                axes[1].plot(*zip(*pts, strict=True), marker="o", label=f"{name} {task}")
    axes[0].set(xlabel="iteration", ylabel="training loss", title="loss")
    axes[1].set(xlabel="iteration", ylabel="validation AP (%)", title="validation AP")
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


def gallery(dataset: CocoDataset, image_root: Path | str, *, count: int = GALLERY_SIZE, title: str = "") -> str:
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
            ax.text(x1, y1, text, color="black", fontsize=6, va="bottom", bbox={"color": "yellow", "pad": 0.5},
                    parse_math=False)  # fmt: skip
            if lab.keypoints is not None and cat is not None:
                kp = lab.keypoints[j]
                for a, b in cat.skeleton:
                    if kp[a - 1, 2] > 0 and kp[b - 1, 2] > 0:
                        ax.plot([kp[a - 1, 0], kp[b - 1, 0]], [kp[a - 1, 1], kp[b - 1, 1]], color="lime", lw=1)
                for k, name in enumerate(cat.keypoints):
                    if kp[k, 2] > 0:
                        colour = "red" if "left" in name else "dodgerblue" if "right" in name else "white"
                        ax.plot(kp[k, 0], kp[k, 1], "o", ms=2.5, color=colour)
        ax.set_title(im.file_name, fontsize=7, parse_math=False)
    fig.suptitle(title, fontsize=9, parse_math=False)
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
    cfg: dict[str, Any] = {}
    if layout.config.exists():
        from datadistill.config import read_recorded_config

        try:
            cfg = read_recorded_config(layout.config)
        except UserError as exc:
            log.warning("%s; the report leaves out what needs it", exc)
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    base = Path(cfg.get("_base", ".")) if cfg else Path(".")
    truth_path = data.get("unlabeled_truth")
    truth = load_coco(base / truth_path) if truth_path and (base / truth_path).exists() else None
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
    table = ap_table(models, baseline="teacher (supervised)" if teacher else None)
    sections.append(("Accuracy on the validation set", table if models else "<p>No evaluation yet.</p>"))
    sections.append(
        ("Training", _curves([("teacher", layout.teacher)] + [(f"student {r}", layout.student(r)) for r in rounds]))
    )
    for r in rounds:
        sections.append((f"Pseudo-labels, round {r}", pseudo_section(layout, r, truth) or "<p>Not selected yet.</p>"))
        doubtful = doubt_section(layout, r, truth)
        if doubtful:
            sections.append((f"The images the views disagree on most, round {r}", doubtful))
    timings = _read_json(layout.root / "timings.json")
    if isinstance(timings, dict) and isinstance(timings.get("seconds"), dict) and timings["seconds"]:
        sections.append(("Time per stage", stage_times(timings["seconds"])))
    sections += extra_sections or []
    body = "".join(f"<h2>{html.escape(t)}</h2>{content}" for t, content in sections)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>datadistill report</title><style>{CSS}</style>"
        f"</head><body><h1>datadistill report</h1><p class='note'>{html.escape(str(layout.root))}</p>{body}"
        "</body></html>"
    )
    write_text_atomic(layout.report, page)
    return layout.report


def thresholds_text(thresholds: dict[str, float | None]) -> str:
    """``threshold 0.551 (every class)`` when the classes share one, else ``thresholds circle: 0.551, ...``."""
    values = set(thresholds.values())
    if len(values) == 1 and None not in values:
        (value,) = values
        return f"threshold {value:.3f} (every class)" if len(thresholds) > 1 else f"threshold {value:.3f}"
    return "thresholds " + ", ".join(f"{k}: {v:.3f}" if v is not None else f"{k}: none" for k, v in thresholds.items())


def selection_text(sel: dict[str, Any]) -> str:
    """What ``select`` chose, in a sentence or two of HTML."""
    text = (
        f"<p>Policy <code>{html.escape(sel['policy'])}</code>; {html.escape(thresholds_text(sel['thresholds']))}. "
        f"Kept {sel['achieved_objects']:,} objects on {sel['unlabeled_images']:,} unlabeled images "
        f"({sel['achieved_per_image']:.2f} per image; labeled data: {sel.get('target_per_image') or 0:.2f})"
        f" out of {sel['candidates']:,} candidates"
        + (f", and {sel['ignore_regions']:,} ignore regions" if sel.get("ignore_regions") else "")
        + ".</p>"
    )
    if sel.get("cross_class_duplicates"):
        text += (
            f"<p>{sel['cross_class_duplicates']:,} candidates were dropped before the threshold was chosen, each"
            f" overlapping a higher-scoring candidate of another class by IoU {sel['cross_class_iou']:g} or more"
            " (one class per object); the precision/recall plot below still counts them.</p>"
        )
    return text


def pseudo_section(layout: RunLayout, r: int, truth: CocoDataset | None) -> str:
    """Round ``r``'s selection, score histogram, precision/recall against ``truth`` and pseudo-label gallery."""
    sel = _read_json(layout.selection(r))
    parts = [selection_text(sel)] if sel else []
    if layout.scores_png(r).exists():
        parts.append(_img_tag(layout.scores_png(r).read_bytes(), "score histogram"))
    if truth is not None and layout.pseudo(r).exists() and sel:
        from datadistill.stages.quality import match_shards

        matched = match_shards(layout.label(r), truth, class_names=tuple(sel["thresholds"]))
        thresholds = [v for v in sel["thresholds"].values() if v is not None]
        curve = matched.curve(np.linspace(0.05, 0.95, 19))
        parts.append(pr_figure(curve, thresholds[0] if len(set(thresholds)) == 1 else None))
    root = _unlabeled_root(layout, r)
    if layout.pseudo(r).exists() and root is not None:
        table = layout.pseudo(r).parent / TABLE_NAME  # read in part, where the json would be read whole
        pseudo = first_images(table, count=GALLERY_SIZE) if table.exists() else load_coco(layout.pseudo(r))
        parts.append(gallery(pseudo, root, title="pseudo-labels"))
    return "".join(parts)


def stage_times(seconds: dict[str, float]) -> str:
    """One line per stage: ``label: 1,899 s (31.6 min)``."""
    items = "".join(f"<li>{html.escape(k)}: {format_seconds(v)}</li>" for k, v in seconds.items())
    return f"<ul>{items}</ul>"


def format_seconds(seconds: float) -> str:
    """``42 s``, ``1,899 s (31.6 min)``, ``12,600 s (3.5 h)``: a thousands comma, and minutes or hours past two
    minutes, so that no figure reads as two."""
    text = f"{seconds:,.0f} s"
    if seconds >= 2 * 3600:
        return f"{text} ({seconds / 3600:.1f} h)"
    if seconds >= 120:
        return f"{text} ({seconds / 60:.1f} min)"
    return text


DOUBT_GALLERY_SIZE = 4
# the doubt gallery is drawn at the page's width (1,100 px at the report's 90 dpi), two panels a row, so that
# its box labels (class, score, views, spread) read at about 11 px
DOUBT_FIGURE_WIDTH_IN, DOUBT_PANEL_HEIGHT_IN = 12.0, 6.2
LABEL_PT, TITLE_PT = 9, 11
DOUBT_NOTE = (
    "<p class='note'>The {n} unlabeled images that <code>datadistill review</code> ranks most doubtful (its "
    "doubt in each title). Left: the candidates the selection kept (solid) and the {below} most doubtful of "
    "those below it (dashed), coloured by how many of the {v} views saw each (red: one, green: all); each label "
    "reads class, score, views that saw it and, where measured, &plusmn; the spread of its score across the "
    "views. The shaded band spans &plusmn; the box spread: where the views put the box's edges (the views' own "
    "boxes are not stored; the band stands for them). {right}</p>"
)


def doubt_section(layout: RunLayout, r: int, truth: CocoDataset | None) -> str:
    """Round ``r``'s most doubtful images (:func:`doubt_gallery`), or "" when the round has no selection
    yet, no complete labeling or no image folder."""
    sel = _read_json(layout.selection(r))
    root = _unlabeled_root(layout, r)
    if not sel or root is None:
        return ""
    try:
        return doubt_gallery(layout.label(r), layout.selection(r), tuple(sel["thresholds"]), root, truth)
    except UserError as exc:
        log.warning("the doubtful images are left out of the report: %s", exc)
        return ""


def doubt_gallery(
    labels_dir: Path,
    selection_path: Path,
    class_names: tuple[str, ...],
    image_root: Path | str,
    truth: CocoDataset | None,
    *,
    count: int = DOUBT_GALLERY_SIZE,
    below_count: int = 4,
) -> str:
    """The ``count`` most doubtful images of a labeling (the ranking of :func:`datadistill.stages.review.review`)
    with their kept candidates and the ``below_count`` most doubtful of the others drawn by
    :func:`draw_candidates`, each beside its held-back truth where ``truth``
    has the image."""
    from datadistill.stages import review

    folder = open_label_folder(labels_dir)
    stats = review.folder_stats(folder, len(class_names))
    thr = review.read_thresholds(selection_path, class_names)
    num_views = stats.num_views
    ranking = review.rank_folder(folder, thr, num_views=num_views)
    table, obj = review.chosen_objects(folder, ranking, ranking.order[:count], thr, num_views=num_views,
                                       num_keypoints=0)  # fmt: skip
    doubt = obj["doubt"]
    image_doubt = ranking.image_doubt[ranking.order[:count]]
    names = table["file_name"].to_pylist()
    by_name = {im.file_name: im.id for im in truth.images} if truth is not None else {}
    chosen = list(range(len(names)))
    with_truth = any(names[r] in by_name for r in chosen)
    plt = _plt()
    # two panels a row at the page's width (the image and its truth, or two images): labels stay readable
    per_row = 1 if with_truth else 2
    rows = -(-len(chosen) // per_row)
    fig, axes = plt.subplots(rows, 2, figsize=(DOUBT_FIGURE_WIDTH_IN, DOUBT_PANEL_HEIGHT_IN * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, row in enumerate(chosen):
        ax = axes[i // per_row, i % per_row]  # with the truth: column 0, the truth in column 1
        try:
            img = read_image(resolve_image_path(image_root, names[row])).permute(1, 2, 0).numpy()
        except UserError:
            continue
        ax.imshow(img)
        mine = np.flatnonzero(obj["image"] == row)
        below = mine[~obj["kept"][mine]]
        shown = np.concatenate([mine[obj["kept"][mine]], below[np.argsort(-doubt[below], kind="stable")[:below_count]]])
        draw_candidates(ax, {k: v[shown] for k, v in obj.items() if k not in ("id", "image", "closeness")},
                        class_names=class_names, num_views=num_views)  # fmt: skip
        ax.set_title(f"{names[row]}: doubt {image_doubt[row]:.2f}", fontsize=TITLE_PT, parse_math=False)
        if with_truth and names[row] in by_name:
            lab = truth.labels[by_name[names[row]]]  # type: ignore[union-attr]
            axes[i, 1].imshow(img)
            for box, c in zip(lab.boxes, lab.labels, strict=True):
                _box(axes[i, 1], box, "white", "-", class_names[int(c)])
            axes[i, 1].set_title("held-back truth", fontsize=TITLE_PT)
    fig.tight_layout()
    right = "Right: the held-back true labels of the image." if with_truth else ""
    return DOUBT_NOTE.format(n=len(chosen), below=below_count, v=num_views, right=right) + _png(fig)


def _box(ax: Any, box: np.ndarray, colour: Any, style: str, text: str) -> None:
    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(_plt().Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colour, lw=1.2, ls=style))
    top, bottom = sorted(ax.get_ylim())  # on an image's axes the top row has the smaller y
    inside = y1 - top < 0.05 * (bottom - top)  # a label above the image would cover the panel's title
    # parse_math=False: class and file names are text, never TeX ("ring $x^$" is drawn as written)
    ax.text(x1, y1, text, va="top" if inside else "bottom", color="black", fontsize=LABEL_PT,
            bbox={"color": colour, "pad": 0.5, "alpha": 0.8}, parse_math=False)  # fmt: skip


def draw_candidates(ax: Any, obj: dict[str, np.ndarray], *, class_names: tuple[str, ...], num_views: int) -> None:
    """Draw candidates (``obj``: ``boxes`` ``[N, 4]``, ``labels``, ``scores``, ``agreement``, ``kept``,
    ``score_spread``, ``box_spread`` ``[N]``): each box coloured by ``agreement / num_views`` (red to green),
    solid when kept, dashed otherwise, with a band of +- ``box_spread`` times its width and height."""
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MplPath

    cmap = _plt().get_cmap("RdYlGn")
    for j in range(len(obj["scores"])):
        colour = cmap(float(obj["agreement"][j]) / max(num_views, 1))
        x1, y1, x2, y2 = (float(v) for v in obj["boxes"][j])
        bs = float(obj["box_spread"][j])
        if np.isfinite(bs) and bs > 0:
            dx, dy = bs * (x2 - x1), bs * (y2 - y1)
            outer = [(x1 - dx, y1 - dy), (x2 + dx, y1 - dy), (x2 + dx, y2 + dy), (x1 - dx, y2 + dy), (0, 0)]
            inner = [(x1 + dx, y1 + dy), (x1 + dx, y2 - dy), (x2 - dx, y2 - dy), (x2 - dx, y1 + dy), (0, 0)]
            codes = [MplPath.MOVETO, MplPath.LINETO, MplPath.LINETO, MplPath.LINETO, MplPath.CLOSEPOLY] * 2
            ax.add_patch(PathPatch(MplPath(outer + inner, codes), color=colour, alpha=0.35, lw=0))
        text = f"{class_names[int(obj['labels'][j])]} {obj['scores'][j]:.2f} {int(obj['agreement'][j])}/{num_views}"
        ss = float(obj["score_spread"][j])
        text += f" ±{ss:.2f}" if np.isfinite(ss) else ""
        _box(ax, obj["boxes"][j], colour, "-" if obj["kept"][j] else "--", text)


def _unlabeled_root(layout: RunLayout, r: int) -> Path | str | None:
    """The image root of round ``r``'s labeling folder; None without a (readable) one."""
    try:
        root = open_label_folder(layout.label(r), complete=False).image_root
    except UserError:
        return None
    return as_image_root(root) if root else None
