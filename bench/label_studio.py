"""Round trip through a real Label Studio: review -> import -> annotate -> export -> merge.

Not part of the test run (it installs Label Studio, minutes, and needs the package index). It:

1. makes a tiny labeling folder (shards + manifest), a labeled COCO json and a selection, and runs
   ``datadistill review`` on them;
2. creates a separate venv in ``--work`` and ``pip install label-studio label-studio-sdk`` into it (skipped
   when it is already there);
3. starts ``label-studio start`` bound to 127.0.0.1 only, with a temporary data dir, local-files serving on
   and a user with a fixed API token (``LABEL_STUDIO_USERNAME`` / ``_PASSWORD`` / ``_USER_TOKEN``), and
   prints how long it took to answer;
4. through ``label-studio-sdk`` creates a project with the ``label_config.xml`` review wrote, imports the
   tasks, reads them back, submits each task's prediction as its annotation (what a person accepting the
   pre-annotations does), and exports the project as JSON (``/api/projects/ID/export``);
5. runs ``datadistill merge`` on the export and checks the boxes come back within 1e-6 px and the merged
   COCO json validates.

    python bench/label_studio.py --work /tmp/ls-bench [--port 8089] [--keep]
"""

from __future__ import annotations

import argparse
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
from datadistill.runtime.io import write_json_atomic
from datadistill.stages.review import merge, review

HOST = "127.0.0.1"
TOKEN = "datadistill0bench0token0000000000000000"  # a fixed legacy API token for this throwaway server
W, H = 640, 480

# the driver that runs inside the Label Studio venv: the SDK calls, then the export over plain HTTP
DRIVER = textwrap.dedent(
    """
    import json, sys, urllib.request
    try:
        from label_studio_sdk import LabelStudio  # label-studio-sdk 1.x (late) and 2.x
    except ImportError:
        from label_studio_sdk.client import LabelStudio

    url, token, config_path, tasks_path, export_path = sys.argv[1:6]
    ls = LabelStudio(base_url=url, api_key=token)
    project = ls.projects.create(title="datadistill review", label_config=open(config_path).read())
    tasks = json.load(open(tasks_path))
    ls.projects.import_tasks(id=project.id, request=tasks)
    back = list(ls.tasks.list(project=project.id, fields="all"))
    assert len(back) == len(tasks), (len(back), len(tasks))
    for task in back:
        preds = task.predictions or []
        result = preds[0].result if preds and not isinstance(preds[0], dict) else (preds[0]["result"] if preds else [])
        ls.annotations.create(id=task.id, result=result, was_cancelled=False)
    req = urllib.request.Request(f"{url}/api/projects/{project.id}/export?exportType=JSON&download_all_tasks=true",
                                 headers={"Authorization": f"Token {token}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        open(export_path, "wb").write(r.read())
    print(f"project {project.id}: imported {len(tasks)} tasks, read {len(back)} back, exported")
    """
)


def make_inputs(folder: Path) -> None:
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
    write_json_atomic(folder / "labels" / "manifest.json", {"status": "complete", "classes": {"names": ["cat", "dog"]},
                      "config": {"views": ["identity", "hflip", "scale:0.8", "scale:1.2"]}})  # fmt: skip
    ref = {"images": [{"id": i, "file_name": f"l{i}.jpg", "width": W, "height": H} for i in (1, 2)],
           "annotations": [{"id": i, "image_id": i, "category_id": i, "bbox": [10, 10, 50, 40], "iscrowd": 0}
                           for i in (1, 2)],
           "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}  # fmt: skip
    (folder / "ref.json").write_text(json.dumps(ref))
    (folder / "selection.json").write_text(json.dumps({"thresholds": {"cat": 0.5, "dog": 0.5}, "min_agreement": 1}))


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(python), "-c", "import label_studio, label_studio_sdk"], capture_output=True)
    if probe.returncode != 0:
        t = time.time()
        subprocess.run([str(python), "-m", "pip", "install", "-q", "label-studio", "label-studio-sdk"], check=True)
        print(f"pip install label-studio label-studio-sdk: {time.time() - t:.0f} s")
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    started = time.time()
    while time.time() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"label-studio exited with status {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - started
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"label-studio did not answer {url}/health within {timeout_s:.0f} s")


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
            raise RuntimeError(f"label-studio answers on {other}:{port}; it must bind to {HOST} only")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "datadistill-ls-bench"))
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for the server")
    ap.add_argument("--keep", action="store_true", help="keep the server's data dir")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    inputs = work / "inputs"
    shutil.rmtree(inputs, ignore_errors=True)
    make_inputs(inputs)
    review(inputs / "labels", inputs / "ref.json", out=inputs / "rev", top=3, selection_path=inputs / "selection.json")
    python = ensure_venv(work / "venv")

    port = args.port or free_port()
    url = f"http://{HOST}:{port}"
    data_dir = Path(tempfile.mkdtemp(prefix="ls-data-", dir=work))
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir), "LABEL_STUDIO_USERNAME": "bench@example.com",
           "LABEL_STUDIO_PASSWORD": "bench-password-1", "LABEL_STUDIO_USER_TOKEN": TOKEN,
           "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(inputs), "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
           "DJANGO_DB": "sqlite", "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false"}  # fmt: skip
    command = [str(python), "-m", "label_studio.server", "start", "--host", url, "--internal-host", HOST,
               "--port", str(port), "--no-browser", "--data-dir", str(data_dir)]  # fmt: skip
    log = open(work / "label-studio.log", "wb")
    t0 = time.time()
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started_s = wait_for(url, proc, args.timeout)
        print(f"label-studio answered on {url} after {started_s:.1f} s")
        check_loopback_only(port)
        (inputs / "driver.py").write_text(DRIVER)
        export = inputs / "export.json"
        t = time.time()
        subprocess.run([str(python), str(inputs / "driver.py"), url, TOKEN, str(inputs / "rev" / "label_config.xml"),
                        str(inputs / "rev" / "tasks.json"), str(export)], check=True, env=env)  # fmt: skip
        print(f"project, import, annotate, export: {time.time() - t:.1f} s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the group this script started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)

    summary = merge(inputs / "ref.json", export, out=inputs / "merged.json")
    problems = validate_coco(inputs / "merged.json")
    assert not problems, problems
    merged, sent = load_coco(inputs / "merged.json"), load_coco(inputs / "rev" / "coco.json")
    worst = 0.0
    for im in sent.images:
        new = next(m for m in merged.images if m.file_name == im.file_name)
        a, b = merged.labels[new.id].boxes, sent.labels[im.id].boxes
        assert a.shape == b.shape, (im.file_name, a.shape, b.shape)
        worst = max(worst, float(np.abs(a - b).max(initial=0.0)))
    assert worst < 1e-6, worst
    print(f"merged {summary['images_added']} images, {summary['annotations_added']} boxes; worst box error "
          f"{worst:.2e} px; merged COCO validates; total {time.time() - t0:.1f} s since the server start")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
