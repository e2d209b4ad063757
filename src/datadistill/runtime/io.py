"""Files that are written whole or not at all, the one rule for every command's output, and the provenance
every output folder records.

The output rule (:func:`check_output`, called by the CLI before a command starts its work): ``--out`` is
none of the command's inputs, nor does any file the command writes there resolve to one; what a command
writes is a regular file or nothing yet, never a FIFO, a device or a socket; a symbolic link to a folder is
followed (``--out runs/latest`` where ``latest`` links to a folder writes into that folder), and a file the
command would write that is itself a link is refused (:func:`check_writable`, which every atomic write also
calls), so that no write ever lands outside the folder the user named; the hidden temporary files that a
killed write left (``.NAME.*.tmp``) are removed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from datadistill.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)
PROVENANCE_PACKAGES = ("datadistill", "torch", "torchvision", "numpy", "pyarrow", "faster-coco-eval", "pillow")


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync it, then rename it into place.

    A reader never sees a partial file: either the old content or the new. Errors (full disk, no
    permission) become a one-line UserError and leave no temporary file behind.
    """
    with atomic_file(path) as f:
        write(f)


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """:func:`write_atomic` for a file written piece by piece: ``with atomic_file(p) as f: ...`` renames ``f``
    into place when the block ends without an error, and removes it when the block raises."""
    path = Path(path)
    check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; others on a shared cluster may need to read
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error_in(exc) if isinstance(exc, Exception) else None
        if cause is not None:
            raise UserError(f"cannot write {path}: {cause.strerror or cause}") from exc
        raise


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or one it was raised from or while handling. torch.save's zip
    writer answers a full disk with a RuntimeError ("unexpected pos") raised while handling the OSError."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, OSError):
            return current
        current, seen = current.__cause__ or current.__context__, seen + 1
    return None


def remove_temporaries(folder: str | os.PathLike[str], names: tuple[str, ...]) -> None:
    """Delete the temporary files of :func:`write_atomic` for ``names`` in ``folder`` (``.NAME.*.tmp``): a
    killed process leaves them behind; a resumed stage calls this before it writes those files again."""
    for name in names:
        for tmp in Path(folder).glob(f".{glob.escape(name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def remove_killed_temporaries(root: str | os.PathLike[str]) -> None:
    """Delete every ``.*.tmp`` below ``root``: the files of :func:`write_atomic` and the folders of a
    conversion (``.flat-labels/.NAME.PID.tmp/``) that a killed run left behind."""
    for tmp in sorted(Path(root).rglob(".*.tmp"), reverse=True):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def file_kind(mode: int) -> str:
    """What ``st_mode`` is, in words (``a FIFO``, ``a character device``, ``a folder``, ...)."""
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def check_writable(path: str | os.PathLike[str], *, folder: bool = False) -> None:
    """A one-line UserError when ``path`` exists and is not what a write may replace: a regular file
    (``folder``: a folder, or a link to one); never a symbolic link to a file, a FIFO, a device or a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc
    if folder and os.path.isdir(path):
        return
    if stat.S_ISLNK(st.st_mode):
        raise UserError(
            f"{path} is a symbolic link (to {os.readlink(path)}); datadistill does not write through links to "
            "files: remove the link, or name its target"
        )
    if not stat.S_ISREG(st.st_mode) or folder:
        raise UserError(f"{path} is {file_kind(st.st_mode)}, not {'a folder' if folder else 'a regular file'}")


def check_output(
    out: str | os.PathLike[str],
    *,
    inputs: Mapping[str, str | os.PathLike[str] | None],
    folder: bool,
    writes: Sequence[str] = (),
    flag: str = "--out",
    clean: bool = True,
) -> None:
    """The output rule (see the module docstring) for a command about to write ``out``: a folder
    (``folder``) that receives ``writes`` (names inside it; a name ending in ``/`` is a folder), or a file
    that ``writes`` go beside. ``inputs``: what the command reads, flag -> path (None: not given; an
    object-store URL, and a path that does not exist, such as a model's name, are skipped). A one-line
    UserError names the path and the input it collides with. ``clean``: remove the temporary files of
    killed writes of ``out`` and ``writes`` (not in a second process of the same command, which may have
    started writing)."""
    out = Path(out)
    base = out if folder else out.parent
    targets = [(out, folder)] + [(base / name.rstrip("/"), name.endswith("/")) for name in writes]
    for name, given in inputs.items():
        if given is None or "://" in str(given) or not os.path.lexists(given):
            continue
        for target, _ in targets:
            if _same_path(target, Path(given)):
                what = f"{flag} {out}" if target == out else f"{flag} {out}: {target.name}"
                raise UserError(f"{what} would overwrite the input {name} {given}; write to another {flag}")
    for target, is_folder in targets:
        check_writable(target, folder=is_folder)
    if clean:
        files = [t for t, is_folder in targets if not is_folder]
        for target in files:
            remove_temporaries(target.parent, (target.name,))


def _same_path(a: Path, b: Path) -> bool:
    """The same file or folder: equal resolved paths, or the same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = None) -> None:
    data = json.dumps(obj, indent=indent, allow_nan=False).encode("utf-8")
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    data = text.encode("utf-8")
    write_atomic(path, lambda f: f.write(data))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_revision() -> str | None:
    """The git revision of the datadistill source tree, if it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance() -> dict[str, Any]:
    """What every output folder records next to its results: versions, git revision, host."""
    return {"versions": package_versions(), "git_revision": git_revision(), "host": platform.node()}


def to_plain(value: Any) -> Any:
    """Tuples as lists, recursively (the form yaml and json give back)."""
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value
