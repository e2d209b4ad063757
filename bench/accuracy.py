"""Does data distillation work? Supervised vs single-transform vs distilled vs oracle, on synthetic data.

    python bench/accuracy.py --task boxes --out accuracy_boxes.json
    python bench/accuracy.py --task keypoints --out accuracy_keypoints.json --ablations

The synthetic data set (``synth shapes`` for boxes, ``synth figures`` for keypoints, made from ``--seed``)
is split into a validation set V, a labeled set L (10% of the rest) and an unlabeled set U (90%, labels held
back): boxes 200 + 1,800 images and 2,800 iterations, keypoints 100 + 900 and 1,600 (with 200 labeled figures
the keypoint teacher was too close to its oracle to rank anything). Every arm trains the same architecture
with the same number of iterations and the same seed:

- ``supervised``: L only (this is also the teacher that labels U);
- ``single_transform``: L + pseudo-labels of U from the identity view only;
- ``distilled``: L + pseudo-labels of U from the default views (4 scales x flip) and fusion;
- ``oracle``: L + U with its true labels, mixed into the minibatches exactly as the pseudo-labels are.

``--ablations`` adds: the student fine-tuned from the teacher instead of trained from the initial weights;
box fusion nms / wbf / vote; threshold policy count / count-per-class / fixed; pseudo ratio 0.2 / 0.4 / 0.6;
without the cross-class step (boxes only); ``true_keypoints`` (keypoints only, a diagnosis): the default
pseudo objects, each that matches a true object with that object's keypoints.

Every stage writes into ``--work`` (default: next to ``--out``) and is skipped when done, so a killed
benchmark resumes. Pick defaults with a tuning seed (``--seed 1``), report on the evaluation seed (0).

``--jobs`` stages run at once, each in its own process with ``--threads`` torch threads (default 2 x 1 on a
2-core machine): the teacher beside the oracle (which needs no teacher), then the labelings, each student
as soon as its labeling is done. ``--student-seed`` retrains the students with another seed. The stages and
their results do not depend on ``--jobs``.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from common import Stages, cached_metrics, init_worker, label_complete, parser, work_folder

from datadistill.core.views import parse_views
from datadistill.data.coco import CocoDataset, load_coco, read_json
from datadistill.demo import DemoPlan, make_demo_data
from datadistill.runtime.io import provenance, write_json_atomic
from datadistill.stages.label import LabelConfig
from datadistill.stages.quality import match_objects, match_pseudo_labels
from datadistill.stages.select import SelectConfig, select_pseudo_labels
from datadistill.stages.train import TrainConfig, train


@dataclass(frozen=True)
class Plan:
    data: DemoPlan  # sizes of V, L, U and the image size
    iterations: int  # training iterations of every arm
    batch_size: int = 8


PLANS = {
    "boxes": Plan(DemoPlan(labeled=200, unlabeled=1800, val=300, size_px=128, teacher_epochs=0, student_epochs=0,
                           batch_size=8, views="default"), iterations=2800),
    "keypoints": Plan(DemoPlan(labeled=100, unlabeled=900, val=300, size_px=128, teacher_epochs=0,
                               student_epochs=0, batch_size=8, views="default"), iterations=1600),
}  # fmt: skip


@dataclass(frozen=True)
class Arm:
    """One student: where its pseudo-labels come from and how it is trained."""

    views: str | None = "default"  # None: the oracle (U's true labels)
    fuse: str = "nms"
    policy: str = "count"
    ratio: float = 0.4
    init_teacher: bool = False
    ignore_band: float = 0.0  # select --ignore-band
    cross_class_iou: float = 0.5  # select --cross-class-iou (0: off, the paper's)
    keypoint_policy: str = "count"  # select --keypoint-policy
    true_keypoints: bool = False  # a diagnosis: the pseudo objects that match a true one carry its keypoints

    @property
    def needs_teacher(self) -> bool:
        return self.views is not None or self.init_teacher

    def labeling_key(self) -> str:
        """The labeling folder's name; a named view set carries a digest of its views (the cache of an older
        ``default`` is not reused)."""
        key = f"{self.views}-{self.fuse}".replace(",", "+").replace(":", "")
        if self.views in ("default", "paper"):
            names = ",".join(v.name for v in parse_views(self.views))
            key += "-" + hashlib.sha1(names.encode()).hexdigest()[:8]
        return key

    def selection_key(self) -> str:
        band = f"-ignore{self.ignore_band:g}" if self.ignore_band else ""
        xc = f"-xclass{self.cross_class_iou:g}" if self.cross_class_iou else ""
        kp = "" if self.keypoint_policy == "count" else f"-kp{self.keypoint_policy}"
        return f"{self.labeling_key()}-{self.policy}{band}{xc}{kp}".replace(":", "")


DEFAULT = Arm()
MAIN = {"single_transform": Arm(views="identity"), "distilled": DEFAULT, "oracle": Arm(views=None)}
ABLATIONS = {
    "init_from_teacher": replace(DEFAULT, init_teacher=True),
    "fuse_wbf": replace(DEFAULT, fuse="wbf"),
    "fuse_vote": replace(DEFAULT, fuse="vote"),
    "policy_count_per_class": replace(DEFAULT, policy="count-per-class"),
    "policy_fixed_0.5": replace(DEFAULT, policy="fixed:0.5"),
    "ratio_0.2": replace(DEFAULT, ratio=0.2),
    "ratio_0.6": replace(DEFAULT, ratio=0.6),
    "cross_class_off": replace(DEFAULT, cross_class_iou=0.0),
    "true_keypoints": replace(DEFAULT, true_keypoints=True),
}


def _epochs(iterations: int, num_real: int, batch_size: int, ratio: float) -> int:
    """Epochs (passes over the real images) that give ``iterations`` steps at this real:pseudo mix."""
    pseudo = math.floor(batch_size * ratio + 0.5) if ratio > 0 else 0
    per_epoch = num_real // (batch_size - pseudo)
    return max(1, round(iterations / per_epoch))


class Bench:
    def __init__(
        self, task: str, work: Path, *, plan: Plan, seed: int, threads: int, student_seed: int | None = None
    ) -> None:
        self.task, self.work, self.seed, self.threads, self.plan = task, work, seed, threads, plan
        self.student_seed = seed if student_seed is None else student_seed
        self.seconds: dict[str, float] = {}
        self.stages = Stages(self.seconds)
        t0 = time.time()
        self.data = make_demo_data(work / "data", task=task, plan=self.plan.data, seed=seed)
        self.seconds["data"] = round(time.time() - t0, 1)
        self.val = load_coco(self.data.val, image_root=self.data.val_images)
        self.truth = load_coco(self.data.unlabeled_truth)
        self.num_real = len(load_coco(self.data.train).images)

    def _train(
        self, out: Path, *, ratio: float = 0.0, pseudo: str | None = None, init: str | None = None, seed: int
    ) -> Path:
        epochs = _epochs(self.plan.iterations, self.num_real, self.plan.batch_size, ratio if pseudo else 0.0)
        cfg = TrainConfig(
            data=self.data.train, images=self.data.train_images, out=str(out), epochs=epochs,
            batch_size=self.plan.batch_size, pseudo=pseudo,
            pseudo_images=self.data.unlabeled_images if pseudo else None,
            pseudo_ratio=ratio if pseudo else 0.4, init=init, seed=seed, threads=self.threads, workers=0,
            device="cpu", resume=(out / "last.pt").exists(),
        )  # fmt: skip
        self.stages.run(f"train {out.name}", out / "checkpoint.pt", lambda: train(cfg))
        return out / "checkpoint.pt"

    def _metrics(self, checkpoint: Path) -> dict[str, Any]:
        return cached_metrics(checkpoint.parent / "val_metrics.json", checkpoint, self.val, self.data.val_images)

    def teacher(self) -> Path:
        return self._train(self.work / "supervised", seed=self.seed)

    def pseudo_labels(self, arm: Arm) -> tuple[str, dict[str, Any] | None]:
        """The pseudo-label file of an arm (labeling and selection cached by their settings)."""
        if arm.views is None:
            return self.data.unlabeled_truth, None
        folder = self.work / f"label-{arm.labeling_key()}"
        cfg = LabelConfig(
            checkpoint=str(self.teacher()), images=self.data.unlabeled, image_root=self.data.unlabeled_images,
            out=str(folder), views=arm.views, fuse=arm.fuse, workers=0, threads=self.threads, device="cpu",
        )  # fmt: skip
        self.stages.run(f"label {folder.name}", folder / "manifest.complete", lambda: label_complete(cfg, folder))
        out = self.work / f"select-{arm.selection_key()}" / "pseudo.json"
        sel = SelectConfig(labels=str(folder), reference=self.data.train, out=str(out), policy=arm.policy,
                           ignore_band=arm.ignore_band, cross_class_iou=arm.cross_class_iou,
                           keypoint_policy=arm.keypoint_policy)  # fmt: skip
        self.stages.run(f"select {out.parent.name}", out, lambda: select_pseudo_labels(sel))
        if arm.true_keypoints:
            out = with_true_keypoints(out, self.truth, out.with_name("pseudo_true_keypoints.json"))
        matched = match_pseudo_labels(load_coco(out), self.truth).at(0.0)
        quality = {k: matched[k] for k in ("precision", "recall", "kept")}
        quality["per_image"] = read_json(out.parent / "selection.json")["achieved_per_image"]
        return str(out), quality

    def arm(self, name: str, arm: Arm) -> dict[str, Any]:
        pseudo, quality = self.pseudo_labels(arm)
        init = str(self.teacher()) if arm.init_teacher else None
        folder = name if self.student_seed == self.seed else f"{name}-seed{self.student_seed}"
        checkpoint = self._train(self.work / folder, ratio=arm.ratio, pseudo=pseudo, init=init, seed=self.student_seed)
        result = {"metrics": self._metrics(checkpoint), "pseudo_labels": quality, "arm": arm.__dict__}
        result["train_seconds"] = read_json(checkpoint.parent / "timings.json").get("train_s")
        return result


def with_true_keypoints(pseudo_path: Path, truth: CocoDataset, out: Path) -> Path:
    """A copy of a pseudo-label file in which every object that matches a true object (box IoU 0.5, as
    precision is counted) carries the true object's keypoints (labeled ones visible); the others keep
    theirs. What the student would learn if the keypoints were perfect and the detections were the teacher's."""
    if out.exists():
        return out
    raw = read_json(pseudo_path)
    by_id = {a["id"]: a for a in raw["annotations"]}
    for _, p, t, _, match in match_objects(load_coco(pseudo_path), truth, 0.5):
        for j in np.flatnonzero(match >= 0):
            kt = np.array(t.keypoints[match[j]], np.float64)  # type: ignore[index]
            labeled = kt[:, 2] > 0
            kt[:, 2] = np.where(labeled, 2.0, 0.0)
            kt[~labeled, :2] = 0.0
            ann = by_id[int(p.ids[j])]
            ann["keypoints"], ann["num_keypoints"] = kt.reshape(-1).tolist(), int(labeled.sum())
    write_json_atomic(out, raw)
    return out


