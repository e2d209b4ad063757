"""The output rule of every command that writes: ``--out`` is none of its inputs (nor is a file it writes
there), never a FIFO, device or link to a file (a link to a folder is followed), and the temporary file that
a killed write left is removed by the next run that writes there. Each refusal is one line, comes before any
work (so these cases are fast: their inputs need only exist), and leaves every input as it was."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import KILLED, cli, dying_at_write, error_line, run_in_child

W, H = 64, 48


def _coco(path: Path, ids: tuple[int, ...]) -> Path:
    images = [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in ids]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [4, 4, 20, 20], "iscrowd": 0, "area": 400.0}
            for i in ids]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Inputs that exist (the commands refuse before they read them) and an output folder."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "model.pt").write_bytes(b"not read")
    (tmp_path / "config.yaml").write_text("not read: 1\n")
    return {"root": tmp_path, "ref": _coco(tmp_path / "ref.json", (1, 2)), "fix": _coco(tmp_path / "fix.json", (3,)),
            "images": tmp_path / "images", "labels": tmp_path / "labels", "model": tmp_path / "model.pt",
            "config": tmp_path / "config.yaml", "run": tmp_path / "run", "out": tmp_path / "out"}  # fmt: skip


Argv = Callable[[dict[str, Path], Path], tuple[Any, ...]]

# every command that writes: its command line with ``out`` as its output (a file or a folder)
FILE_OUTPUTS: dict[str, Argv] = {
    "merge": lambda f, out: ("merge", "--labeled", f["ref"], "--corrections", f["fix"], "--out", out),
    "evaluate": lambda f, out: ("evaluate", "--data", f["ref"], "--predictions", f["fix"], "--out", out),
    "select": lambda f, out: ("select", "--labels", f["labels"], "--reference", f["ref"], "--out", out),
    "convert-coco": lambda f, out: ("convert", f["labels"], out, "--to", "coco"),
}
FOLDER_OUTPUTS: dict[str, tuple[Argv, str]] = {  # and one file it writes there
    "train": (lambda f, out: ("train", "--data", f["ref"], "--images", f["images"], "--out", out), "config.yaml"),
    "label": (
        lambda f, out: ("label", "--model", f["model"], "--images", f["images"], "--out", out),
        "manifest.json",
    ),  # fmt: skip
    "review": (
        lambda f, out: ("review", "--labels", f["labels"], "--reference", f["ref"], "--top", "1", "--out", out),
        "coco.json",
    ),  # fmt: skip
    "convert-yolo": (lambda f, out: ("convert", f["ref"], out, "--to", "yolo", "--images", f["images"]), "data.yaml"),
    "synth": (lambda f, out: ("synth", "shapes", "--out", out, "--images", "2"), "annotations.json"),
    "report": (lambda f, out: ("report", out), "report.html"),
    "run": (lambda f, out: ("run", f["config"], "--out", out), "results.json"),
    "demo": (lambda f, out: ("demo", "--quick", "--out", out), "results.json"),
}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}  # fmt: skip


def _refused(files: dict[str, Path], argv: tuple[Any, ...], *fragments: str) -> str:
    """Run ``argv``: one error line holding ``fragments``, and no file of the test folder changed or added."""
    before = _hashes(files["root"])
    line = error_line(cli(*argv), *fragments)
    assert _hashes(files["root"]) == before
    return line


# ---------------------------------------------------------------------------------------------------------
# --out is one of the inputs


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        pytest.param(lambda f: FILE_OUTPUTS["merge"](f, f["ref"]), "--labeled", id="merge-out-is-labeled"),
        pytest.param(lambda f: FILE_OUTPUTS["merge"](f, f["fix"]), "--corrections", id="merge-out-is-corrections"),
        pytest.param(lambda f: FILE_OUTPUTS["evaluate"](f, f["ref"]), "--data", id="evaluate-out-is-data"),
        pytest.param(
            lambda f: FILE_OUTPUTS["evaluate"](f, f["fix"]), "--predictions", id="evaluate-out-is-predictions"
        ),
        pytest.param(lambda f: FILE_OUTPUTS["select"](f, f["ref"]), "--reference", id="select-out-is-reference"),
        pytest.param(
            lambda f: FILE_OUTPUTS["select"](f, f["root"] / "x" / ".." / "ref.json"),
            "--reference",
            id="select-out-is-reference-by-another-path",
        ),  # fmt: skip
        pytest.param(
            lambda f: FILE_OUTPUTS["select"](
                {**f, "ref": _coco(f["root"] / "selection.json", (1,))}, f["root"] / "pseudo.json"
            ),
            "--reference",
            id="select-writes-its-reference-beside-out",
        ),  # fmt: skip
        pytest.param(lambda f: FILE_OUTPUTS["convert-coco"](f, f["labels"]), "SRC", id="convert-dst-is-src"),
        pytest.param(lambda f: FOLDER_OUTPUTS["train"][0](f, f["images"]), "--images", id="train-out-is-images"),
        pytest.param(lambda f: FOLDER_OUTPUTS["label"][0](f, f["images"]), "--images", id="label-out-is-images"),
        pytest.param(lambda f: FOLDER_OUTPUTS["review"][0](f, f["labels"]), "--labels", id="review-out-is-labels"),
        pytest.param(
            lambda f: FOLDER_OUTPUTS["review"][0](
                {**f, "ref": _coco(f["root"] / "set" / "coco.json", (1,))}, f["root"] / "set"
            ),
            "--reference",
            id="review-out-holds-reference-as-coco-json",
        ),  # fmt: skip
        pytest.param(
            lambda f: (
                "train",
                "--data",
                f["ref"],
                "--images",
                f["images"],
                "--init",
                _coco(f["out"] / "checkpoint.pt", (1,)),
                "--out",
                f["out"],
            ),
            "--init",
            id="train-init-is-its-own-checkpoint",
        ),  # fmt: skip
        pytest.param(
            lambda f: ("run", _coco(f["out"] / "config.yaml", (1,)), "--out", f["out"]),
            "CONFIG.yaml",
            id="run-config-in-its-out",
        ),  # fmt: skip
        pytest.param(
            lambda f: (
                "run",
                "--labeled",
                f["ref"],
                "--images",
                f["images"],
                "--unlabeled",
                f["images"],
                "--out",
                f["images"],
            ),
            "--images",
            id="run-without-config-out-is-images",
        ),  # fmt: skip
    ],
)
def test_out_that_is_an_input_is_refused(files: dict[str, Path], argv: Callable, flag: str) -> None:
    args = argv(files)
    line = _refused(files, args, "would overwrite the input", flag)
    assert len(line) < 600


def test_out_that_is_a_hard_link_to_an_input_is_refused(files: dict[str, Path]) -> None:
    os.link(files["ref"], files["root"] / "same.json")
    _refused(files, FILE_OUTPUTS["merge"](files, files["root"] / "same.json"), "would overwrite the input --labeled")


# ---------------------------------------------------------------------------------------------------------
# what is at --out


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("command", sorted(FILE_OUTPUTS))
def test_a_fifo_at_a_file_out_is_refused(files: dict[str, Path], command: str) -> None:
    fifo = _fifo(files["root"] / "out.json")
    _refused(files, FILE_OUTPUTS[command](files, fifo), str(fifo), "is a FIFO, not a regular file")


@pytest.mark.parametrize("command", sorted(FOLDER_OUTPUTS))
def test_a_fifo_where_a_folder_command_writes_is_refused(files: dict[str, Path], command: str) -> None:
    argv, name = FOLDER_OUTPUTS[command]
    fifo = _fifo(files["out"] / name)
    _refused(files, argv(files, files["out"]), str(fifo), "is a FIFO, not a regular file")


@pytest.mark.parametrize("command", sorted(FILE_OUTPUTS))
def test_a_device_as_out_is_refused(files: dict[str, Path], command: str) -> None:
    _refused(files, FILE_OUTPUTS[command](files, Path("/dev/null")), "/dev/null is a character device")
    assert Path("/dev/null").is_char_device()


@pytest.mark.parametrize("command", sorted(FILE_OUTPUTS))
def test_a_symlink_as_a_file_out_is_refused_and_its_target_kept(files: dict[str, Path], command: str) -> None:
    target = files["root"] / "precious.json"
    target.write_text("{}")
    link = files["root"] / "link.json"
    link.symlink_to(target)
    _refused(files, FILE_OUTPUTS[command](files, link), str(link), "is a symbolic link", "precious.json")
    assert link.is_symlink() and target.read_text() == "{}"


@pytest.mark.parametrize("command", sorted(FOLDER_OUTPUTS))
def test_a_symlink_where_a_folder_command_writes_is_refused(files: dict[str, Path], command: str) -> None:
    argv, name = FOLDER_OUTPUTS[command]
    files["out"].mkdir()
    (files["root"] / "precious").write_text("keep")
    (files["out"] / name).symlink_to(files["root"] / "precious")
    _refused(files, argv(files, files["out"]), str(files["out"] / name), "is a symbolic link")
    assert (files["root"] / "precious").read_text() == "keep"


@pytest.mark.parametrize("command", sorted(FOLDER_OUTPUTS))
def test_a_file_where_a_folder_out_should_be_is_refused(files: dict[str, Path], command: str) -> None:
    files["out"].write_text("a file")
    _refused(files, FOLDER_OUTPUTS[command][0](files, files["out"]), "is a regular file, not a folder")


def test_a_symlink_to_a_folder_as_out_is_followed(files: dict[str, Path]) -> None:
    """The documented other half of the rule: a link to a folder is written through (the files go inside it)."""
    real = files["root"] / "real"
    real.mkdir()
    (files["root"] / "latest").symlink_to(real)
    result = cli(*FILE_OUTPUTS["merge"](files, files["root"] / "latest" / "merged.json"))
    assert result.rc == 0, result
    merged = json.loads((real / "merged.json").read_text())
    assert sorted(im["id"] for im in merged["images"]) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------
# a killed write's temporary file


@pytest.mark.parametrize("command", ["merge", "evaluate"])
def test_the_temporary_file_of_a_killed_write_is_removed_by_the_next_run(files: dict[str, Path], command: str) -> None:
    out = files["root"] / "result" / "out.json"
    if command == "evaluate":  # a results list of the reference's own boxes: AP 1
        results = [{"image_id": i, "category_id": 1, "bbox": [4, 4, 20, 20], "score": 0.9} for i in (1, 2)]
        files["fix"].write_text(json.dumps(results))
    argv = FILE_OUTPUTS[command](files, out)

    def killed() -> int:
        with dying_at_write(1, "mid-write"):
            return cli(*argv).rc

    assert run_in_child(killed) == KILLED
    left = list(out.parent.glob(".out.json.*.tmp"))
    assert len(left) == 1 and not out.exists()  # the kill left half a temporary file
    before = _hashes(files["root"])
    assert cli(*argv).rc == 0
    assert not list(out.parent.glob("*.tmp")) and out.exists()
    inputs = {k: v for k, v in before.items() if not k.startswith("result")}
    assert {k: v for k, v in _hashes(files["root"]).items() if not k.startswith("result")} == inputs
    if command == "evaluate":
        assert json.loads(out.read_text())["bbox"]["AP"] == pytest.approx(1.0)
    else:
        assert len(json.loads(out.read_text())["images"]) == 3


def test_temporaries_of_other_files_are_left_alone(files: dict[str, Path]) -> None:
    """Only the temporaries of what the command writes go: another program's hidden file stays."""
    out = files["root"] / "result"
    out.mkdir()
    mine, theirs = out / ".merged.json.abc123.tmp", out / ".notes.txt.abc123.tmp"
    mine.write_bytes(b"half")
    theirs.write_bytes(b"someone else's")
    assert cli(*FILE_OUTPUTS["merge"](files, out / "merged.json")).rc == 0
    assert not mine.exists() and theirs.read_bytes() == b"someone else's"


