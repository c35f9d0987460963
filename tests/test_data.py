"""scaling.data on real bytes: real MNIST (fixture mnist_cache), real files corrupted on disk,
a real HTTP mirror on localhost. Nothing here is mocked except one writer function made to fail."""
from __future__ import annotations

import gzip
import http.server
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from scaling import data, download, sharding
from scaling.data import DataError

FASHION_DEBIAN = Path(download.LOCAL_DIR_DEFAULT["fashion_mnist"])


@pytest.fixture(autouse=True)
def _no_ambient_sources(monkeypatch):
    """Tests decide the sources themselves: no SCALING_OFFLINE / local-folder env from outside."""
    for var in ("SCALING_OFFLINE", "SCALING_MNIST_DIR", "SCALING_FASHION_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def mnist_idx_dir(mnist_cache, tmp_path_factory) -> Path:
    """The canonical MNIST IDX files rebuilt from the real cache (images raw, labels gzipped)."""
    folder = tmp_path_factory.mktemp("mnist_idx")
    dataset = data.load("mnist", mnist_cache, fetch_missing=False, log=lambda _: None)
    for key, (idx_name, _) in data.ARRAYS.items():
        payload = download.idx_bytes(getattr(dataset, key))
        if key.endswith("_y"):
            (folder / f"{idx_name}.gz").write_bytes(gzip.compress(payload, compresslevel=1))
        else:
            (folder / idx_name).write_bytes(payload)
    return folder


@pytest.fixture
def mnist_copy(mnist_cache, tmp_path) -> Path:
    """A private copy of the real MNIST cache, free to damage; returns its cache root."""
    root = tmp_path / "cache"
    shutil.copytree(mnist_cache / "mnist", root / "mnist")
    return root


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# --------------------------------------------------------------------------- real MNIST


def test_load_real_mnist(mnist_cache):
    data.load("mnist", mnist_cache, fetch_missing=False)  # warm the page cache
    t0 = time.perf_counter()
    ds = data.load("mnist", mnist_cache, fetch_missing=False)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.train_x.shape == (60000, 28, 28) and ds.train_y.shape == (60000,)
    assert ds.test_x.shape == (10000, 28, 28) and ds.test_y.shape == (10000,)
    assert ds.train_x.dtype == np.uint8 and ds.test_y.dtype == np.uint8
    assert set(np.unique(ds.train_y)) == set(range(10)) == set(np.unique(ds.test_y))
    assert ds.test_y[0] == 7 and ds.train_y[0] == 5
    assert ds.train_x.max() == 255
    assert str(mnist_cache / "mnist") in ds.source


def test_verify_real_mnist_and_manifest(mnist_cache):
    data.verify("mnist", mnist_cache)
    manifest = json.loads((mnist_cache / "mnist" / "manifest.json").read_text())
    assert manifest["format_version"] == data.CACHE_FORMAT_VERSION
    assert manifest["dataset"] == "mnist" and manifest["source"] and manifest["created"]
    assert set(manifest["files"]) == {"train_x.npy", "train_y.npy", "test_x.npy", "test_y.npy"}
    assert manifest["files"]["train_x.npy"]["shape"] == [60000, 28, 28]


def test_fetch_is_idempotent_on_a_valid_cache(mnist_copy):
    before = (mnist_copy / "mnist" / "manifest.json").stat().st_mtime_ns
    lines = []
    assert data.fetch("mnist", mnist_copy, offline=True, log=lines.append) == mnist_copy / "mnist"
    assert (mnist_copy / "mnist" / "manifest.json").stat().st_mtime_ns == before
    assert any("cached at" in line for line in lines)


# --------------------------------------------------------------------------- source checksums


def test_flipped_byte_in_source_idx_is_detected(mnist_idx_dir, tmp_path):
    expected = download.IDX_MD5["mnist"]["t10k-images-idx3-ubyte"]
    good = mnist_idx_dir / "t10k-images-idx3-ubyte"
    assert download._verify_source_file(good, expected)[:4] == b"\x00\x00\x08\x03"
    bad = tmp_path / good.name
    shutil.copy(good, bad)
    _flip_byte(bad, 16 + 28 * 14 + 14)
    with pytest.raises(DataError) as err:
        download._verify_source_file(bad, expected)
    message = str(err.value)
    assert str(bad) in message and expected in message and "Fix:" in message
    assert download._md5(bad.read_bytes()) in message


def test_flipped_byte_in_gzipped_source_is_detected(mnist_idx_dir, tmp_path):
    expected = download.IDX_MD5["mnist"]["t10k-labels-idx1-ubyte"]
    good = mnist_idx_dir / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(download._verify_source_file(good, expected))
    raw[8] = (raw[8] + 1) % 10  # the first label: 7 -> 8
    bad = tmp_path / good.name
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="md5 mismatch"):
        download._verify_source_file(bad, expected)