def _stage(bench_args: dict[str, Any], kind: str, name: str, arms: tuple[Arm, ...]) -> tuple[Any, dict[str, float]]:
    """One stage in a worker process: ``teacher``, ``label`` (the labeling and selections shared by
    ``arms``) or ``student`` (``name`` trained as ``arms[0]``). Returns its result and its seconds."""
    bench = Bench(**bench_args)
    if kind == "teacher":
        result: Any = bench._metrics(bench.teacher())
    elif kind == "label":
        result = [bench.pseudo_labels(arm)[1] for arm in arms]
    else:
        result = bench.arm(name, arms[0])
    return result, bench.seconds


def labeling_groups(arms: dict[str, Arm]) -> dict[str, tuple[Arm, ...]]:
    """The arms with pseudo-labels, grouped by labeling (one labeling serves every arm of its group, so two
    processes never write one labeling folder); each arm once."""
    groups: dict[str, list[Arm]] = {}
    for a in arms.values():
        if a.views is not None and a not in groups.setdefault(a.labeling_key(), []):
            groups[a.labeling_key()].append(a)
    return {k: tuple(g) for k, g in groups.items()}


def _schedule(pool: ProcessPoolExecutor, bench_args: dict[str, Any], arms: dict[str, Arm], results: dict,
              take: Callable[[Future], Any]) -> None:  # fmt: skip
    """Submit the stages in dependency order and collect the arms' results into ``results``."""
    teacher = pool.submit(_stage, bench_args, "teacher", "supervised", ())
    students = {n: pool.submit(_stage, bench_args, "student", n, (a,)) for n, a in arms.items() if not a.needs_teacher}
    results["supervised"] = {"metrics": take(teacher), "pseudo_labels": None}
    labelings = {pool.submit(_stage, bench_args, "label", k, g): k for k, g in labeling_groups(arms).items()}
    waiting = {n: a for n, a in arms.items() if a.needs_teacher}
    labeled: set[str | None] = {None}  # an arm without pseudo-labels (fine-tuned oracle) waits for nothing

    def start_ready() -> None:
        for n, a in list(waiting.items()):
            if (a.labeling_key() if a.views is not None else None) in labeled:
                students[n] = pool.submit(_stage, bench_args, "student", n, (waiting.pop(n),))

    start_ready()
    for f in as_completed(labelings):
        take(f)
        labeled.add(labelings[f])
        start_ready()
    for n in arms:
        results[n] = take(students[n])


