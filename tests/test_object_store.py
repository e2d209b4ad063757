"""Images in object storage, against a real S3-compatible server that this module starts on 127.0.0.1 (moto's
server mode, which checks request signatures once told to): `label` (local and Ray engines), `select` and a
student's `train` read s3:// images and give bit for bit what they give on a local copy of the same files;
refused credentials, a missing bucket or object are one-line errors that name the URI and quote no secret."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from datadistill.cli import main
from datadistill.data import object_store
from datadistill.data.images import is_file, list_images, read_image, resolve_image_path
from datadistill.data.synth import make_shapes
from datadistill.errors import DataError, UserError, root_user_error
from datadistill.models import torchvision as models

boto3 = pytest.importorskip("boto3", reason="needs moto[server] (the dev extra)")
moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")

SIZE_PX = 64
BUCKET = "dd-images"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
LIST_ONLY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "*"}]}


@dataclass(frozen=True)
class Server:
    """The server's address, and the keys of a user who may do anything and of one who may only list."""

    endpoint: str
    key_id: str
    secret: str
    list_key_id: str
    list_secret: str


def _moto_api(endpoint: str, path: str, body: bytes) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/{path}", data=body, method="POST",
                                     headers={"Content-Type": "text/plain"})  # fmt: skip
    urllib.request.urlopen(request).close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log on stderr
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # The first 6 requests go unchecked (to make two users and their keys); every later one must be signed
    # with a key the server knows, as real S3 does.
    _moto_api(endpoint, "reset-auth", b"6")
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")  # fmt: skip
    keys = []
    for user, policy in (("labeler", ALLOW_ALL), ("lister", LIST_ONLY)):
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys += [key["AccessKeyId"], key["SecretAccessKey"]]
    try:
        yield Server(endpoint, *keys)
    finally:
        _moto_api(endpoint, "reset-auth", b"inf")
        srv.stop()


