"""`run`: strict configs, the whole loop on tiny data, resuming after a kill; `demo --quick`; the report."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from datadistill.cli import main
from datadistill.config import load_run_config
from datadistill.errors import UserError


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        pytest.param("teacher:\n  epoch: 3\n", [], "teacher.epoch: unknown setting", id="unknown-nested-key"),
        pytest.param("round: 2\n", [], "round: unknown setting", id="unknown-top-key"),
        pytest.param(
            "teacher:\n  epochs: ten\n", [], "teacher.epochs: expected an integer or null, got 'ten'", id="wrong-type"
        ),
        pytest.param(
            "teacher:\n  epochs: 2.5\n", [], "teacher.epochs: expected an integer or null, got 2.5", id="float-for-int"
        ),
        pytest.param(
            "select:\n  drop_empty: 1\n", [], "select.drop_empty: expected true or false, got 1", id="int-for-bool"
        ),
        pytest.param("teacher: 5\n", [], "teacher: expected a mapping", id="scalar-for-section"),
        pytest.param("teacher: [\n", [], "invalid YAML at line", id="bad-yaml"),
        pytest.param("- 1\n- 2\n", [], "the config must be a mapping", id="list-config"),
        pytest.param("a: !!python/object/apply:os.system ['echo hi']\n", [], "invalid YAML", id="python-tag-refused"),
        pytest.param(
            "", ["teacher.epochs=x"], "teacher.epochs: expected an integer or null, got 'x'", id="override-type"
        ),
        pytest.param("", ["nokey"], "expected key=value", id="override-syntax"),
        pytest.param("", ["teacher.lr.x=1"], "teacher.lr: expected a number or null", id="override-into-scalar"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("[", r"\[")) as info:
        load_run_config(path, overrides)
    assert "\n" not in str(info.value)


def test_config_values_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: a.json\nteacher:\n  epochs: 3\n  lr: 1\nlabel:\n  views: paper\n")
    cfg, base = load_run_config(path, ["student.pseudo_ratio=0.2", "rounds=2", "teacher.model=small_frcnn"])
    assert base == tmp_path and cfg.data.train == "a.json" and cfg.teacher.epochs == 3 and cfg.teacher.lr == 1.0
    assert cfg.student.pseudo_ratio == 0.2 and cfg.rounds == 2 and cfg.teacher.model == "small_frcnn"
    assert cfg.label.views == "paper" and cfg.student.epochs is None and cfg.student.iterations is None


def test_examples_are_valid_configs_that_leave_the_schedule_to_the_default() -> None:
    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
    assert len(examples) == 2
    for path in examples:
        cfg, _ = load_run_config(path)
        for section in (cfg.teacher, cfg.student):
            assert section.epochs is None and section.iterations is None, path
        assert cfg.label.views == "auto", path


TINY = """
data:
  train: data/labeled.json
  train_images: data/images
  unlabeled: data/unlabeled.json
  unlabeled_images: data/images
  val: data/val.json
  val_images: data/images
  unlabeled_truth: data/unlabeled_truth.json
teacher: {epochs: 2, batch_size: 4}
student: {epochs: 2, batch_size: 5}
label: {views: "identity,hflip", shard_size: 4, batch_size: 4}
device: cpu
threads: 1
workers: 0
teacher_check: false  # teachers of seconds are weak: these tests are about the pipeline
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datadistill.demo import DemoPlan, make_demo_data

    root = tmp_path_factory.mktemp("run")
    plan = DemoPlan(labeled=8, unlabeled=12, val=6, size_px=64, teacher_epochs=1, student_epochs=1, batch_size=4,
                    views="identity")  # fmt: skip
    make_demo_data(root / "data", task="boxes", plan=plan, seed=3)
    (root / "config.yaml").write_text(TINY)
    return root


