"""How far the pseudo keypoints of an accuracy benchmark lie from U's held-back labels, in heatmap bins.

    python bench/keypoint_label_errors.py accuracy_keypoints_work [--bins 28]

For every ``select-*`` folder of the work folder that ``bench/accuracy.py --task keypoints`` wrote: the
pseudo objects' precision and recall (box IoU 0.5), then, over the keypoints labeled in both a matched pseudo
object and its true object, the error in bins of the student's heatmap over the true box (``small_keypointrcnn``
has 28 a side): the share within 1, 2 and 4 bins and beyond 8 (the largest of |dx| and |dy|), the median,
and the mean and RMS of the signed errors within 4 bins (a mean near 0 is noise that a student trained on
many labels averages away; what lies beyond is a wrong limb or side).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from datadistill.data.coco import load_coco
from datadistill.stages.quality import keypoint_errors, match_pseudo_labels


def summarize(errors: np.ndarray) -> dict[str, float]:
    """Shares and statistics of ``[M, 2]`` signed errors in bins (NaN where there are none)."""
    names = ("within_1", "within_2", "within_4", "beyond_8", "median", "mean_dx", "mean_dy", "rms")
    if not len(errors):
        return {"keypoints": 0.0, **dict.fromkeys(names, float("nan"))}
    dist = np.abs(errors).max(axis=1)
    near = errors[dist < 4]
    nan = float("nan")
    return {
        "keypoints": float(len(errors)),
        "within_1": float((dist < 1).mean()),
        "within_2": float((dist < 2).mean()),
        "within_4": float((dist < 4).mean()),
        "beyond_8": float((dist >= 8).mean()),
        "median": float(np.median(dist)),
        "mean_dx": float(near[:, 0].mean()) if len(near) else nan,
        "mean_dy": float(near[:, 1].mean()) if len(near) else nan,
        "rms": float(np.sqrt((near**2).sum(axis=1).mean())) if len(near) else nan,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", help="the --work folder of bench/accuracy.py --task keypoints")
    p.add_argument("--bins", type=int, default=28, help="heatmap bins a side of the student (default 28)")
    args = p.parse_args(argv)
    work = Path(args.work)
    truth_path = work / "data" / "unlabeled_truth.json"
    if not truth_path.exists():
        print(f"{work}: no data/unlabeled_truth.json (not a bench/accuracy.py work folder)", file=sys.stderr)
        return 2
    truth = load_coco(truth_path)
    if not truth.num_keypoints:
        print(f"{truth_path}: no keypoints (a --task boxes folder?)", file=sys.stderr)
        return 2
    print(f"{'pseudo-labels':56}{'prec':>6}{'rec':>6}{'<1':>6}{'<2':>6}{'<4':>6}{'>=8':>6}"
          f"{'median':>7}{'mean dx,dy':>13}{'rms':>6}")  # fmt: skip
    for folder in sorted(work.glob("select-*")):
        pseudo = load_coco(folder / "pseudo.json")
        q = match_pseudo_labels(pseudo, truth).at(0.0)
        s = summarize(keypoint_errors(pseudo, truth, bins=args.bins))
        print(f"{folder.name[7:62]:56}{100 * q['precision']:6.1f}{100 * q['recall']:6.1f}"
              f"{100 * s['within_1']:6.1f}{100 * s['within_2']:6.1f}{100 * s['within_4']:6.1f}"
              f"{100 * s['beyond_8']:6.1f}"
              f"{s['median']:7.2f}{s['mean_dx']:7.2f},{s['mean_dy']:5.2f}{s['rms']:6.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