@pytest.fixture
def s3(server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Server:
    """The labeler's credentials and the server in the environment, as a user sets them (nothing from ~/.aws)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    env = {"AWS_ACCESS_KEY_ID": server.key_id, "AWS_SECRET_ACCESS_KEY": server.secret,
           "AWS_ENDPOINT_URL": server.endpoint, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return server


@dataclass(frozen=True)
class Data:
    labeled: Path  # annotations.json and images/ (also under s3://BUCKET/labeled/)
    unlabeled: Path  # images, a broken file and sub/ (also under s3://BUCKET/unlabeled/)


@pytest.fixture(scope="module")
def data(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Data:
    """8 labeled and 7 unlabeled files (one broken, one in sub/) of 64 px, locally and in the bucket, which also
    holds a text file, a key that climbs out of its prefix and a sibling prefix (none of them images to label)."""
    root = tmp_path_factory.mktemp("s3data")
    make_shapes(root / "labeled", num_images=8, seed=0, size_px=SIZE_PX)
    make_shapes(root / "unlabeled", num_images=6, seed=1, size_px=SIZE_PX)
    unlabeled = root / "unlabeled" / "images"
    (unlabeled / "broken.png").write_bytes(b"not a png")
    (unlabeled / "sub").mkdir()
    (unlabeled / "000006.png").rename(unlabeled / "sub" / "000006.png")
    client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                          aws_access_key_id=server.key_id, aws_secret_access_key=server.secret)  # fmt: skip
    client.create_bucket(Bucket=BUCKET)
    for prefix, folder in (("labeled", root / "labeled" / "images"), ("unlabeled", unlabeled)):
        for name in list_images(folder) + (["notes.txt"] if prefix == "unlabeled" else []):
            if name == "notes.txt":
                (folder.parent / name).write_text("not an image")
            body = (folder / name if name != "notes.txt" else folder.parent / name).read_bytes()
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=body)
    image = (unlabeled / "000001.png").read_bytes()
    client.put_object(Bucket=BUCKET, Key="unlabeled/../outside.png", Body=image)
    client.put_object(Bucket=BUCKET, Key="unlabeled-other/000001.png", Body=image)
    return Data(labeled=root / "labeled", unlabeled=unlabeled)


def _label(teacher: Path, images: str, out: Path, *extra: str) -> list[str]:
    return ["label", "--model", str(teacher), "--images", images, "--out", str(out), "--views", "identity,hflip",
            "--batch-size", "2", "--shard-size", "3", "--workers", "0", "--threads", "1", "--device", "cpu",
            "--allow-weak-teacher", *extra]  # fmt: skip


def _train(data: Data, images: str, pseudo: Path, pseudo_images: str, out: Path) -> list[str]:
    return ["train", "--data", str(data.labeled / "annotations.json"), "--images", images, "--pseudo", str(pseudo),
            "--pseudo-images", pseudo_images, "--out", str(out), "--iterations", "2", "--batch-size", "4",
            "--min-size", str(SIZE_PX), "--max-size", str(SIZE_PX), "--threads", "1", "--device", "cpu"]  # fmt: skip


def _shards(out: Path) -> list[list[dict]]:
    return [pq.read_table(p).to_pylist() for p in sorted((out / "shards").glob("part-*.parquet"))]


def _texts(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.suffix in (".json", ".yaml", ".jsonl"))


def test_label_select_and_a_student_on_s3_give_what_the_local_copy_gives(
    s3: Server, data: Data, teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = {"local": (str(data.labeled / "images"), str(data.unlabeled)),
            "s3": (f"s3://{BUCKET}/labeled", f"s3://{BUCKET}/unlabeled/")}  # fmt: skip
    for name, (labeled, unlabeled) in runs.items():
        out = tmp_path / name
        assert main(_label(teacher, unlabeled, out / "labels")) == 0
        assert main(["select", "--labels", str(out / "labels"), "--reference", str(data.labeled / "annotations.json"),
                     "--out", str(out / "pseudo.json")]) == 0  # fmt: skip
        assert main(_train(data, labeled, out / "pseudo.json", unlabeled, out / "student")) == 0
    capsys.readouterr()
    local, remote = tmp_path / "local", tmp_path / "s3"
    assert _shards(remote / "labels") == _shards(local / "labels") and len(_shards(local / "labels")) == 3
    manifest = json.loads((remote / "labels" / "manifest.json").read_text())
    assert manifest["config"]["image_root"] == f"s3://{BUCKET}/unlabeled"
    assert manifest["config"]["source"] == f"prefix s3://{BUCKET}/unlabeled"
    assert (manifest["counts"]["images"], manifest["counts"]["skipped"]) == (7, 1)
    assert manifest["skipped"][0]["file_name"] == "broken.png"
    names = [row["file_name"] for shard in _shards(remote / "labels") for row in shard]
    assert names == ["000001.png", "000002.png", "000003.png", "000004.png", "000005.png", "broken.png",
                     "sub/000006.png"]  # fmt: skip
    pseudo = json.loads((remote / "pseudo.json").read_text())
    expected = json.loads((local / "pseudo.json").read_text())
    assert pseudo["images"] == expected["images"] and pseudo["annotations"] == expected["annotations"] != []
    steps = [json.loads(line) for line in (remote / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in steps if s["type"] == "step"][-1] == 2
    weights = {name: models.read_checkpoint(tmp_path / name / "student" / "checkpoint.pt")["state_dict"]
               for name in runs}  # fmt: skip
    assert weights["s3"].keys() == weights["local"].keys()
    assert all(torch.equal(weights["s3"][k], weights["local"][k]) for k in weights["local"])
    assert "s3://" in _texts(remote) and s3.key_id not in _texts(remote) and s3.secret not in _texts(remote)


def test_the_ray_engine_labels_s3_images_as_the_local_engine_does(
    s3: Server, data: Data, teacher: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray", reason="the Ray engine is optional: pip install 'datadistill[ray]'")
    uri = f"s3://{BUCKET}/unlabeled"
    assert main(_label(teacher, uri, tmp_path / "local")) == 0
    assert main(_label(teacher, uri, tmp_path / "ray", "--engine", "ray")) == 0  # Ray's workers inherit the env
    assert _shards(tmp_path / "ray") == _shards(tmp_path / "local")
    assert json.loads((tmp_path / "ray" / "manifest.json").read_text())["timings"]["engine"] == "ray"


WRONG_SECRET = "wrong-secret-0123456789"
S3_CHECK = "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, AWS_SESSION_TOKEN) and that they may"


@pytest.mark.parametrize(
    ("env", "images", "expected"),
    [
        pytest.param({"AWS_SECRET_ACCESS_KEY": WRONG_SECRET}, f"s3://{BUCKET}/unlabeled",
                     f"s3://{BUCKET}/unlabeled: the storage service refused the credentials (SIGNATURE_DOES_NOT_MATCH); "
                     f"{S3_CHECK} read the bucket", id="wrong-secret"),
        pytest.param({"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000"}, f"s3://{BUCKET}/unlabeled",
                     f"s3://{BUCKET}/unlabeled: the storage service refused the credentials (INVALID_ACCESS_KEY_ID); "
                     f"{S3_CHECK} read the bucket", id="unknown-key"),
        pytest.param({}, "s3://no-such-bucket/images",
                     "s3://no-such-bucket/images: no such bucket (NO_SUCH_BUCKET); check the bucket name, and "
                     "AWS_ENDPOINT_URL or AWS_DEFAULT_REGION", id="missing-bucket"),
        pytest.param({}, f"s3://{BUCKET}/nothing-here/",
                     f"s3://{BUCKET}/nothing-here: no images found under this prefix (looked for .jpg, .png, .webp ...)",
                     id="empty-prefix"),
        pytest.param({}, f"s3://AKIAINURI:{WRONG_SECRET}@{BUCKET}/unlabeled",
                     f"s3://***@{BUCKET}/unlabeled: give the bucket and key only; credentials and options come from "
                     "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, "
                     "AWS_ENDPOINT_URL, AWS_DEFAULT_REGION)", id="credentials-in-the-uri"),
        pytest.param({}, "hdfs://namenode/images",
                     "hdfs://namenode/images: unsupported storage scheme 'hdfs': datadistill reads s3, gs, gcs, az, "
                     "abfs, abfss URIs or local paths", id="unsupported-scheme"),
    ],
)  # fmt: skip
def test_label_from_a_store_it_cannot_read_is_a_one_line_error(
    s3: Server, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    env: dict[str, str], images: str, expected: str,
) -> None:  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(_label(teacher, images, tmp_path / "labels")) == 1
    assert capsys.readouterr().err == f"error: {expected}\n"
    assert not (tmp_path / "labels" / "manifest.json").exists()


def test_a_wrong_credential_stops_the_cli_with_one_line_and_no_secret(s3: Server, data: Data, tmp_path: Path) -> None:
    """The whole stderr of `datadistill train` in its own process: log lines, then one error line; no traceback,
    no secret."""
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": WRONG_SECRET, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = _train(data, f"s3://{BUCKET}/labeled", data.labeled / "annotations.json", f"s3://{BUCKET}/labeled",
                  tmp_path / "student")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "datadistill", *args], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 1
    # the first image asked for (a sample of names is checked one object each): S3 answers a HEAD without a body
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: s3://{BUCKET}/labeled/000001.png: the storage service refused the credentials (ACCESS_DENIED); "
        f"{S3_CHECK} read the bucket"
    )
    assert "Traceback" not in done.stderr and WRONG_SECRET not in done.stderr and s3.key_id not in done.stderr


def test_missing_objects_are_named(s3: Server, data: Data, teacher: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A pseudo-label naming an object that is not there is refused up front; one in a list to label is a
    skipped image, as a missing local file is."""
    raw = json.loads((data.labeled / "annotations.json").read_text())
    raw["images"][3]["file_name"] = "ghost.png"
    (tmp_path / "pseudo.json").write_text(json.dumps(raw))
    args = _train(data, f"s3://{BUCKET}/labeled", tmp_path / "pseudo.json", f"s3://{BUCKET}/labeled", tmp_path / "s")
    assert main(args) == 1
    assert capsys.readouterr().err == (
        f"error: 1 of the 8 pseudo-label images are missing from --pseudo-images s3://{BUCKET}/labeled, "
        "the first: ghost.png\n"
    )
    (tmp_path / "list.txt").write_text("000001.png\nghost.png\n")
    args = _label(teacher, str(tmp_path / "list.txt"), tmp_path / "labels", "--image-root", f"s3://{BUCKET}/labeled")
    assert main(args) == 0
    manifest = json.loads((tmp_path / "labels" / "manifest.json").read_text())
    assert manifest["skipped"] == [{"file_name": "ghost.png", "reason": "no such object"}]
    with pytest.raises(DataError, match=rf"^s3://{BUCKET}/labeled/ghost.png: no such object$"):
        read_image(f"s3://{BUCKET}/labeled/ghost.png")


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param(["--workers", "1"], id="local-engine-in-a-worker"),
        pytest.param(["--engine", "ray"], id="ray-engine", marks=pytest.mark.slow),  # a Ray cluster: 15 s
    ],
)
def test_a_key_that_may_not_read_the_images_stops_labeling_instead_of_skipping_every_image(
    s3: Server, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    engine: list[str],
) -> None:  # fmt: skip
    """A list of names under a prefix whose objects the key may list but not read, decoded in a DataLoader worker
    or a Ray task: the first refusal stops the run with its one line (a skipped row for every image would make a
    labeling of nothing). Ray's own log lines come before it."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.list_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.list_secret)
    (tmp_path / "list.txt").write_text("000001.png\n000002.png\n")
    args = _label(teacher, str(tmp_path / "list.txt"), tmp_path / "labels", "--image-root", f"s3://{BUCKET}/unlabeled")
    assert main([*args, *engine]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"error: s3://{BUCKET}/unlabeled/000001.png: the storage service refused the credentials (ACCESS_DENIED); "
        f"{S3_CHECK} read the bucket"
    )
    assert err.count("\n") == 1 or "--engine" in engine
    assert not list((tmp_path / "labels" / "shards").glob("*.parquet"))


def test_listing_keeps_to_the_prefix_and_reads_the_same_pixels(s3: Server, data: Data) -> None:
    uri = f"s3://{BUCKET}/unlabeled"
    assert list_images(uri + "/") == list_images(data.unlabeled)  # not notes.txt, ../outside.png, unlabeled-other/
    assert list_images(f"s3://{BUCKET}/labeled") == list_images(data.labeled / "images")
    for name in ("000001.png", "sub/000006.png"):
        assert torch.equal(read_image(resolve_image_path(uri, name)), read_image(data.unlabeled / name))
    assert is_file(f"{uri}/000001.png") and not is_file(f"{uri}/ghost.png") and not is_file(f"{uri}/sub")


@pytest.mark.parametrize(
    ("root", "name", "expected"),
    [
        pytest.param("s3://b/p", "a.png", "s3://b/p/a.png", id="plain"),
        pytest.param("s3://b/p/", "sub/./a.png", "s3://b/p/sub/a.png", id="normalized"),
        pytest.param("s3://b", "a/../c.png", "s3://b/c.png", id="bucket-root"),
        pytest.param("gs://b/p", "x/y.jpg", "gs://b/p/x/y.jpg", id="gcs"),
        pytest.param("s3://b/p", "../q/a.png", "leaves the image root", id="climbs-out"),
        pytest.param("s3://b/p", "/p/a.png", "is absolute", id="absolute"),
        pytest.param("s3://b/p", "C:/a.png", "is absolute", id="drive-letter"),
        pytest.param("s3://b/p", "s3://other/a.png", "is a URI", id="another-uri"),
    ],
)
def test_object_names_obey_the_local_rules(root: str, name: str, expected: str) -> None:
    if expected.startswith(("s3://", "gs://")):
        assert resolve_image_path(root, name) == expected
    else:
        with pytest.raises(DataError, match=expected):
            resolve_image_path(root, name)


@pytest.mark.parametrize(
    ("error", "kind", "expected"),
    [
        pytest.param(OSError("When reading information for key 'p/a.png' in bucket 'b': AWS Error ACCESS_DENIED "
                             "during HeadObject operation: Access Denied (Request ID: X1)"), UserError,
                     "s3://b/p/a.png: the storage service refused the credentials (ACCESS_DENIED); check AWS_ACCESS_KEY_ID",
                     id="s3-denied"),
        pytest.param(OSError("AWS Error NETWORK_CONNECTION during ListObjectsV2 operation: curlCode: 7"), UserError,
                     "s3://b/p/a.png: cannot reach the storage service (NETWORK_CONNECTION); check AWS_ENDPOINT_URL",
                     id="s3-unreachable"),
        pytest.param(FileNotFoundError("Path does not exist 'b/p/a.png'"), DataError,
                     "s3://b/p/a.png: no such object", id="s3-missing-object"),
        pytest.param(OSError("google::cloud::Status(PERMISSION_DENIED: Permission 'storage.objects.get' denied)"),
                     UserError, "s3://b/p/a.png: the storage service refused the credentials (PERMISSION_DENIED)",
                     id="gcs-denied"),
        pytest.param(OSError("something new (Request ID: X2) key sk-SECRET-VALUE"), UserError,
                     "s3://b/p/a.png: object storage error (something new key ***); check AWS_ACCESS_KEY_ID",
                     id="unknown-redacted"),
    ],
)  # fmt: skip
def test_store_errors_become_one_line_and_quote_no_secret(
    monkeypatch: pytest.MonkeyPatch, error: Exception, kind: type, expected: str
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sk-SECRET-VALUE")
    made = object_store.storage_error("s3://b/p/a.png", error)
    assert type(made) is kind and str(made).startswith(expected) and "\n" not in str(made)


def test_az_needs_an_account_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_NAME", raising=False)
    with pytest.raises(UserError, match=r"^az://images/unlabeled: set AZURE_STORAGE_ACCOUNT_NAME "):
        list_images("az://images/unlabeled")


def test_a_user_error_inside_rays_exceptions_comes_back_as_its_first_line() -> None:
    """How the Ray engine's driver finds a decode task's UserError: Ray raises it inside a RayTaskError (whose
    message is the task's traceback) and appends its retry notes to the UserError's message."""
    exceptions = pytest.importorskip("ray.exceptions", reason="the Ray engine is optional")
    inner = UserError("s3://b/p/a.png: refused; check X\nFailed to apply UDF transform after 1/1 attempts")
    wrapped = exceptions.RayTaskError(
        "submit", "Traceback (most recent call last):\n  ...", inner
    ).as_instanceof_cause()
    assert isinstance(wrapped, UserError) and len(str(wrapped).splitlines()) > 1
    found = root_user_error(wrapped)
    assert type(found) is UserError and str(found) == "s3://b/p/a.png: refused; check X"
    assert root_user_error(RuntimeError("no user error here")) is None


RUN_CONFIG = """
data:
  train: {labeled}/annotations.json
  train_images: s3://{bucket}/labeled
  unlabeled: s3://{bucket}/unlabeled/
  val: {labeled}/annotations.json
  val_images: s3://{bucket}/labeled
teacher: {{iterations: 2, batch_size: 4}}
student: {{iterations: 2, batch_size: 5}}
label: {{views: "identity,hflip", shard_size: 4, batch_size: 4}}
device: cpu
threads: 1
workers: 0
teacher_check: false
"""


def test_run_takes_its_image_roots_from_s3(
    s3: Server, data: Data, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run` passes the prefixes through to every stage (the report's galleries included); one that cannot be
    read stops it before the teacher trains, a COCO json in a bucket is refused."""
    config = tmp_path / "run.yaml"
    config.write_text(RUN_CONFIG.format(labeled=data.labeled, bucket=BUCKET))
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 0
    label = json.loads((tmp_path / "run" / "round-1" / "label" / "manifest.json").read_text())
    assert label["config"]["image_root"] == f"s3://{BUCKET}/unlabeled" and label["counts"]["images"] == 7
    student = (tmp_path / "run" / "round-1" / "student" / "config.yaml").read_text()
    assert f"pseudo_images: s3://{BUCKET}/unlabeled\n" in student and f"images: s3://{BUCKET}/labeled\n" in student
    assert (tmp_path / "run" / "report.html").is_file()
    assert s3.key_id not in _texts(tmp_path / "run") and s3.secret not in _texts(tmp_path / "run")
    capsys.readouterr()
    for setting, message in (
        ("data.train_images=s3://no-such-bucket/labeled", "data.train_images: s3://no-such-bucket/labeled: no such "
         "bucket; check the bucket name, and AWS_ENDPOINT_URL or AWS_DEFAULT_REGION"),
        (f"data.val_images=s3://{BUCKET}/nothing", f"data.val_images: s3://{BUCKET}/nothing: no objects under this "
         "prefix; check the prefix"),
        (f"data.train=s3://{BUCKET}/labeled.json", f"data.train: s3://{BUCKET}/labeled.json: a COCO json or list "
         "is read from a local path (images may live in object storage)"),
    ):  # fmt: skip
        out = tmp_path / "refused"
        assert main(["run", str(config), "--out", str(out), "--set", setting]) == 1
        assert capsys.readouterr().err == f"error: {message}\n"
        assert not (out / "teacher").exists()