# ---------------------------------------------------------------------------------------------------------
# the error line itself


def test_a_huge_value_gives_a_short_error_line_keeping_its_start_and_end(files: dict[str, Path]) -> None:
    """A 5 MB path (the issue's 50 MB, smaller to stay fast) in an error gives one line of about 1,000
    characters that still names the start of the path and the problem at the end."""
    huge = str(files["root"] / ("x" * 5_000_000)) + "\n\x1b[31mend.json"
    line = error_line(cli("merge", "--labeled", huge, "--corrections", files["fix"], "--out", files["out"]))
    assert len(line) < 1100, len(line)
    assert line.startswith(f"error: {files['root']}/xxx")
    assert "characters cut" in line and line.endswith("end.json: File name too long")
    assert "\x1b" not in line and "\\x1b" in line  # escapes shown, never sent to the terminal


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("short", "short", id="short-kept"),
        pytest.param("a\nb\x00c\x1bd", "a\\nb\\x00c\\x1bd", id="control-escaped"),
        pytest.param(
            "s" * 700 + "m" * 5000 + "e" * 333,
            "s" * 666 + " [... 5034 characters cut ...] " + "e" * 333,
            id="long-cut-keeping-start-and-end",
        ),  # fmt: skip
    ],
)
def test_bounded_line(text: str, expected: str) -> None:
    from datadistill.errors import bounded_line

    assert bounded_line(text) == expected


def test_a_killed_runs_temporary_files_and_folders_are_removed(tmp_path: Path) -> None:
    """``run`` resumes over what a kill left: write_atomic's ``.NAME.*.tmp`` files and the label table's
    conversion folder ``.flat-labels/.NAME.PID.tmp/`` (a folder: unlinking it failed the resumed run)."""
    from datadistill.runtime.io import remove_killed_temporaries

    folder = tmp_path / "run" / "round-1" / "student" / ".flat-labels" / ".0d76-v1.27260.tmp"
    folder.mkdir(parents=True)
    (folder / "boxes.bin").write_bytes(b"x" * 10)
    (tmp_path / "run" / ".report.html.abc.tmp").write_text("partial")
    kept = [tmp_path / "run" / "report.html", tmp_path / "run" / ".hidden", tmp_path / "run" / "round-1" / "x.tmp"]
    for path in kept:
        path.write_text("keep")
    remove_killed_temporaries(tmp_path / "run")
    assert not folder.exists() and not (tmp_path / "run" / ".report.html.abc.tmp").exists()
    assert all(p.read_text() == "keep" for p in kept)
