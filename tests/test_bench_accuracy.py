"""bench/accuracy.py: the arms get the same number of iterations, and the summary computes the targets."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from datadistill.core.views import parse_views


@pytest.mark.parametrize(
    ("ratio", "epochs"),
    [(0.0, 64), (0.2, 48), (0.4, 40), (0.6, 24)],  # 200 real images, batch 8: 8, 6, 5, 3 real per batch
)
def test_every_arm_trains_the_same_number_of_iterations(
    ratio: float, epochs: int, bench_script: Callable[[str], ModuleType]
) -> None:
    bench = bench_script("accuracy")
    assert bench._epochs(1600, 200, 8, ratio) == epochs
    pseudo = {0.0: 0, 0.2: 2, 0.4: 3, 0.6: 5}[ratio]
    iterations = epochs * (200 // (8 - pseudo))
    assert abs(iterations - 1600) <= 200 // (8 - pseudo) / 2 + 1


def _result(ap: float) -> dict:
    return {"metrics": {"bbox": {"AP": ap}}}


def test_summary_gap_closed_and_targets(bench_script: Callable[[str], ModuleType]) -> None:
    bench = bench_script("accuracy")
    results = {"supervised": _result(0.40), "single_transform": _result(0.43), "distilled": _result(0.47),
               "oracle": _result(0.55)}  # fmt: skip
    s = bench.summarize(results, "bbox")
    assert s["gap_closed"] == pytest.approx(7 / 15)
    assert s["distilled_minus_single_transform"] == pytest.approx(4.0)
    assert s["targets_met"] == {"closes_40pct_of_gap": True, "beats_single_transform_by_1ap": True}
    results["distilled"] = _result(0.435)
    s = bench.summarize(results, "bbox")
    assert s["targets_met"] == {"closes_40pct_of_gap": False, "beats_single_transform_by_1ap": False}
    results["oracle"] = _result(0.39)  # no gap to close
    assert bench.summarize(results, "bbox")["gap_closed"] is None


def test_arms_differ_in_one_setting_each(bench_script: Callable[[str], ModuleType]) -> None:
    bench = bench_script("accuracy")
    default = bench.DEFAULT
    assert bench.MAIN["distilled"] == default
    for name, arm in bench.ABLATIONS.items():
        changed = [k for k in default.__dataclass_fields__ if getattr(arm, k) != getattr(default, k)]
        assert len(changed) == 1, name
    assert len({a.selection_key() for a in bench.ABLATIONS.values() if not a.init_teacher and a.ratio == 0.4}) == 6


def test_scheduling_trains_the_oracle_beside_the_teacher_and_labels_each_setting_once(
    bench_script: Callable[[str], ModuleType],
) -> None:
    bench = bench_script("accuracy")
    arms = dict(bench.MAIN, **bench.ABLATIONS)
    assert [n for n, a in arms.items() if not a.needs_teacher] == ["oracle"]
    groups = bench.labeling_groups(arms)
    views = ",".join(v.name for v in parse_views("default"))
    digest = hashlib.sha1(views.encode()).hexdigest()[:8]  # an older `default` labeling is not reused
    assert sorted(groups) == [f"default-{fuse}-{digest}" for fuse in ("nms", "vote", "wbf")] + ["identity-nms"]
    # the default labeling serves 8 arms (4 selections), each arm once
    key = f"default-nms-{digest}"
    assert len(groups[key]) == len({a for a in arms.values() if a.labeling_key() == key}) == 8
    assert sum(len(g) for g in groups.values()) == len(set(arms.values()) - {bench.MAIN["oracle"]})


def test_a_student_starts_as_soon_as_its_labeling_is_done(
    monkeypatch: pytest.MonkeyPatch, bench_script: Callable[[str], ModuleType]
) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    bench = bench_script("accuracy")
    events: list[str] = []
    lock = threading.Lock()
    single_view_student = threading.Event()

    def stage(bench_args: dict, kind: str, name: str, arms: tuple) -> tuple[object, dict]:
        with lock:
            events.append(f"start {kind} {name}")
        if (kind, name) == ("student", "single_transform"):
            single_view_student.set()
        if name.startswith("default-"):  # the multi-view labeling is the slow one: it ends once that student runs
            single_view_student.wait(timeout=30)
        with lock:
            events.append(f"end {kind} {name}")
        return {"stage": name}, {f"{kind} {name}": 0.0}

    def pool(jobs: int, **_: object) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(jobs)

    monkeypatch.setattr(bench, "_stage", stage)
    monkeypatch.setattr(bench, "ProcessPoolExecutor", pool)
    results, _ = bench.run_arms({}, dict(bench.MAIN), jobs=2, threads=1)
    assert set(results) == {"supervised", "single_transform", "distilled", "oracle"}
    multi_view = "end label " + bench.DEFAULT.labeling_key()
    assert events.index("start student single_transform") < events.index(multi_view)
    assert events.index("start student distilled") > events.index(multi_view)
    assert events.index("start label identity-nms") > events.index("end teacher supervised")


def test_a_failed_stage_cancels_the_queued_ones(
    monkeypatch: pytest.MonkeyPatch, bench_script: Callable[[str], ModuleType]
) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    bench = bench_script("accuracy")
    started: list[str] = []
    student_queued, stopped = threading.Event(), threading.Event()

    class Pool(ThreadPoolExecutor):
        """One worker, and events for what the bench does with it."""

        def submit(self, fn, /, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if args[1:3] == ("student", "single_transform"):  # (bench_args, kind, name, arms)
                student_queued.set()
            return super().submit(fn, *args, **kwargs)

        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
            stopped.set()
            super().shutdown(wait, cancel_futures=cancel_futures)

    def stage(bench_args: dict, kind: str, name: str, arms: tuple) -> tuple[object, dict]:
        started.append(f"{kind} {name}")
        if kind == "label" and name.startswith("default-"):
            # The first multi-view labeling fails once the single-view labeling's student is queued; the
            # labelings queued behind it fail once the bench has stopped the pool (the worker has taken
            # one of them before the stop: the students are queued after every labeling).
            (stopped if any(s.startswith("label default-") for s in started[:-1]) else student_queued).wait(30)
            raise RuntimeError(f"labeling {name} failed")
        return {}, {}

    monkeypatch.setattr(bench, "_stage", stage)
    monkeypatch.setattr(bench, "ProcessPoolExecutor", lambda jobs, **_: Pool(1))
    with pytest.raises(RuntimeError, match="labeling .* failed"):
        bench.run_arms({}, dict(bench.MAIN, **bench.ABLATIONS), jobs=1, threads=1)
    assert student_queued.is_set() and "label identity-nms" in started  # its students queued behind the failures
    assert not [s for s in started if s.startswith("student") and s != "student oracle"]


def test_true_keypoints_replace_the_keypoints_of_matched_pseudo_objects_only(
    tmp_path: Path, bench_script: Callable[[str], ModuleType]
) -> None:
    import json

    from datadistill.data.coco import load_coco

    bench = bench_script("accuracy")
    cats = [{"id": 1, "name": "fig", "keypoints": ["a", "b"]}]
    images = [{"id": 1, "file_name": "u.png", "width": 100, "height": 100}]
    truth = {
        "images": images,
        "categories": cats,
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "keypoints": [12, 13, 1, 50, 50, 0]}
        ],
    }
    pseudo = {"images": images, "categories": cats, "annotations": [
        {"id": 7, "image_id": 1, "category_id": 1, "bbox": [11, 10, 20, 20], "score": 0.9,
         "keypoints": [15, 15, 2, 20, 20, 2], "num_keypoints": 2},
        {"id": 8, "image_id": 1, "category_id": 1, "bbox": [60, 60, 20, 20], "score": 0.8,
         "keypoints": [65, 65, 2, 70, 70, 0], "num_keypoints": 1}]}  # fmt: skip
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    (tmp_path / "pseudo.json").write_text(json.dumps(pseudo))
    out = bench.with_true_keypoints(tmp_path / "pseudo.json", load_coco(tmp_path / "truth.json"), tmp_path / "t.json")
    anns = json.loads(out.read_text())["annotations"]
    assert [a["keypoints"] for a in anns] == [[12, 13, 2, 0, 0, 0], [65, 65, 2, 70, 70, 0]]
    assert [a["num_keypoints"] for a in anns] == [1, 1] and [a["bbox"] for a in anns] == [
        p["bbox"] for p in pseudo["annotations"]]  # fmt: skip


def test_stopping_the_bench_terminates_the_running_stages(bench_script: Callable[[str], ModuleType]) -> None:
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor

    bench = bench_script("accuracy")
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
    running = pool.submit(time.sleep, 60)
    queued = pool.submit(time.sleep, 60)
    deadline = time.time() + 10
    while not running.running() and time.time() < deadline:
        time.sleep(0.05)
    processes = list(pool._processes.values())
    assert processes and all(p.is_alive() for p in processes)
    bench.stop(pool)
    for p in processes:
        p.join(5)
    assert not any(_running(p.pid) for p in processes)
    assert queued.cancelled() or queued.exception(timeout=10) is not None  # never runs


def _running(pid: int | None) -> bool:
    """Whether process ``pid`` still runs: neither gone nor a zombie (read from /proc: ``is_alive`` says True
    for a child that another thread of this process has already reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _deaf_to_sigterm(ready: str) -> None:
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(ready).touch()
    time.sleep(60)


def test_stopping_the_bench_kills_a_worker_that_ignores_sigterm(
    tmp_path: Path, bench_script: Callable[[str], ModuleType]
) -> None:
    import multiprocessing
    import signal
    import time
    from concurrent.futures import ProcessPoolExecutor

    bench = bench_script("accuracy")
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
    ready = tmp_path / "ready"
    pool.submit(_deaf_to_sigterm, str(ready))
    deadline = time.time() + 20
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    processes = list(pool._processes.values())
    assert ready.exists() and processes
    bench.stop(pool, grace_s=0.5)
    assert not any(_running(p.pid) for p in processes)
    assert [p.exitcode for p in processes] in ([-signal.SIGKILL], [None])  # None: reaped by the pool's own thread
