"""Objects in S3, Google Cloud Storage and Azure Blob Storage, through pyarrow's own file systems.

A location is a URI: ``s3://bucket/key``, ``gs://bucket/key`` (or ``gcs://``), ``az://container/key`` (the
account from ``AZURE_STORAGE_ACCOUNT_NAME``), ``abfs://container@account.dfs.core.windows.net/key`` (or
``abfss://``). Credentials come from the environment or the provider's default chain, never from the URI:
S3 reads ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE``, ``AWS_SESSION_TOKEN``, an
instance role), ``AWS_ENDPOINT_URL`` for an S3-compatible server (MinIO, Ceph, R2) and ``AWS_DEFAULT_REGION``;
GCS the application-default credentials (``GOOGLE_APPLICATION_CREDENTIALS``); Azure an account key in
``AZURE_STORAGE_ACCOUNT_KEY``, else the Azure default chain (``AZURE_CLIENT_ID``, ``AZURE_TENANT_ID``,
``AZURE_CLIENT_SECRET``, a managed identity). A URI that carries a password or a query string (where
pyarrow would read keys) is refused, so that what a manifest or a log records is only the URI.

Every failure is a one-line error that names the URI and says what to check, and never quotes a credential:
refused credentials, a missing bucket or an unreachable service are a :class:`UserError` (the run stops);
a missing object is a :class:`DataError` (one image). The file systems are made once per process and
bucket and settings of the environment (DataLoader workers and Ray tasks make their own).
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections.abc import Collection
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from datadistill.errors import DataError, UserError

log = logging.getLogger(__name__)

SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")
MAX_OBJECT_BYTES = 1 << 30  # an image object larger than this is refused, not read into memory
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Environment variables whose values never appear in a message (a provider's error text could quote one).
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                        "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_CLIENT_SECRET",
                        "AZURE_STORAGE_CONNECTION_STRING")  # fmt: skip
_CHECK = {
    "s3": {
        "credentials": "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, AWS_SESSION_TOKEN) and "
        "that they may read the bucket",
        "bucket": "check the bucket name, and AWS_ENDPOINT_URL or AWS_DEFAULT_REGION",
        "network": "check AWS_ENDPOINT_URL and the network",
        "variables": "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_ENDPOINT_URL, "
        "AWS_DEFAULT_REGION",
    },
    "gs": {
        "credentials": "check GOOGLE_APPLICATION_CREDENTIALS (or `gcloud auth application-default login`) and that "
        "the account may read the bucket",
        "bucket": "check the bucket name",
        "network": "check the network",
        "variables": "GOOGLE_APPLICATION_CREDENTIALS",
    },
    "az": {
        "credentials": "check AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or AZURE_CLIENT_ID, "
        "AZURE_TENANT_ID, AZURE_CLIENT_SECRET) and that they may read the container",
        "bucket": "check the container and account names",
        "network": "check the account name and the network",
        "variables": "AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY, AZURE_CLIENT_ID, AZURE_TENANT_ID, "
        "AZURE_CLIENT_SECRET",
    },
}
# Error codes in pyarrow's messages (S3: "AWS Error CODE during ..."; GCS: google::cloud status codes;
# Azure: the storage service's error codes), by what the user has to check.
_CODES = {
    "credentials": ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN",
                    "INVALID_CLIENT_TOKEN_ID", "MISSING_AUTHENTICATION_TOKEN", "UNRECOGNIZED_CLIENT", "INVALID_TOKEN",
                    "PERMISSION_DENIED", "UNAUTHENTICATED", "AuthenticationFailed", "AuthorizationFailure",
                    "AuthorizationPermissionMismatch", "InvalidAuthenticationInfo", "NoAuthenticationInformation"),
    "bucket": ("NO_SUCH_BUCKET", "ContainerNotFound", "AccountNotFound", "FilesystemNotFound", "' not found"),
    "network": ("NETWORK_CONNECTION", "UNAVAILABLE", "DEADLINE_EXCEEDED", "Could not connect", "Couldn't resolve"),
    "object": ("NO_SUCH_KEY", "RESOURCE_NOT_FOUND", "BlobNotFound", "PathNotFound"),
}  # fmt: skip
_WHAT = {"credentials": "the storage service refused the credentials", "bucket": "no such bucket",
         "network": "cannot reach the storage service", "object": "no such object"}  # fmt: skip
_FILESYSTEMS: dict[tuple[int, str, str, int], tuple[pafs.FileSystem, str]] = {}


def is_uri(location: object) -> bool:
    """Whether ``location`` is a URI (``scheme://...``), not a local path."""
    return isinstance(location, str) and _URI.match(location) is not None


def _shown(uri: str) -> str:
    """``uri`` fit for a message: credentials in it (``KEY:SECRET@``) replaced by ``***``, options dropped."""
    parts = urlsplit(uri.split("?")[0].split("#")[0])
    if "@" not in parts.netloc or (_family(parts.scheme.lower()) == "az" and parts.password is None):
        return parts.geturl()  # an Azure container@account is no credential
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def check_uri(uri: str) -> str:
    """``uri`` without a trailing ``/``; a one-line UserError for a scheme we do not read, a URI that carries a
    password or a query string (credentials belong in the environment), or one without a bucket."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise UserError(f"{_shown(uri)}: unsupported storage scheme {scheme!r}: datadistill reads {', '.join(SCHEMES)} "
                        "URIs or local paths")  # fmt: skip
    in_uri = parts.password is not None or (parts.username is not None and _family(scheme) != "az")
    if in_uri or parts.query or parts.fragment:
        raise UserError(
            f"{_shown(uri)}: give the bucket and key only; credentials and options come from the environment "
            f"({_CHECK[_family(scheme)]['variables']})"
        )
    if not parts.netloc:
        raise UserError(f"{uri}: no bucket in the URI (expected {scheme}://BUCKET/PREFIX)")
    return uri.rstrip("/") if parts.path.strip("/") else f"{scheme}://{parts.netloc}"


def _family(scheme: str) -> str:
    return {"s3": "s3", "gs": "gs", "gcs": "gs"}.get(scheme, "az")


def join_uri(root: str, name: str) -> str:
    """The URI of the object ``name`` (a normalized relative POSIX path) under the prefix ``root``."""
    return f"{root.rstrip('/')}/{name}"


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's file system for ``uri``'s bucket, made once per process, and ``uri``'s path in it."""
    parts = urlsplit(check_uri(uri))
    scheme = parts.scheme.lower()
    # the credentials in the environment are part of the key (a hash: the key holds no secret)
    settings = hash(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "AZURE_", "GOOGLE_")))))
    key = (os.getpid(), scheme, parts.netloc, settings)
    if key not in _FILESYSTEMS:
        try:
            if scheme == "az" or (scheme in ("abfs", "abfss") and "@" not in parts.netloc):
                account = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
                if not account:
                    raise UserError(f"{uri}: set AZURE_STORAGE_ACCOUNT_NAME (the storage account of the container)")
                fs: pafs.FileSystem = pafs.AzureFileSystem(
                    account_name=account, account_key=os.environ.get("AZURE_STORAGE_ACCOUNT_KEY") or None
                )
                base = parts.netloc
            else:  # S3 resolves the bucket's region here (unless AWS_ENDPOINT_URL names a server)
                fs, base = pafs.FileSystem.from_uri(f"{scheme}://{parts.netloc}")
        except UserError:
            raise
        except Exception as exc:  # pyarrow: OSError, ArrowInvalid, with the provider's text
            raise storage_error(uri, exc) from None
        _FILESYSTEMS[key] = (fs, base.rstrip("/"))
    fs, base = _FILESYSTEMS[key]
    return fs, posixpath.join(base, parts.path.strip("/")) if parts.path.strip("/") else base