def test_csv_conversion_matches_idx(mnist_cache):
    """The wheel's CSV layout (header, label + 784 pixels, CRLF) converts to the same IDX bytes."""
    ds = data.load("mnist", mnist_cache, fetch_missing=False)
    x, y = ds.test_x[:50], ds.test_y[:50]
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    rows = [",".join(map(str, [int(y[i]), *x[i].ravel().tolist()])) for i in range(len(y))]
    csv = ("\r\n".join([header, *rows]) + "\r\n").encode()
    images, labels = download._idx_from_csv(csv, "test.csv")
    assert images == download.idx_bytes(x) and labels == download.idx_bytes(y)
    bad = csv.replace(b"\r\n7,", b"\r\n7,300,", 1)
    with pytest.raises(DataError, match="test.csv"):
        download._idx_from_csv(bad, "test.csv")


# --------------------------------------------------------------------------- the cache


def test_truncated_cache_file_names_the_file(mnist_copy):
    path = mnist_copy / "mnist" / "test_x.npy"
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    with pytest.raises(DataError) as err:
        data.load("mnist", mnist_copy, fetch_missing=False)
    assert str(path) in str(err.value) and "scaling data fetch mnist --force" in str(err.value)


def test_tampered_cache_file_fails_verify_and_force_rebuilds(mnist_copy, mnist_idx_dir, monkeypatch):
    path = mnist_copy / "mnist" / "train_x.npy"
    _flip_byte(path, path.stat().st_size - 5000)
    with pytest.raises(DataError, match=r"sha256 mismatch.*Fix: run `scaling data fetch mnist --force`"):
        data.load("mnist", mnist_copy, fetch_missing=False)  # a run never trains on a changed cache
    with pytest.raises(DataError) as err:
        data.verify("mnist", mnist_copy)
    assert str(path) in str(err.value) and "sha256 mismatch" in str(err.value)

    monkeypatch.setenv("SCALING_MNIST_DIR", str(mnist_idx_dir))
    assert data_cli(["fetch", "mnist", "--cache-dir", str(mnist_copy), "--offline", "--force"]) == 0
    data.verify("mnist", mnist_copy)
    assert not list(mnist_copy.glob(".mnist.tmp-*"))


def test_tampered_cache_caught_even_with_a_matching_manifest(mnist_copy):
    """verify also checks the arrays against the canonical md5s, not only against the manifest."""
    folder = mnist_copy / "mnist"
    path = folder / "test_y.npy"
    _flip_byte(path, path.stat().st_size - 1)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["test_y.npy"]["sha256"] = data._sha256_file(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="test_y.npy.*md5 mismatch"):
        data.verify("mnist", mnist_copy)


def test_missing_cache_without_fetch_raises(tmp_path):
    with pytest.raises(DataError) as err:
        data.load("mnist", tmp_path, fetch_missing=False)
    assert "manifest.json" in str(err.value) and "scaling data fetch mnist" in str(err.value)