def _run_cmd(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "datadistill", "run", str(config), "--out", str(out)]


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL semantics")
def test_run_resumes_after_kill_to_the_uninterrupted_result(tiny: Path) -> None:
    ref = tiny / "ref"
    subprocess.run(_run_cmd(tiny / "config.yaml", ref), check=True, capture_output=True)
    for name in ("teacher/checkpoint.pt", "round-1/label/manifest.json", "round-1/select/pseudo.json",
                 "round-1/student/checkpoint.pt", "round-1/student/eval/metrics.json", "report.html"):  # fmt: skip
        assert (ref / name).exists(), name
    killed = tiny / "killed"
    # kill during the teacher, then during labeling or the student
    for marker in ("teacher/metrics.jsonl", "round-1/select/pseudo.json"):
        proc = subprocess.Popen(_run_cmd(tiny / "config.yaml", killed), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 300
        while time.time() < deadline and not (killed / marker).exists() and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (killed / "round-1/student/checkpoint.pt").exists()
    result = subprocess.run(_run_cmd(tiny / "config.yaml", killed), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "student, round 1" in result.stdout
    sa = torch.load(ref / "round-1/student/checkpoint.pt", weights_only=True)["state_dict"]
    sb = torch.load(killed / "round-1/student/checkpoint.pt", weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    pa, pb = (json.loads((r / "round-1/select/pseudo.json").read_text()) for r in (ref, killed))
    assert pa["annotations"] == pb["annotations"] and pa["images"] == pb["images"]


def test_rerun_with_another_config_is_refused(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tiny / "other"
    out.mkdir()
    (out / "config.yaml").write_text("teacher: {epochs: 99}\n")
    assert main(["run", str(tiny / "config.yaml"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "was started with another 'data'" in err and err.count("\n") == 1


def test_demo_quick_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "supervised (teacher)" in out and "student (data distillation)" in out and "precision" in out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results) >= {"teacher", "student", "students", "gain", "pseudo_labels", "seconds", "provenance"}
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"):
        assert 0.0 <= (results["student"]["bbox"][key] or 0.0) <= 1.0
    p = results["pseudo_labels"]
    assert 0.0 <= p["precision"] <= 1.0 and 0.0 <= p["recall"] <= 1.0
    page = (tmp_path / "demo" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "<table>" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_two_rounds_label_with_the_last_student(tiny: Path) -> None:
    out = tiny / "rounds"
    assert main(["run", str(tiny / "config.yaml"), "--out", str(out), "--set", "rounds=2",
                 "--set", "teacher.epochs=1", "--set", "student.epochs=1"]) == 0  # fmt: skip
    manifest = json.loads((out / "round-2" / "label" / "manifest.json").read_text())
    assert manifest["config"]["checkpoint"] == str(out / "round-1" / "student" / "checkpoint.pt")
    assert (out / "round-2" / "student" / "checkpoint.pt").exists()
    assert "student, round 2" in (out / "report.html").read_text()


def test_the_student_reads_the_label_table_where_select_wrote_one(tiny: Path) -> None:
    from datadistill.data.coco import load_coco
    from datadistill.data.label_table import save_label_table

    out = tiny / "table"
    run = [
        "run",
        str(tiny / "config.yaml"),
        "--out",
        str(out),
        "--set",
        "teacher.epochs=1",
        "--set",
        "student.epochs=1",
    ]
    assert main(run) == 0
    select, student = out / "round-1" / "select", out / "round-1" / "student"
    before = torch.load(student / "checkpoint.pt", weights_only=True)["state_dict"]
    table = save_label_table(load_coco(select / "pseudo.json"), select / "pseudo.parquet")  # as select will write it
    shutil.rmtree(student)
    assert main(run) == 0
    assert yaml.safe_load((student / "config.yaml").read_text())["pseudo"] == str(table)
    after = torch.load(student / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the same labels: the same student


def test_a_weak_teacher_stops_the_run_before_labeling_in_one_line(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tiny / "weak"
    argv = ["run", str(tiny / "config.yaml"), "--out", str(out), "--set", "teacher.epochs=1"]
    assert main([*argv, "--set", "teacher_check=true"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the teacher is too weak to teach: its validation box AP50 is ")
    assert "set teacher_check: false to go on" in err and err.count("\n") == 1
    assert (out / "teacher" / "checkpoint.pt").exists() and not (out / "round-1").exists()
    # told to go on, the same folder resumes after the teacher
    assert main([*argv, "--set", "teacher_check=false"]) == 0
    assert (out / "round-1" / "student" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    ("metrics", "stops"),
    [
        pytest.param(None, False, id="no-validation-set"),
        pytest.param({"bbox": {"AP": 0.02, "AP50": 0.099}}, True, id="box-ap50-below-10"),
        pytest.param({"bbox": {"AP": 0.05, "AP50": 0.10}}, False, id="box-ap50-at-10"),
        pytest.param({"bbox": {"AP50": 0.5}, "keypoints": {"AP50": 0.05}}, True, id="keypoint-ap50-decides"),
    ],
)
def test_check_teacher_reads_the_task_ap50(metrics: dict | None, stops: bool) -> None:
    from datadistill.errors import UserError
    from datadistill.run import check_teacher

    if stops:
        with pytest.raises(UserError, match="too weak to teach"):
            check_teacher(metrics)
    else:
        check_teacher(metrics)


def test_a_teacher_that_finds_nothing_stops_label_unless_allowed(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = tiny / "ref" / "teacher"
    if not (teacher / "checkpoint.pt").exists():
        assert main(["run", str(tiny / "config.yaml"), "--out", str(tiny / "ref")]) == 0
    argv = ["label", "--model", str(teacher), "--images", str(tiny / "data" / "images"), "--out",
            str(tiny / "nothing"), "--views", "identity", "--score-floor", "1.0", "--workers", "0"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the teacher found no object scoring at least --score-floor 1.0 on any of the ")
    assert "--allow-weak-teacher" in err and err.count("\n") == 1
    assert main([*argv, "--allow-weak-teacher"]) == 0  # the shards are done: it only reports


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("select.cross_class_iou=5", "select.cross_class_iou must be in [0, 1] (0: off), got 5.0"),
        ("select.ignore_band=1", "select.ignore_band must be in [0, 1), got 1.0"),
        ("select.policy=fixed:2", "select.policy: fixed threshold must be in [0, 1], got 2.0"),
        (
            "select.keypoint_policy=count:2",
            "select.keypoint_policy must be count, count:F (F in (0, 1]) or all, got 'count:2'",
        ),
    ],
)
def test_bad_select_options_fail_before_training(
    tiny: Path, capsys: pytest.CaptureFixture[str], setting: str, message: str
) -> None:
    out = tiny / "bad-select"
    assert main(["run", str(tiny / "config.yaml"), "--out", str(out), "--set", setting]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (out / "teacher").exists()


def test_a_folder_recorded_before_the_select_options_resumes_with_their_old_values(tiny: Path) -> None:
    import yaml

    from datadistill.layout import RunLayout
    from datadistill.run import _record_config

    cfg, base = load_run_config(tiny / "config.yaml")
    layout = RunLayout(tiny / "old-folder")
    layout.root.mkdir()
    _record_config(layout, cfg, base)
    recorded = yaml.safe_load(layout.config.read_text())
    del recorded["select"]["ignore_band"], recorded["select"]["cross_class_iou"]  # as an older version wrote it
    layout.config.write_text(yaml.safe_dump(recorded, sort_keys=False))
    with pytest.raises(UserError, match="was started with another 'select'"):
        _record_config(layout, cfg, base)  # the default 0.5 is not what that run did
    old, _ = load_run_config(tiny / "config.yaml", ["select.cross_class_iou=0"])
    _record_config(layout, old, base)


def test_run_without_a_config_writes_its_config_results_and_report(
    tiny: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tiny)  # relative paths on the command line are the working folder's
    out = tiny / "flags"
    argv = ["run", "--labeled", "data/labeled.json", "--images", "data/images", "--unlabeled", "data/unlabeled.json",
            "--val", "data/val.json", "--out", str(out)]  # fmt: skip
    for setting in ("teacher.iterations=2", "label.shard_size=4", "device=cpu", "threads=1", "workers=0",
                    "teacher_check=false"):  # fmt: skip
        argv += ["--set", setting]
    assert main(argv) == 0
    assert f"wrote {out / 'results.json'}" in capsys.readouterr().out
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["data"]["train"] == str(tiny / "data" / "labeled.json") and recorded["data"]["val_images"] is None
    assert recorded["teacher"]["iterations"] == 2 and recorded["label"]["views"] == "auto"
    results = json.loads((out / "results.json").read_text())
    assert results["teacher"] == json.loads((out / "teacher" / "eval" / "metrics.json").read_text())
    assert results["students"] == [results["student"]]
    for key in ("AP", "AP50", "AP75"):
        gain = results["student"]["bbox"][key] - results["teacher"]["bbox"][key]
        assert results["gain"]["bbox"][key] == pytest.approx(gain)
    assert "student, round 1" in (out / "report.html").read_text()
    assert main(["run", "--labeled", "data/labeled.json"]) == 1
    assert "give a CONFIG.yaml, or --labeled" in capsys.readouterr().err