def storage_error(uri: str, exc: BaseException) -> UserError:
    """``exc`` (raised by pyarrow on ``uri``) as one line that names ``uri`` and what to check: a DataError
    for a missing object, else a UserError. The provider's text is reduced to its error code."""
    text = str(exc)
    found = [(kind, code) for kind, codes in _CODES.items() for code in codes if code in text]
    if isinstance(exc, FileNotFoundError) and not found:
        found = [("object", "")]
    family = _family(urlsplit(uri).scheme.lower())
    if not found:
        detail = " ".join(re.sub(r"\(Request ID: [^)]*\)", "", _redacted(text)).split())[:160]
        return UserError(f"{uri}: object storage error ({detail or type(exc).__name__}); "
                         f"{_CHECK[family]['credentials']}")  # fmt: skip
    kind, code = found[0]
    shown = f" ({code.strip()})" if code and " " not in code else ""
    if kind == "object":
        return DataError(f"{uri}: {_WHAT[kind]}{shown}")
    return UserError(f"{uri}: {_WHAT[kind]}{shown}; {_CHECK[family][kind]}")


def _redacted(text: str) -> str:
    for name in CREDENTIAL_VARIABLES:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def list_objects(prefix: str, *, suffixes: Collection[str]) -> list[str]:
    """The objects under ``prefix`` (recursive) whose names end with one of ``suffixes`` (lower case), as
    sorted POSIX paths relative to it. Keys that are not plain relative paths under the prefix (``..``,
    ``.`` or an empty component: ``a//b``) cannot be named safely and are left out, with a warning."""
    prefix = check_uri(prefix)
    fs, path = _filesystem(prefix)
    try:  # not allow_not_found: it would take a missing bucket for an empty prefix
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        return []
    except Exception as exc:
        raise storage_error(prefix, exc) from None
    found, unsafe = [], 0
    for info in infos:
        if info.type != pafs.FileType.File or posixpath.splitext(info.path)[1].lower() not in suffixes:
            continue
        name = info.path[len(path) + 1 :] if info.path.startswith(path + "/") else None
        if name is None or name != posixpath.normpath(name) or name.startswith(("../", "/")) or name == "..":
            unsafe += 1
            continue
        found.append(name)
    if unsafe:
        log.warning("%s: left out %d object(s) whose keys hold '..', '.' or '//' (not plain paths)", prefix, unsafe)
    return sorted(found)