def test_fetch_from_local_folder_offline(mnist_idx_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_MNIST_DIR", str(mnist_idx_dir))
    monkeypatch.setenv("SCALING_OFFLINE", "1")
    lines = []
    folder = data.fetch("mnist", tmp_path, log=lines.append)
    assert folder == tmp_path / "mnist"
    data.verify("mnist", tmp_path)
    assert data.load("mnist", tmp_path, fetch_missing=False).test_y[0] == 7
    assert any("md5 verified" in line for line in lines) and any("cached at" in line for line in lines)


def test_unwritable_cache_dir(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    cache_dir = tmp_path / "afile" / "sub"
    with pytest.raises(DataError) as err:
        data.fetch("mnist", cache_dir, offline=True)
    assert str(cache_dir) in str(err.value) and "SCALING_CACHE" in str(err.value)
    with pytest.raises(DataError, match="SCALING_CACHE"):
        data.load("mnist", cache_dir)


def test_interrupted_write_leaves_no_cache(mnist_idx_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_MNIST_DIR", str(mnist_idx_dir))
    real_save, calls = data._save_array, []

    def save_then_crash(path, array):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user hit Ctrl-C mid-write
        real_save(path, array)

    monkeypatch.setattr(data, "_save_array", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        data.fetch("mnist", tmp_path, offline=True, log=lambda _: None)
    assert len(calls) == 3
    assert not (tmp_path / "mnist").exists()
    assert not list(tmp_path.glob(".mnist.tmp-*"))


def test_stale_temp_folder_is_cleaned(mnist_idx_dir, tmp_path, monkeypatch):
    """A killed fetch leaves a temp folder; the next fetch removes it and builds a good cache."""
    monkeypatch.setenv("SCALING_MNIST_DIR", str(mnist_idx_dir))
    stale = tmp_path / ".mnist.tmp-otherhost-123-abc"
    stale.mkdir()
    (stale / "train_x.npy").write_bytes(b"half written")
    data.fetch("mnist", tmp_path, offline=True, log=lambda _: None)
    assert not stale.exists()
    data.verify("mnist", tmp_path)


# --------------------------------------------------------------------------- no source


def test_fashion_offline_without_debian_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_FASHION_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError) as err:
        data.fetch("fashion_mnist", tmp_path / "cache", offline=True)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "missing") in message and "offline" in message
    assert not (tmp_path / "cache" / "fashion_mnist").exists()


def test_mnist_offline_without_source(tmp_path):
    with pytest.raises(DataError) as err:
        data.fetch("mnist", tmp_path, offline=True)
    message = str(err.value)
    assert "SCALING_MNIST_DIR" in message and "skipped (offline)" in message and "Fix:" in message


def test_corrupt_local_source_is_refused(mnist_idx_dir, tmp_path, monkeypatch):
    local = tmp_path / "idx"
    shutil.copytree(mnist_idx_dir, local)
    _flip_byte(local / "train-images-idx3-ubyte", 1000)
    monkeypatch.setenv("SCALING_MNIST_DIR", str(local))
    with pytest.raises(DataError) as err:
        data.fetch("mnist", tmp_path / "cache", offline=True, log=lambda _: None)
    assert str(local / "train-images-idx3-ubyte") in str(err.value)
    assert download.IDX_MD5["mnist"]["train-images-idx3-ubyte"] in str(err.value)
    assert not (tmp_path / "cache" / "mnist").exists()


# --------------------------------------------------------------------------- mirrors (a real local HTTP server)


@pytest.fixture
def http_mirror(mnist_idx_dir, tmp_path):
    """Serve gzipped IDX files over HTTP on localhost: /good/ is canonical, /bad/ has a flipped byte."""
    for sub in ("good", "bad"):
        (tmp_path / "www" / sub).mkdir(parents=True)
    for idx_name in download.IDX_MD5["mnist"]:
        raw = download._read_source_file(next(mnist_idx_dir.glob(f"{idx_name}*")))
        (tmp_path / "www" / "good" / f"{idx_name}.gz").write_bytes(gzip.compress(raw, compresslevel=1))
        flipped = bytearray(raw)
        flipped[-1] ^= 0xFF
        (tmp_path / "www" / "bad" / f"{idx_name}.gz").write_bytes(gzip.compress(bytes(flipped), compresslevel=1))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "www"), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_from_mirror_skips_bad_ones(http_mirror, tmp_path, monkeypatch):
    monkeypatch.setitem(download.MIRRORS, "mnist", (f"{http_mirror}/absent/", f"{http_mirror}/bad/", f"{http_mirror}/good/"))
    lines = []
    data.fetch("mnist", tmp_path / "cache", offline=False, log=lines.append)
    data.verify("mnist", tmp_path / "cache")
    manifest = json.loads((tmp_path / "cache" / "mnist" / "manifest.json").read_text())
    assert manifest["source"] == f"{http_mirror}/good/"
    unavailable = [line for line in lines if "mirror unavailable" in line]
    assert len(unavailable) == 2 and "404" in unavailable[0] and "md5 mismatch" in unavailable[1]


# --------------------------------------------------------------------------- Fashion-MNIST (Debian)


@pytest.mark.skipif(not FASHION_DEBIAN.is_dir(), reason="needs `apt-get install dataset-fashion-mnist`")
def test_fashion_mnist_from_debian(tmp_path):
    data.fetch("fashion_mnist", tmp_path, offline=True, log=lambda _: None)
    data.verify("fashion_mnist", tmp_path)
    ds = data.load("fashion_mnist", tmp_path, fetch_missing=False)
    assert ds.train_x.shape == (60000, 28, 28) and ds.test_x.shape == (10000, 28, 28)
    assert ds.test_y[0] == 9 and ds.train_y[0] == 9  # ankle boots
    assert str(FASHION_DEBIAN) in ds.source


def test_the_data_yamls_target_opens_each_dataset_as_a_run_does(mnist_cache, tmp_path):
    """``open_dataset`` (the data YAMLs' ``_target_``, which the worker instantiates): a real
    dataset from the cache (fetched first when missing), synthetic from the seed, nothing cached."""
    import yaml

    from scaling.config import CONF_DIR
    from scaling.worker import _dataset

    for name in data.DATASETS:
        spec = yaml.safe_load((CONF_DIR / "data" / f"{name}.yaml").read_text())
        assert spec["_target_"] == data.DEFAULT_TARGET and spec["name"] == name
        cfg = {"seed": 0, "data": {**spec, "cache_dir": str(mnist_cache), "offline": True}}
        if name != "fashion_mnist":  # not in the test cache
            assert _dataset(cfg, rank=1).name == name
    assert _dataset({"seed": 0, "data": {"name": "mnist", "cache_dir": str(mnist_cache)}}, 1).test_y[0] == 7  # no _target_
    lines = []
    synthetic = data.open_dataset("synthetic", tmp_path / "unused", seed=3, log=lines.append)
    assert np.array_equal(synthetic.train_x, data.load("synthetic", seed=3).train_x) and not (tmp_path / "unused").exists()


# --------------------------------------------------------------------------- synthetic and order


def test_synthetic_is_deterministic_fast_and_learnable(tmp_path):
    data.load("synthetic")  # first call pays numpy's warm-up
    t0 = time.perf_counter()
    a = data.load("synthetic", cache_dir=tmp_path, seed=3)
    assert time.perf_counter() - t0 < 0.5
    b = data.load("synthetic", seed=3)
    c = data.load("synthetic", seed=4)
    assert not list(tmp_path.iterdir())  # no cache
    assert a.train_x.shape == (60000, 28, 28) and a.test_x.shape == (10000, 28, 28)
    assert a.train_x.dtype == np.uint8 and a.train_y.shape == (60000,) and a.test_y.shape == (10000,)
    assert set(np.unique(a.train_y)) == set(range(10)) and a.num_classes == 10
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(a, key), getattr(b, key))
        assert not np.array_equal(getattr(a, key), getattr(c, key))
    # learnable: class means of the train set classify the test set far above chance (10 %)
    means = np.stack([a.train_x[a.train_y == k].reshape(-1, 784).mean(0) for k in range(10)])
    x = a.test_x[:2000].reshape(-1, 784).astype(np.float64)
    pred = np.argmin((means**2).sum(1) - 2 * x @ means.T, axis=1)
    assert (pred == a.test_y[:2000]).mean() > 0.5


