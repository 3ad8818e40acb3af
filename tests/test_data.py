"""trainer.data: reading, verifying and downloading datasets, and the helpers on top."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data import (
    DataError,
    ImageSet,
    channel_stats,
    load_dataset,
    split_validation,
)
from trainer.data.cifar import CIFAR10, CifarSource, load_cifar
from trainer.data.fetch import RemoteFile, locate, sha256_file
from trainer.data.idx import read_idx
from trainer.data.mnist import FASHION_MNIST, MNIST, IdxSource, load_idx
from trainer.data.shapes import SHAPES_CLASSES, make_shapes

REPO = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the user's $CONVSERVE_DATA or ~/.cache, or talks to loopback via a proxy."""
    monkeypatch.delenv("CONVSERVE_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


# --- helpers -------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tiny_idx_files(seed: int = 0) -> dict[str, bytes]:
    """Gzipped IDX files in MNIST's layout: 12 train and 5 test 28x28 images, labels 0..9."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 12, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 5, dtype=np.uint8),
    }
    return {name: gzip.compress(idx_bytes(a), mtime=0) for name, a in arrays.items()}


def tiny_mnist(files: dict[str, bytes], base_url: str = "http://127.0.0.1:9/") -> IdxSource:
    """MNIST's source with our tiny files' digests and URLs."""
    return replace(
        MNIST,
        files=tuple(RemoteFile(n, (sha256(b),), (base_url + n,)) for n, b in files.items()),
    )


class Server:
    """A loopback HTTP server for the files in ``root``, run in a thread until stopped."""

    def __init__(self, root: Path) -> None:
        class QuietHandler(SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

        self.root = root
        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root))
        )
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    s = Server(root)
    yield s
    s.stop()


# --- IDX -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [True, False], ids=["gz", "raw"])
def test_read_idx_round_trips(tmp_path: Path, compressed: bool) -> None:
    array = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    data = idx_bytes(array)
    path = write(tmp_path / "a.idx", gzip.compress(data) if compressed else data)
    out = read_idx(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable


@pytest.mark.parametrize("compressed", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_read_idx_rejects_truncated_file(tmp_path: Path, compressed: bool, keep: float) -> None:
    array = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    data = gzip.compress(idx_bytes(array)) if compressed else idx_bytes(array)
    path = write(tmp_path / "cut.gz", data[: int(len(data) * keep)])
    with pytest.raises(DataError, match=r"cut\.gz: truncated"):
        read_idx(path)


def test_read_idx_rejects_bad_magic(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.idx", b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DataError, match=r"bad\.idx.*magic"):
        read_idx(path)


@pytest.mark.parametrize("compressed", [True, False], ids=["gz", "raw"])
def test_read_idx_rejects_trailing_garbage(tmp_path: Path, compressed: bool) -> None:
    data = idx_bytes(np.zeros((2, 3), np.uint8)) + b"extra"
    path = write(tmp_path / "long.idx", gzip.compress(data) if compressed else data)
    with pytest.raises(DataError, match=r"long\.idx.*unexpected bytes"):
        read_idx(path)


def test_read_idx_rejects_non_uint8_element_type(tmp_path: Path) -> None:
    path = write(tmp_path / "f.idx", bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + bytes(4))
    with pytest.raises(DataError, match=r"f\.idx.*0x0d"):
        read_idx(path)


# --- Fashion-MNIST from the Debian package ---------------------------------------------------


@pytest.mark.skipif(
    not FASHION_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_fashion_mnist_loads_from_system_copy() -> None:
    paths = locate(
        FASHION_MNIST.files,
        dataset="fashion-mnist",
        data_dir=None,
        system_dirs=FASHION_MNIST.system_dirs,
        download=False,
    )
    assert all(p.parent == FASHION_DIR for p in paths.values())  # digests accepted

    ds = load_dataset("fashion-mnist", download=False)

    assert ds.classes[0] == "T-shirt/top" and len(ds.classes) == 10
    assert ds.train.images.shape == (60000, 1, 28, 28)
    assert ds.test.images.shape == (10000, 1, 28, 28)
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(ds.train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test.labels), [1000] * 10)


# --- locating and verifying local files -----------------------------------------------------


def test_corrupted_local_copy_is_rejected_naming_file_and_digest(tmp_path: Path) -> None:
    files = tiny_idx_files()
    for name, data in files.items():
        write(tmp_path / "data" / name, data)
    bad = tmp_path / "data" / "t10k-images-idx3-ubyte.gz"
    damaged = bytearray(bad.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    bad.write_bytes(bytes(damaged))

    with pytest.raises(DataError) as err:
        load_idx(tiny_mnist(files), tmp_path / "data", download=False)

    message = str(err.value)
    assert str(bad) in message and sha256(bytes(damaged)) in message
    assert "make data" in message


def test_data_env_var_is_a_root_with_one_folder_per_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = tiny_idx_files()
    for name, data in files.items():
        write(tmp_path / "root" / "mnist" / name, data)
    monkeypatch.setenv("CONVSERVE_DATA", str(tmp_path / "root"))

    ds = load_idx(tiny_mnist(files), download=False)

    assert len(ds.train) == 12 and len(ds.test) == 5


def test_missing_files_without_download_list_places_looked_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVSERVE_DATA", str(tmp_path / "root"))
    with pytest.raises(DataError) as err:
        load_dataset("mnist", data_dir=tmp_path / "mine", download=False)
    message = str(err.value)
    assert str(tmp_path / "mine") in message
    assert str(tmp_path / "root" / "mnist") in message
    assert "make data" in message and "--data-dir" in message


def test_mnist_never_reads_fashion_mnist_system_copy() -> None:
    # Both datasets use the same filenames; MNIST must not pick up Fashion-MNIST's files.
    with pytest.raises(DataError) as err:
        load_dataset("mnist", download=False)
    assert str(FASHION_DIR) not in str(err.value)


# --- downloading ----------------------------------------------------------------------------


def test_mnist_downloads_verified_files_then_reuses_them_offline(
    tmp_path: Path, server: Server
) -> None:
    files = tiny_idx_files()
    for name, data in files.items():
        write(server.root / name, data)
    source = tiny_mnist(files, server.base)
    dest = tmp_path / "dl"

    first = load_idx(source, dest)
    server.stop()  # the second load must not need the network
    second = load_idx(source, dest, download=False)

    assert sorted(p.name for p in dest.iterdir()) == sorted(files)
    assert first.train.images.shape == (12, 1, 28, 28) and len(first.test) == 5
    np.testing.assert_array_equal(first.train.images, second.train.images)
    np.testing.assert_array_equal(first.test.labels, second.test.labels)


def test_download_with_wrong_digest_keeps_no_file(tmp_path: Path, server: Server) -> None:
    files = tiny_idx_files()
    for name, data in files.items():
        write(server.root / name, data)
    name = "train-labels-idx1-ubyte.gz"
    source = tiny_mnist({**files, name: b"what we expected"}, server.base)
    dest = tmp_path / "dl"

    with pytest.raises(DataError) as err:
        load_idx(source, dest)

    message = str(err.value)
    assert name in message
    assert sha256(b"what we expected") in message and sha256(files[name]) in message
    assert not (dest / name).exists()
    assert not [p for p in dest.iterdir() if p.name.startswith(f".{name}")]  # no temp file


def test_download_falls_back_to_the_next_mirror(tmp_path: Path, server: Server) -> None:
    data = b"payload"
    write(server.root / "f.bin", data)
    file = RemoteFile(
        "f.bin", (sha256(data),), (server.base + "missing/f.bin", server.base + "f.bin")
    )
    paths = locate([file], dataset="x", data_dir=tmp_path / "dl", system_dirs=(), download=True)
    assert paths["f.bin"].read_bytes() == data


def test_unreachable_mirror_is_a_dataerror_naming_the_url(tmp_path: Path, server: Server) -> None:
    server.stop()
    url = server.base + "f.bin"
    file = RemoteFile("f.bin", ("0" * 64,), (url,))
    with pytest.raises(DataError) as err:
        locate([file], dataset="x", data_dir=tmp_path / "dl", system_dirs=(), download=True)
    assert url in str(err.value) and "make data" in str(err.value)
    assert list((tmp_path / "dl").iterdir()) == []


# --- CIFAR-10 -------------------------------------------------------------------------------

CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_batches(protocol: int = pickle.DEFAULT_PROTOCOL) -> tuple[dict[str, bytes], dict]:
    """Pickled batches (4 images each) plus meta, and the arrays they hold."""
    rng = np.random.default_rng(0)
    arrays = {
        name: {
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, 4)],
        }
        for name in CIFAR_NAMES
    }
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
    pickled = {name: pickle.dumps(batch, protocol=protocol) for name, batch in arrays.items()}
    pickled["batches.meta"] = pickle.dumps(meta, protocol=protocol)
    return pickled, arrays


def cifar_tarball(path: Path, members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write(path, buffer.getvalue())
    return buffer.getvalue()


def local_cifar(tmp_path: Path, members: dict[str, bytes]) -> tuple[CifarSource, Path]:
    """A CIFAR source whose tarball (with ``members``) sits in tmp_path/cifar."""
    data = cifar_tarball(tmp_path / "cifar" / CIFAR10.file.filename, members)
    file = replace(CIFAR10.file, sha256=(sha256(data),), urls=())
    return replace(CIFAR10, file=file), tmp_path / "cifar"


def test_cifar_downloads_tarball_and_reads_batches(tmp_path: Path, server: Server) -> None:
    members, arrays = cifar_batches()
    data = cifar_tarball(server.root / "cifar.tgz", members)
    file = RemoteFile(CIFAR10.file.filename, (sha256(data),), (server.base + "cifar.tgz",))

    ds = load_cifar(replace(CIFAR10, file=file), tmp_path / "dl")

    assert ds.classes == tuple(f"class{i}" for i in range(10))
    assert ds.train.images.shape == (20, 3, 32, 32) and ds.test.images.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(
        ds.train.images[4:8], arrays["data_batch_2"][b"data"].reshape(4, 3, 32, 32)
    )
    np.testing.assert_array_equal(ds.test.labels, arrays["test_batch"][b"labels"])
    assert ds.train.labels.dtype == np.int64


class RunsAShellCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def test_cifar_refuses_to_unpickle_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    members, _ = cifar_batches()
    members["data_batch_3"] = pickle.dumps({b"data": RunsAShellCommand(f"touch {marker}")})
    source, data_dir = local_cifar(tmp_path, members)

    with pytest.raises(DataError, match=r"refusing to unpickle \w+\.system from .*data_batch_3"):
        load_cifar(source, data_dir, download=False)
    assert not marker.exists()


@pytest.mark.parametrize("module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_cifar_admits_arrays_pickled_under_either_numpy_module_name(
    tmp_path: Path, module: str
) -> None:
    members, arrays = cifar_batches(protocol=3)  # protocol 3 names globals as "module\nname\n"
    for name in CIFAR_NAMES:
        members[name] = members[name].replace(
            b"numpy._core.multiarray\n_reconstruct\n", f"{module}\n_reconstruct\n".encode()
        )
        globals_used = {
            arg for op, arg, _ in pickletools.genops(members[name]) if op.name == "GLOBAL"
        }
        assert f"{module} _reconstruct" in globals_used
    source, data_dir = local_cifar(tmp_path, members)

    ds = load_cifar(source, data_dir, download=False)

    np.testing.assert_array_equal(
        ds.test.images, arrays["test_batch"][b"data"].reshape(4, 3, 32, 32)
    )


def test_cifar_accepts_str_keys(tmp_path: Path) -> None:
    members, arrays = cifar_batches()
    for name in [*CIFAR_NAMES, "batches.meta"]:
        batch = pickle.loads(members[name])
        members[name] = pickle.dumps({k.decode(): v for k, v in batch.items()})
    source, data_dir = local_cifar(tmp_path, members)

    ds = load_cifar(source, data_dir, download=False)

    assert ds.classes[3] == "class3"
    np.testing.assert_array_equal(ds.train.labels[:4], arrays["data_batch_1"][b"labels"])


def test_cifar_missing_batch_is_a_dataerror(tmp_path: Path) -> None:
    members, _ = cifar_batches()
    del members["test_batch"]
    source, data_dir = local_cifar(tmp_path, members)
    with pytest.raises(DataError, match="test_batch"):
        load_cifar(source, data_dir, download=False)


# --- ImageFolder ----------------------------------------------------------------------------

# Class names deliberately not in sorted order; each class's images are one shade of grey.
SHADES = {"cat": 210, "ant": 30, "bee": 120}


def write_image(path: Path, shade: int, size: tuple[int, int], mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = shade if mode == "L" else (shade, shade, shade)
    Image.new(mode, size, colour).save(path)


def write_class_folders(root: Path, per_class: int) -> None:
    for name, shade in SHADES.items():
        for i in range(per_class):
            # Alternate RGB PNGs and greyscale JPEGs of different sizes; shade + i tells
            # images apart.
            if i % 2:
                write_image(root / name / f"{i}.JPG", shade + i, (40, 25), "L")
            else:
                write_image(root / name / f"{i}.png", shade + i, (20, 30), "RGB")


@pytest.mark.parametrize("channels", [1, 3])
def test_imagefolder_reads_train_and_test_folders(tmp_path: Path, channels: int) -> None:
    write_class_folders(tmp_path / "train", per_class=4)
    write_class_folders(tmp_path / "test", per_class=2)

    ds = load_dataset("imagefolder", data_dir=tmp_path, image_size=16, channels=channels)

    assert ds.classes == ("ant", "bee", "cat")
    assert ds.train.images.shape == (12, channels, 16, 16)
    assert ds.test.images.shape == (6, channels, 16, 16)
    for part in (ds.train, ds.test):
        shades = part.images.reshape(len(part), -1).mean(axis=1)
        expected = np.array([SHADES[ds.classes[label]] for label in part.labels])
        assert np.all(np.abs(shades - expected) <= 6)  # shade + i, plus JPEG error


def test_imagefolder_holds_out_a_seeded_stratified_fifth(tmp_path: Path) -> None:
    write_class_folders(tmp_path, per_class=10)

    ds = load_dataset("imagefolder", data_dir=tmp_path, image_size=8, channels=1, seed=3)
    again = load_dataset("imagefolder", data_dir=tmp_path, image_size=8, channels=1, seed=3)

    np.testing.assert_array_equal(np.bincount(ds.train.labels), [8, 8, 8])
    np.testing.assert_array_equal(np.bincount(ds.test.labels), [2, 2, 2])
    train_shades = set(np.rint(ds.train.images.mean(axis=(1, 2, 3))).astype(int))
    test_shades = set(np.rint(ds.test.images.mean(axis=(1, 2, 3))).astype(int))
    assert len(train_shades | test_shades) == 30 and not train_shades & test_shades
    np.testing.assert_array_equal(ds.test.images, again.test.images)


def test_imagefolder_names_an_undecodable_file(tmp_path: Path) -> None:
    write_class_folders(tmp_path, per_class=3)
    good = (tmp_path / "bee" / "0.png").read_bytes()
    write(tmp_path / "bee" / "broken.png", good[: len(good) // 2])
    with pytest.raises(DataError, match=r"broken\.png"):
        load_dataset("imagefolder", data_dir=tmp_path)


def test_imagefolder_empty_class_folder_is_a_dataerror(tmp_path: Path) -> None:
    write_class_folders(tmp_path, per_class=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_dataset("imagefolder", data_dir=tmp_path)


def test_imagefolder_without_class_folders_is_a_dataerror(tmp_path: Path) -> None:
    write_image(tmp_path / "loose.png", 10, (8, 8), "L")
    with pytest.raises(DataError, match="no class folders"):
        load_dataset("imagefolder", data_dir=tmp_path)


# --- shapes ---------------------------------------------------------------------------------


def test_shapes_are_deterministic_per_seed() -> None:
    a, b = make_shapes(200, seed=5), make_shapes(200, seed=5)
    other = make_shapes(200, seed=6)
    assert a.images.tobytes() == b.images.tobytes()
    assert a.boxes.tobytes() == b.boxes.tobytes() and a.labels.tobytes() == b.labels.tobytes()
    assert a.images.tobytes() != other.images.tobytes()


def test_shapes_dataset_has_requested_sizes_and_distinct_test_set() -> None:
    ds = load_dataset("shapes", shapes_train=300, shapes_test=60, channels=3, image_size=32)
    assert ds.classes == SHAPES_CLASSES
    assert ds.train.images.shape == (300, 3, 32, 32) and ds.test.images.shape == (60, 3, 32, 32)
    assert ds.train.boxes.shape == (300, 4) and ds.test.boxes.dtype == np.float32
    assert ds.train.images[:60].tobytes() != ds.test.images.tobytes()


def test_shapes_classes_are_balanced() -> None:
    counts = np.bincount(make_shapes(601).labels, minlength=len(SHAPES_CLASSES))
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_boxes_lie_inside_the_image_and_bound_the_object(channels: int) -> None:
    size = 28
    s = make_shapes(300, size=size, channels=channels, seed=1)
    x0, y0, x1, y1 = s.boxes.T
    assert np.all((x0 >= 0) & (x0 < x1) & (x1 <= size) & (y0 >= 0) & (y0 < y1) & (y1 <= size))
    assert np.all((x1 - x0) * (y1 - y0) <= 0.25 * size * size)

    # Pixels far from the background (the median, as the object covers at most a quarter)
    # are object pixels: every image has some, and all of them are inside the box.
    pixels = s.images.astype(np.int16)
    background = np.median(pixels, axis=(2, 3), keepdims=True)
    strong = (np.abs(pixels - background) > 40).any(axis=1)  # (N, H, W)
    ys, xs = np.mgrid[:size, :size]
    inside = (
        (xs >= x0[:, None, None])
        & (xs < x1[:, None, None])
        & (ys >= y0[:, None, None])
        & (ys < y1[:, None, None])
    )
    assert not np.any(strong & ~inside)
    assert np.all((strong & inside).sum(axis=(1, 2)) >= 2)


# --- split_validation, channel_stats, load_dataset ------------------------------------------


def numbered_set(n: int) -> ImageSet:
    """Image i is filled with i % 256 and labelled i, so a split can be checked by labels."""
    images = np.broadcast_to(
        (np.arange(n) % 256).astype(np.uint8)[:, None, None, None], (n, 1, 2, 2)
    )
    return ImageSet(np.ascontiguousarray(images), np.arange(n, dtype=np.int64))


def test_split_validation_is_disjoint_sized_and_seeded() -> None:
    train = numbered_set(100)
    rest, val = split_validation(train, 20, seed=1)
    rest_again, val_again = split_validation(train, 20, seed=1)
    _, val_other = split_validation(train, 20, seed=2)

    assert len(rest) == 80 and len(val) == 20
    assert set(rest.labels) | set(val.labels) == set(range(100))
    assert not set(rest.labels) & set(val.labels)
    np.testing.assert_array_equal(val.images[:, 0, 0, 0], val.labels)  # images follow labels
    np.testing.assert_array_equal(val.labels, val_again.labels)
    np.testing.assert_array_equal(rest.labels, rest_again.labels)
    assert set(val.labels) != set(val_other.labels)


def test_split_validation_of_zero_gives_an_empty_set() -> None:
    rest, val = split_validation(numbered_set(10), 0, seed=0)
    assert len(rest) == 10 and len(val) == 0 and val.images.shape == (0, 1, 2, 2)


def test_split_validation_rejects_a_size_leaving_no_training_data() -> None:
    # The message names the recipe field a user sets, and a size that fits.
    with pytest.raises(DataError, match=r"data\.val_size 10 .* data\.val_size=5\b"):
        split_validation(numbered_set(10), 10, seed=0)


@pytest.mark.parametrize(
    ("n", "held_out"), [(60_000, 5_000), (2_400, 240), (300, 100), (150, 75), (10, 5)]
)
def test_without_a_size_a_tenth_is_held_out_with_a_floor_and_a_cap(n: int, held_out: int) -> None:
    rest, val = split_validation(numbered_set(n), None, seed=0)
    assert len(val) == held_out and len(rest) == n - held_out


def test_channel_stats_match_numpy() -> None:
    rng = np.random.default_rng(0)
    # Over four million pixel values, so the sums run in more than one chunk.
    images = np.stack(
        [rng.integers(0, 256, (1800, 32, 32)), rng.integers(100, 140, (1800, 32, 32))], axis=1
    ).astype(np.uint8)
    as_float = images.astype(np.float64) / 255

    mean, std = channel_stats(images)

    np.testing.assert_allclose(mean, as_float.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, as_float.std(axis=(0, 2, 3)), rtol=1e-9)


def test_unknown_dataset_name_lists_valid_names() -> None:
    with pytest.raises(DataError) as err:
        load_dataset("imagenet")
    for name in ("fashion-mnist", "mnist", "cifar10", "imagefolder", "shapes"):
        assert name in str(err.value)


def test_fixed_size_dataset_rejects_another_image_size() -> None:
    with pytest.raises(DataError, match="image_size"):
        load_dataset("mnist", image_size=32, download=False)


def test_package_does_not_import_torch() -> None:
    code = "import sys, trainer.data; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    assert sha256_file(write(tmp_path / "f", data)) == sha256(data)