def run_arms(bench_args: dict[str, Any], arms: dict[str, Arm], *, jobs: int, threads: int) -> tuple[dict, dict]:
    """The teacher and every arm, ``jobs`` stages at once: the teacher and the arms that need no teacher
    first, then one labeling per labeling key (with its selections); each student starts as soon as its
    labeling is done. Returns ``(results by name, seconds by stage)``."""
    seconds: dict[str, float] = {}
    results: dict[str, Any] = {}

    def take(future: Future) -> Any:
        result, secs = future.result()
        seconds.update(secs)
        return result

    ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=init_worker, initargs=(threads,)) as pool:
        try:
            _schedule(pool, bench_args, arms, results, take)
        except BaseException:
            stop(pool)  # a failed stage or a kill stops the bench now, not after the running and queued ones
            raise
    return results, seconds


def stop(pool: ProcessPoolExecutor, *, grace_s: float = 5.0) -> None:
    """Cancel the queued stages and terminate the running ones (each resumes from its last epoch or shard
    when the bench is run again): a killed bench leaves no worker training on."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    # A worker that inherited a SIGTERM handler (this bench's own, under fork) turns the signal into an
    # exception of its current stage and lives on: it gets SIGKILL after a grace period.
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(5)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_arms, which stops the workers


def _ap(result: dict[str, Any], metric: str) -> float:
    return 100 * result["metrics"][metric]["AP"]


def summarize(results: dict[str, Any], metric: str) -> dict[str, Any]:
    sup, dist = _ap(results["supervised"], metric), _ap(results["distilled"], metric)
    oracle, single = _ap(results["oracle"], metric), _ap(results["single_transform"], metric)
    gap = oracle - sup
    return {
        "metric": metric,
        "gap_closed": (dist - sup) / gap if gap > 0 else None,
        "distilled_minus_single_transform": dist - single,
        "targets_met": {
            "closes_40pct_of_gap": gap > 0 and (dist - sup) / gap >= 0.4,
            "beats_single_transform_by_1ap": dist - single >= 1.0,
        },
    }


def format_table(results: dict[str, Any], metric: str) -> str:
    lines = [f"{'arm':26}{'AP':>7}{'AP50':>7}{'AP75':>7}{'prec':>7}{'recall':>7}{'/img':>6}{'train s':>9}"]
    for name, r in results.items():
        if not isinstance(r, dict) or "metrics" not in r:
            continue
        m = r["metrics"][metric]
        q = r.get("pseudo_labels") or {}
        pq = (
            f"{100 * q['precision']:7.1f}{100 * q['recall']:7.1f}{q['per_image']:6.2f}"
            if q
            else f"{'-':>7}{'-':>7}{'-':>6}"
        )
        lines.append(f"{name:26}{100 * m['AP']:7.1f}{100 * m['AP50']:7.1f}{100 * m['AP75']:7.1f}{pq}"
                     f"{r.get('train_seconds') or 0:9.0f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--task", choices=sorted(PLANS), required=True)
    p.add_argument("--seed", type=int, default=0, help="data and training seed (0: evaluation, 1: tuning)")
    p.add_argument(
        "--student-seed", type=int, default=None,
        help="training seed of the students and the oracle (default: --seed); the teacher and data keep --seed",
    )  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, help="stages (trainings, labelings) run at once")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of each stage")
    p.add_argument("--ablations", action="store_true", help="also run the ablations (about 7 more students)")
    p.add_argument(
        "--iterations", type=int, default=None, help="training iterations of every arm (default: the plan's)"
    )
    p.add_argument(
        "--images", type=int, default=None, help="labeled + unlabeled images (default: the plan's; 10%% labeled)"
    )
    p.add_argument("--only", default=None, help="comma-separated arms to run (default: all)")
    args = p.parse_args(argv)

    out = Path(args.out)
    work = work_folder(args)
    started = time.time()
    plan = PLANS[args.task]
    if args.iterations:
        plan = replace(plan, iterations=args.iterations)
    if args.images:
        labeled = max(8, args.images // 10)
        plan = replace(
            plan,
            data=replace(
                plan.data, labeled=labeled, unlabeled=args.images - labeled, val=min(plan.data.val, args.images)
            ),
        )
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be at least 1")
    init_worker(args.threads)
    bench_args = {"task": args.task, "work": work, "plan": plan, "seed": args.seed, "threads": args.threads,
                  "student_seed": args.student_seed}  # fmt: skip
    bench = Bench(**bench_args)  # makes the data once, before any worker starts
    metric = "keypoints" if args.task == "keypoints" else "bbox"
    arms = dict(MAIN, **(ABLATIONS if args.ablations else {}))
    if args.task == "keypoints":
        arms.pop("cross_class_off", None)  # one class: its pseudo-labels are the default's
    else:
        arms.pop("true_keypoints", None)
    if args.only:
        wanted = set(args.only.split(","))
        arms = {k: v for k, v in arms.items() if k in wanted}
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    results, seconds = run_arms(bench_args, arms, jobs=args.jobs, threads=args.threads)
    results["supervised"]["train_seconds"] = read_json(work / "supervised" / "timings.json").get("train_s")
    results = {"supervised": results.pop("supervised"), **results}
    if {"supervised", "single_transform", "distilled", "oracle"} <= set(results):
        results["summary"] = summarize(results, metric)
    results["task"] = args.task
    results["seed"] = args.seed
    results["student_seed"] = bench.student_seed
    results["plan"] = {
        "iterations": bench.plan.iterations,
        "batch_size": bench.plan.batch_size,
        **bench.plan.data.__dict__,
    }
    results["seconds"] = {**bench.seconds, **seconds}
    results["jobs"], results["threads"] = args.jobs, args.threads
    results["total_seconds"] = round(time.time() - started, 1)
    results["provenance"] = provenance()
    write_json_atomic(out, results, indent=2)
    print(format_table(results, metric))
    if "summary" in results:
        s = results["summary"]
        closed = "n/a" if s["gap_closed"] is None else f"{100 * s['gap_closed']:.0f}%"
        print(f"gap closed: {closed}; distilled - single_transform: {s['distilled_minus_single_transform']:+.1f} AP")
    print(f"total {results['total_seconds'] / 60:.1f} min (this run; stages done earlier are not counted)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