def test_epoch_permutation():
    p = sharding.epoch_permutation(1000, seed=0, epoch=0)
    assert np.array_equal(np.sort(p), np.arange(1000))
    assert np.array_equal(p, sharding.epoch_permutation(1000, seed=0, epoch=0))
    assert not np.array_equal(p, sharding.epoch_permutation(1000, seed=0, epoch=1))
    assert not np.array_equal(p, sharding.epoch_permutation(1000, seed=1, epoch=0))
    assert np.array_equal(p, np.random.default_rng([0, 0]).permutation(1000))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SCALING_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("SCALING_CACHE")
    assert data.default_cache_dir() == tmp_path / "xdg" / "scaling"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.default_cache_dir() == Path.home() / ".cache" / "scaling"


def test_unknown_dataset():
    with pytest.raises(DataError, match="fashion_mnist"):
        data.load("cifar10")


# --------------------------------------------------------------------------- `scaling data`


def data_cli(argv):
    return data.data_command(argv)


def test_cli_path_verify_and_errors(mnist_cache, tmp_path, capsys):
    assert data_cli(["path", "mnist", "--cache-dir", str(mnist_cache)]) == 0
    assert capsys.readouterr().out.strip() == str(mnist_cache / "mnist")
    assert data_cli(["verify", "mnist", "--cache-dir", str(mnist_cache)]) == 0
    assert "OK" in capsys.readouterr().out
    assert data_cli(["fetch", "mnist", "--cache-dir", str(tmp_path), "--offline"]) == 2
    assert "error:" in capsys.readouterr().err
    assert data_cli(["verify", "mnist", "--cache-dir", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert data_cli(["fetch", "nope"]) == 2
    assert data_cli(["fetch", "synthetic", "--cache-dir", str(tmp_path)]) == 0
