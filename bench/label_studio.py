"""Round trip through a real Label Studio, boxes and keypoints: review -> import -> annotate -> export -> merge.

Not part of the test run (it installs Label Studio, about 2 minutes, from the package index); CI runs it after
the tests (``.ci/run``). It:

1. makes two tiny labeling folders (shards + manifest) with a labeled COCO json and a selection each, one of
   boxes (shapes, 2 classes) and one of keypoints (stick figures, 13 keypoints), and runs ``datadistill
   review`` on each;
2. creates a venv (``--venv``, default ``WORK/venv``) and installs ``label-studio`` and ``label-studio-sdk``
   into it with every package pinned by ``bench/label_studio-constraints.txt`` (skipped when the venv already
   holds what that file pins);
3. starts ``label-studio start`` bound to 127.0.0.1 only (checked: it must not answer on another interface),
   with a temporary data dir, local-files serving on and a user with a fixed API token, and prints how long it
   took to answer; a server that dies gives one line with the last lines of its log;
4. for each folder, through ``label-studio-sdk``: creates a project with the ``label_config.xml`` review wrote,
   imports the tasks, reads them back, submits each task's prediction as its annotation (what a person
   accepting the pre-annotations does), and exports the project as JSON (``/api/projects/ID/export``);
5. runs ``datadistill merge`` on each export and checks that the boxes and keypoints come back within
   ``TOLERANCE_PX`` of what review sent and that the merged COCO json validates.

    python bench/label_studio.py [--work /tmp/ls-bench] [--venv DIR] [--port 8089] [--keep]

Exit status 0 when both round trips pass, 1 with one line saying what failed otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np

from datadistill.data.coco import load_coco, validate_coco
from datadistill.data.label_folder import shard_schema, write_shard
from datadistill.data.synth import make_figures
from datadistill.runtime.io import write_json_atomic
from datadistill.stages.review import merge, review

HOST = "127.0.0.1"
TOKEN = "datadistill0bench0token0000000000000000"  # a fixed legacy API token for this throwaway server
CONSTRAINTS = Path(__file__).with_name("label_studio-constraints.txt")
TOLERANCE_PX = 1e-6  # what review sent against what merge read back, boxes and keypoints
LOG_LINES = 5  # of the server's log, in the line that says it died
W, H = 640, 480
VIEWS = ["identity", "hflip", "scale:0.8", "scale:1.2"]

# the driver that runs inside the Label Studio venv: the SDK calls, then the export over plain HTTP
DRIVER = textwrap.dedent(
    """
    import json, sys, urllib.request
    from label_studio_sdk import LabelStudio

    url, token, title, config_path, tasks_path, export_path = sys.argv[1:7]
    ls = LabelStudio(base_url=url, api_key=token)
    project = ls.projects.create(title=title, label_config=open(config_path).read())
    tasks = json.load(open(tasks_path))
    ls.projects.import_tasks(id=project.id, request=tasks)
    back = list(ls.tasks.list(project=project.id, fields="all"))
    assert len(back) == len(tasks), f"imported {len(tasks)} tasks, read {len(back)} back"
    for task in back:
        preds = task.predictions or []
        result = preds[0].result if preds and not isinstance(preds[0], dict) else (preds[0]["result"] if preds else [])
        ls.annotations.create(id=task.id, result=result, was_cancelled=False)
    req = urllib.request.Request(f"{url}/api/projects/{project.id}/export?exportType=JSON&download_all_tasks=true",
                                 headers={"Authorization": f"Token {token}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        open(export_path, "wb").write(r.read())
    print(f"project {project.id}: imported {len(tasks)} tasks, read {len(back)} back, annotated, exported")
    """
)


class BenchError(Exception):
    """A failed step, said in one line."""


def make_box_inputs(folder: Path) -> None:
    """A labeling folder of 4 images (4 views), a labeled COCO json of 2 images, a selection at 0.5."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        n = 3
        x1, y1 = rng.uniform(0, W / 2, n), rng.uniform(0, H / 2, n)
        boxes = np.stack([x1, y1, x1 + rng.uniform(5, W / 2, n), y1 + rng.uniform(5, H / 2, n)], 1)
        rows.append({"file_name": f"sub/u{i}.jpg", "width": W, "height": H, "boxes": boxes.reshape(-1).tolist(),
                     "scores": rng.uniform(0.3, 1.0, n).tolist(), "labels": rng.integers(0, 2, n).tolist(),
                     "agreement": rng.integers(1, 5, n).tolist(), "error": None})  # fmt: skip
    write_shard(folder / "labels" / "shards" / "part-00000.parquet", rows, shard_schema(0))
    manifest = {"status": "complete", "classes": {"names": ["cat", "dog"]}, "config": {"views": VIEWS}}
    write_json_atomic(folder / "labels" / "manifest.json", manifest)
    ref = {"images": [{"id": i, "file_name": f"l{i}.jpg", "width": W, "height": H} for i in (1, 2)],
           "annotations": [{"id": i, "image_id": i, "category_id": i, "bbox": [10, 10, 50, 40], "iscrowd": 0}
                           for i in (1, 2)],
           "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}  # fmt: skip
    (folder / "ref.json").write_text(json.dumps(ref))
    (folder / "selection.json").write_text(json.dumps({"thresholds": {"cat": 0.5, "dog": 0.5}, "min_agreement": 1}))


def make_keypoint_inputs(folder: Path, *, size_px: int = 120) -> None:
    """Six stick-figure images of ``size_px``: the first 2 the labeled COCO json, the other 4 labeled by "the
    teacher" with their true boxes and keypoints (score 0.9 where visible, 0.1 where hidden); a selection at 0.5
    for boxes and keypoints, so that review sends the visible keypoints. (120 px: pixel positions are no binary
    fractions of the width, so the percent round trip is not exact by chance.)"""
    raw = json.loads(make_figures(folder / "data", num_images=6, seed=0, size_px=size_px).read_text())
    ref_ids = {im["id"] for im in raw["images"][:2]}
    ref = {**raw, "images": [im for im in raw["images"] if im["id"] in ref_ids],
           "annotations": [a for a in raw["annotations"] if a["image_id"] in ref_ids]}  # fmt: skip
    (folder / "ref.json").write_text(json.dumps(ref))
    truth = load_coco(folder / "data" / "annotations.json")
    rows = []
    for im in truth.images[2:]:
        lab = truth.labels[im.id]
        kp = lab.keypoints.copy()
        kp[..., 2] = np.where(kp[..., 2] == 2, 0.9, 0.1)
        n = len(lab.boxes)
        rows.append({"file_name": im.file_name, "width": im.width, "height": im.height,
                     "boxes": lab.boxes.reshape(-1).tolist(), "scores": [0.6] * n, "labels": [0] * n,
                     "agreement": [3] * n, "keypoints": kp.reshape(-1).tolist(), "error": None})  # fmt: skip
    write_shard(folder / "labels" / "shards" / "part-00000.parquet", rows, shard_schema(truth.num_keypoints))
    write_json_atomic(folder / "labels" / "manifest.json",
                      {"status": "complete", "classes": {"names": ["figure"]}, "config": {"views": VIEWS}})  # fmt: skip
    selection = {"thresholds": {"figure": 0.5}, "min_agreement": 1, "keypoint_threshold": 0.5}
    (folder / "selection.json").write_text(json.dumps(selection))


def ensure_venv(venv: Path) -> Path:
    """``venv``'s python with Label Studio installed as the constraints file pins it; reinstalled when that
    file changed since (its sha256 is kept in the venv)."""
    python = venv / "bin" / "python"
    marker = venv / "datadistill-constraints.sha256"
    wanted = hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()
    if python.exists() and marker.exists() and marker.read_text().strip() == wanted:
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    t = time.time()
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(CONSTRAINTS)]
    done = subprocess.run([*pip, "label-studio", "label-studio-sdk"], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"pip install label-studio label-studio-sdk (pinned by {CONSTRAINTS.name}) failed: {last}")
    marker.write_text(wanted + "\n")
    print(f"pip install label-studio label-studio-sdk (pinned): {time.time() - t:.0f} s", flush=True)
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def log_tail(log_path: Path, lines: int = LOG_LINES) -> str:
    """The last ``lines`` non-empty lines of the server's log, joined by `` | `` (one line)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail) or "(empty log)"


def wait_for(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log_path: Path) -> float:
    """Seconds until ``url/health`` answers 200; :class:`BenchError` if the server exits or times out first."""
    started = time.time()
    while time.time() - started < timeout_s:
        if proc.poll() is not None:
            raise BenchError(
                f"label-studio exited with status {proc.returncode} before answering; the last lines of "
                f"{log_path}: {log_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - started
        except OSError:
            time.sleep(0.5)
    raise BenchError(f"label-studio did not answer {url}/health within {timeout_s:.0f} s; {log_tail(log_path)}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End the server and its workers (the process group this script started), also when it died already."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone
            break
        try:
            proc.wait(timeout=30)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.poll()


def check_loopback_only(port: int) -> None:
    """The server must not answer on another interface of this machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outward interface
            other = s.getsockname()[0]
        except OSError:
            return
    if other.startswith("127."):
        return
    with socket.socket() as s:
        s.settimeout(1)
        if s.connect_ex((other, port)) == 0:
            raise BenchError(f"label-studio answers on {other}:{port}; it must bind to {HOST} only")


def through_label_studio(python: Path, url: str, env: dict[str, str], folder: Path, title: str) -> float:
    """Project, import, annotate and export of ``folder/rev`` into ``folder/export.json``; returns seconds."""
    t = time.time()
    done = subprocess.run(
        [str(python), str(folder.parent / "driver.py"), url, TOKEN, title, str(folder / "rev" / "label_config.xml"),
         str(folder / "rev" / "tasks.json"), str(folder / "export.json")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"{title}: the SDK driver failed: {last}")
    print(f"{title}: {done.stdout.strip()} in {time.time() - t:.1f} s", flush=True)
    return time.time() - t


def merged_back(folder: Path, *, keypoints: bool) -> tuple[dict[str, int], float, float]:
    """Merge ``folder/export.json`` into the labeled json, validate it, and compare with what review sent:
    ``(merge summary, worst box error px, worst keypoint error px)`` (keypoints: x, y and v, 0 for a box task)."""
    summary = merge(folder / "ref.json", folder / "export.json", out=folder / "merged.json")
    problems = validate_coco(folder / "merged.json")
    if problems:
        raise BenchError(f"{folder / 'merged.json'} does not validate: {problems[0]}")
    merged, sent = load_coco(folder / "merged.json"), load_coco(folder / "rev" / "coco.json")
    by_name = {im.file_name: im.id for im in merged.images}
    worst_box = worst_kp = 0.0
    for im in sent.images:
        if im.file_name not in by_name:
            raise BenchError(f"{im.file_name} was sent to Label Studio but is not in the merged json")
        a, b = merged.labels[by_name[im.file_name]], sent.labels[im.id]
        if a.boxes.shape != b.boxes.shape:
            raise BenchError(f"{im.file_name}: {len(b.boxes)} boxes sent, {len(a.boxes)} came back")
        worst_box = max(worst_box, float(np.abs(a.boxes - b.boxes).max(initial=0.0)))
        if keypoints:
            if a.keypoints is None or a.keypoints.shape != b.keypoints.shape:
                raise BenchError(f"{im.file_name}: keypoints {b.keypoints.shape} sent, came back as "
                                 f"{None if a.keypoints is None else a.keypoints.shape}")  # fmt: skip
            worst_kp = max(worst_kp, float(np.abs(a.keypoints - b.keypoints).max(initial=0.0)))
    if worst_box > TOLERANCE_PX or worst_kp > TOLERANCE_PX:
        raise BenchError(f"{folder.name}: boxes back within {worst_box:.2e} px, keypoints within {worst_kp:.2e} px; "
                         f"the tolerance is {TOLERANCE_PX:g} px")  # fmt: skip
    return summary, worst_box, worst_kp


def round_trips(args: argparse.Namespace) -> str:
    """Both round trips; returns the line that sums them up."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    inputs = work / "inputs"
    shutil.rmtree(inputs, ignore_errors=True)
    make_box_inputs(inputs / "boxes")
    make_keypoint_inputs(inputs / "keypoints")
    for name in ("boxes", "keypoints"):
        folder = inputs / name
        review(folder / "labels", folder / "ref.json", out=folder / "rev", top=10,
               selection_path=folder / "selection.json")  # fmt: skip
    (inputs / "driver.py").write_text(DRIVER)
    python = ensure_venv(Path(args.venv) if args.venv else work / "venv")

    port = args.port or free_port()
    url = f"http://{HOST}:{port}"
    data_dir = Path(tempfile.mkdtemp(prefix="ls-data-", dir=work))
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir), "LABEL_STUDIO_USERNAME": "bench@example.com",
           "LABEL_STUDIO_PASSWORD": "bench-password-1", "LABEL_STUDIO_USER_TOKEN": TOKEN,
           "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(inputs), "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
           "DJANGO_DB": "sqlite", "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false"}  # fmt: skip
    env.pop("CI", None)  # Label Studio's own CI setting (for its test suite) adds a migration linter app
    command = [str(python), "-m", "label_studio.server", "start", "--host", url, "--internal-host", HOST,
               "--port", str(port), "--no-browser", "--data-dir", str(data_dir)]  # fmt: skip
    log_path = work / "label-studio.log"
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started_s = wait_for(url, proc, args.timeout, log_path)
        print(f"label-studio answered on {url} after {started_s:.1f} s", flush=True)
        check_loopback_only(port)
        for name in ("boxes", "keypoints"):
            through_label_studio(python, url, env, inputs / name, f"datadistill review ({name})")
    finally:
        stop(proc)
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)

    boxes, box_err, _ = merged_back(inputs / "boxes", keypoints=False)
    figures, fig_box_err, kp_err = merged_back(inputs / "keypoints", keypoints=True)
    added = json.loads((inputs / "keypoints" / "merged.json").read_text())["annotations"][
        -figures["annotations_added"] :
    ]
    shown = sum(int(a["num_keypoints"]) for a in added)
    return (
        f"boxes: {boxes['images_added']} images, {boxes['annotations_added']} boxes back within {box_err:.2e} px; "
        f"keypoints: {figures['images_added']} images, {figures['annotations_added']} figures, {shown} keypoints "
        f"back within {kp_err:.2e} px (their boxes {fig_box_err:.2e} px); both merged COCO jsons validate; "
        f"{time.time() - t0:.1f} s since the server start"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "datadistill-ls-bench"))
    ap.add_argument("--venv", default="", help="the Label Studio venv (WORK/venv); reused when it is up to date")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for the server")
    ap.add_argument("--keep", action="store_true", help="keep the server's data dir")
    args = ap.parse_args()
    try:
        line = round_trips(args)
    except BenchError as exc:
        print(f"label studio round trip FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"label studio round trip OK: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