def read_object(uri: str) -> bytes:
    """The bytes of the object at ``uri``; a DataError for a missing or oversized object, a UserError when
    the store cannot be read (credentials, bucket, network)."""
    fs, path = _filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            size = f.size()
            if size > MAX_OBJECT_BYTES:
                raise DataError(f"{uri}: {size} bytes, more than an image may have ({MAX_OBJECT_BYTES} bytes)")
            return f.read()
    except UserError:
        raise
    except Exception as exc:
        raise storage_error(uri, exc) from None


def object_exists(uri: str) -> bool:
    """Whether ``uri`` names an object (not a prefix); a UserError when the store cannot be read."""
    fs, path = _filesystem(uri)
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except Exception as exc:
        raise storage_error(uri, exc) from None


def check_prefix(uri: str) -> None:
    """A one-line UserError unless some object lives under the prefix ``uri`` (one request: credentials,
    bucket and prefix checked before hours of work)."""
    fs, path = _filesystem(uri)
    try:
        found = fs.get_file_info(path).type != pafs.FileType.NotFound
        bucket = found or fs.get_file_info(path.split("/", 1)[0]).type != pafs.FileType.NotFound
    except Exception as exc:
        raise storage_error(uri, exc) from None
    if not bucket:
        raise UserError(f"{uri}: {_WHAT['bucket']}; {_CHECK[_family(urlsplit(uri).scheme.lower())]['bucket']}")
    if not found:
        raise UserError(f"{uri}: no objects under this prefix; check the prefix")
