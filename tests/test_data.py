"""Data readers: npz, IDX folders, image folders, Python readers, preprocessing, bad input."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import write_npz
from PIL import Image

from onnx_mbs.data import Preprocess, open_data, to_arrays
from onnx_mbs.passes.errors import BadInputError

GRAY8 = (1, 1, 8, 8)
RGB8 = (1, 3, 8, 8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: two zero bytes, type code, rank, big-endian uint32 dims, big-endian data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def pixels(n: int, h: int, w: int, c: int | None = None, seed: int = 0) -> np.ndarray:
    shape = (n, h, w) if c is None else (n, h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# --------------------------------------------------------------------------- npz


def test_npz_grayscale_uint8_scaled_and_normalised(tmp_path):
    x = pixels(5, 8, 8)
    y = np.array([0, 1, 2, 1, 0])
    source = open_data(write_npz(tmp_path / "d.npz", x=x, y=y), "in", GRAY8, mean=0.5, std=0.25)
    got, labels = to_arrays(source)
    expected = (x[:, None].astype(np.float64) / 255 - 0.5) / 0.25
    assert got.dtype == np.float32 and got.shape == (5, 1, 8, 8)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert labels.dtype == np.int64 and labels.tolist() == y.tolist()
    assert len(source) == 5 and source.input_name == "in"
    assert "5 samples" in source.description and "labels: yes" in source.description


def test_npz_float_nhwc_rgb_to_grayscale_uses_luma(tmp_path):
    x = np.random.default_rng(1).random((3, 8, 8, 3), dtype=np.float32)
    source = open_data(write_npz(tmp_path / "d.npz", x=x), "in", GRAY8)
    got, labels = to_arrays(source)
    luma = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    np.testing.assert_allclose(got[:, 0], luma, atol=1e-6)
    assert labels is None and "labels: no" in source.description
    assert source.preprocess.scale != "/255"  # floats are taken as already in [0, 1]


def test_npz_grayscale_nchw_to_rgb_repeats_channel(tmp_path):
    x = pixels(2, 8, 8)[:, None]  # (N, 1, H, W)
    got, _ = to_arrays(open_data(write_npz(tmp_path / "d.npz", x=x), "in", RGB8))
    assert got.shape == (2, 3, 8, 8)
    for c in range(3):
        np.testing.assert_allclose(got[:, c], x[:, 0] / 255.0, atol=1e-6)


def test_npz_per_channel_mean_std(tmp_path):
    x = pixels(2, 8, 8, 3)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    got, _ = to_arrays(
        open_data(write_npz(tmp_path / "d.npz", x=x), "in", RGB8, mean=mean, std=std)
    )
    for c in range(3):
        np.testing.assert_allclose(got[:, c], (x[..., c] / 255.0 - mean[c]) / std[c], atol=1e-5)


def test_resize_matches_pillow_bilinear(tmp_path):
    x = pixels(2, 5, 7)
    got, _ = to_arrays(open_data(write_npz(tmp_path / "d.npz", x=x), "in", GRAY8))
    assert got.shape == (2, 1, 8, 8)
    for n in range(2):
        reference = Image.fromarray(x[n]).resize((8, 8), Image.Resampling.BILINEAR)
        np.testing.assert_allclose(got[n, 0], np.asarray(reference) / 255.0, atol=1.5 / 255)


def test_resize_keeps_constant_image_constant(tmp_path):
    x = np.full((1, 4, 4), 0.25, np.float32)
    got, _ = to_arrays(open_data(write_npz(tmp_path / "d.npz", x=x), "in", (1, 1, 9, 13)))
    assert got.shape == (1, 1, 9, 13)
    np.testing.assert_allclose(got, 0.25, atol=1e-6)


def test_mean_in_pixel_units_is_refused(tmp_path):
    """--mean applies after /255: ImageNet's 123.675 (0..255 units) would shift every input
    by about -2 and still score, so a mean outside [0, 1] is refused with the scaled values."""
    path = write_npz(tmp_path / "d.npz", x=pixels(3, 8, 8, 3))
    rgb = (1, 3, 8, 8)
    with pytest.raises(BadInputError, match=r"0\.485,0\.456,0\.406"):
        open_data(path, "in", rgb, mean="123.675,116.28,103.53", std="58.395,57.12,57.375")
    for mean in ("0", "1", "0.485,0.456,0.406"):
        open_data(path, "in", rgb, mean=mean)


def test_mean_in_pixel_units_advice_keeps_the_metadata_std(tmp_path):
    """The std the model's metadata records is in [0, 1] units already: the advice must not
    divide it by 255 (following it would scale every input 255-fold). A std given with the
    mean, or the default 1 (no scaling, in the mean's units too), is divided with it."""
    path = write_npz(tmp_path / "d.npz", x=pixels(3, 8, 8))
    metadata = {"onnx_mbs.mean": "0.286", "onnx_mbs.std": "0.353"}
    with pytest.raises(BadInputError, match=r"divide it by 255 \(mean='0\.502'\)$"):
        open_data(path, "in", GRAY8, mean="128", metadata=metadata)
    with pytest.raises(BadInputError, match=r"\(mean='0\.502' std='0\.003922'\)$"):
        open_data(path, "in", GRAY8, mean="128")
    with pytest.raises(BadInputError, match=r"\(mean='0\.502' std='0\.2502'\)$"):
        open_data(path, "in", GRAY8, mean="128", std="63.8", metadata=metadata)


def test_per_channel_count_refusal_says_how_many_the_model_takes(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=pixels(3, 8, 8))
    with pytest.raises(BadInputError, match=r"must be one finite number: the model input has 1 "):
        open_data(path, "in", GRAY8, mean="0.5,0.5")
    with pytest.raises(BadInputError, match=r"must be 1 or 3 finite numbers \(one per channel"):
        open_data(path, "in", RGB8, std="0.5,0.5")


def test_metadata_gives_default_mean_std_and_arguments_override_it(tmp_path):
    x = pixels(3, 8, 8)
    path = write_npz(tmp_path / "d.npz", x=x)
    metadata = {"onnx_mbs.mean": "0.5", "onnx_mbs.std": "0.25", "other": "x"}
    source = open_data(path, "in", GRAY8, metadata=metadata)
    got, _ = to_arrays(source)
    np.testing.assert_allclose(got[:, 0], (x / 255.0 - 0.5) / 0.25, atol=1e-5)
    assert source.preprocess == Preprocess((8, 8), 1, (0.5,), (0.25,), "/255")
    text = source.preprocess.describe()
    assert "8x8" in text and "grayscale" in text and "mean 0.5 std 0.25" in text

    overridden, _ = to_arrays(open_data(path, "in", GRAY8, mean=0.0, metadata=metadata))
    np.testing.assert_allclose(overridden[:, 0], x / 255.0 / 0.25, atol=1e-5)

    plain = open_data(path, "in", GRAY8)
    assert plain.preprocess.mean == (0.0,) and plain.preprocess.std == (1.0,)


def test_metadata_per_channel_values_for_rgb(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=pixels(1, 8, 8, 3))
    metadata = {"onnx_mbs.mean": "0.4,0.5,0.6", "onnx_mbs.std": "0.2, 0.3, 0.4"}
    source = open_data(path, "in", RGB8, metadata=metadata)
    assert source.preprocess.mean == (0.4, 0.5, 0.6)
    assert source.preprocess.std == (0.2, 0.3, 0.4)
    assert "RGB" in source.preprocess.describe()


def test_limit_takes_the_first_samples(tmp_path):
    x, y = pixels(10, 8, 8), np.arange(10) % 3
    source = open_data(write_npz(tmp_path / "d.npz", x=x, y=y), "in", GRAY8, limit=4)
    got, labels = to_arrays(source)
    assert len(source) == 4 and labels.tolist() == y[:4].tolist()
    np.testing.assert_allclose(got[:, 0], x[:4] / 255.0, atol=1e-6)
    assert "first 4 of 10" in source.description


def test_batches_stream_in_order_and_can_repeat(tmp_path):
    x, y = pixels(7, 8, 8), np.arange(7)
    source = open_data(write_npz(tmp_path / "d.npz", x=x, y=y), "in", GRAY8)
    for _ in range(2):
        sizes = [len(b.x) for b in source.batches(3)]
        labels = np.concatenate([b.y for b in source.batches(3)])
        assert sizes == [3, 3, 1] and labels.tolist() == list(range(7))


# --------------------------------------------------------------------------- IDX


@pytest.fixture
def idx_folder(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    test_x, test_y = pixels(6, 28, 28, seed=1), np.arange(6, dtype=np.uint8) % 10
    train_x, train_y = pixels(9, 28, 28, seed=2), (np.arange(9, dtype=np.uint8) * 3) % 10
    write_idx(folder / "t10k-images-idx3-ubyte.gz", test_x)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", test_y)
    write_idx(folder / "train-images-idx3-ubyte", train_x)  # not gzipped
    write_idx(folder / "train-labels-idx1-ubyte", train_y)
    return folder, (test_x, test_y), (train_x, train_y)


def test_idx_folder_reads_test_split_by_default(idx_folder):
    folder, (x, y), _ = idx_folder
    source = open_data(folder, "in", (1, 1, 28, 28))
    got, labels = to_arrays(source)
    np.testing.assert_allclose(got[:, 0], x / 255.0, atol=1e-6)
    assert labels.tolist() == y.tolist() and "test split" in source.description


def test_idx_folder_train_suffix_picks_train_split(idx_folder):
    folder, _, (x, y) = idx_folder
    source = open_data(f"{folder}:train", "in", (1, 1, 28, 28))
    got, labels = to_arrays(source)
    assert len(source) == 9 and labels.tolist() == y.tolist()
    np.testing.assert_allclose(got[:, 0], x / 255.0, atol=1e-6)
    assert len(open_data(f"{folder}:test", "in", (1, 1, 28, 28))) == 6


def test_idx_folder_unknown_split_names_the_splits(idx_folder, tmp_path):
    """folder:val was refused as a path that does not exist, without naming the splits."""
    folder, _, _ = idx_folder
    with pytest.raises(BadInputError, match=r"no split 'val'.*:train or .*:test"):
        open_data(f"{folder}:val", "in", (1, 1, 28, 28))
    path = write_npz(tmp_path / "d.npz", x=pixels(2, 8, 8))
    with pytest.raises(BadInputError, match=r"':val' is not a split.*only IDX folders"):
        open_data(f"{path}:val", "in", GRAY8)


def test_idx_folder_resized_to_rgb_model(idx_folder):
    folder, (x, _), _ = idx_folder
    got, _ = to_arrays(open_data(folder, "in", (1, 3, 32, 32)))
    assert got.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(got[:, 0], got[:, 2])


def test_idx_folder_without_the_split_says_how_to_pick(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte", pixels(2, 5, 5))
    with pytest.raises(BadInputError, match=r"no t10k-images.*test split; pick a split"):
        open_data(folder, "in", (1, 1, 5, 5))
    assert len(open_data(f"{folder}:train", "in", (1, 1, 5, 5))) == 2


def test_idx_truncated_file_is_bad_input(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    write_idx(folder / "t10k-images-idx3-ubyte", pixels(4, 5, 5))
    data = (folder / "t10k-images-idx3-ubyte").read_bytes()
    (folder / "t10k-images-idx3-ubyte").write_bytes(data[:-7])
    with pytest.raises(BadInputError, match="truncated"):
        open_data(folder, "in", (1, 1, 5, 5))


# --------------------------------------------------------------------------- image folders


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    images = {"cat": pixels(3, 6, 6, 3, seed=3), "ant": pixels(2, 6, 6, 3, seed=4)}
    for name, batch in images.items():
        for i, image in enumerate(batch):
            write_png(root / name / f"{i}.png", image)
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()  # hidden folders are not classes
    return root, images


def test_image_folder_labels_are_sorted_class_indices(image_folder):
    root, images = image_folder
    source = open_data(root, "in", (1, 3, 6, 6))
    got, labels = to_arrays(source)
    assert labels.tolist() == [0, 0, 1, 1, 1]  # "ant" < "cat"
    expected = np.concatenate([images["ant"], images["cat"]]).transpose(0, 3, 1, 2) / 255.0
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert "2 classes" in source.description and "5 samples" in source.description


def test_class_order_is_the_names_string_order_whatever_the_platform(tmp_path, monkeypatch):
    """torchvision numbers classes by the names sorted as strings (Zebra before ant); the folders
    were sorted as paths, which Windows compares without case (ant before Zebra): there, the
    model's Zebra was scored as ant."""
    from pathlib import PureWindowsPath

    from onnx_mbs.data import spec

    class WindowsLike(PureWindowsPath):
        """A Windows path to a folder of this machine: compares as Windows paths do."""

        def is_dir(self) -> bool:
            return Path(self.as_posix()).is_dir()

        def is_file(self) -> bool:
            return Path(self.as_posix()).is_file()

    for name in ("Zebra", "ant"):
        write_png(tmp_path / "imgs" / name / "0.png", pixels(1, 4, 4)[0])
    monkeypatch.setattr(
        spec, "_listing", lambda folder: [WindowsLike(p) for p in Path(folder.as_posix()).iterdir()]
    )
    source = open_data(tmp_path / "imgs", "in", (1, 1, 4, 4))
    assert source.classes == ("Zebra", "ant") and source.labels.tolist() == [0, 1]


def test_a_limit_on_class_folders_takes_every_class_in_turn(image_folder):
    """`--limit 2` of ant (2 images) and cat (3): one of each; the first two files would both be
    ants, and eval or the statistics would see one class only."""
    root, images = image_folder
    source = open_data(root, "in", (1, 3, 6, 6), limit=2)
    got, labels = to_arrays(source)
    assert labels.tolist() == [0, 1]
    picked = np.stack([images["ant"][0], images["cat"][0]])
    np.testing.assert_allclose(got, picked.transpose(0, 3, 1, 2) / 255.0, atol=1e-6)
    assert "2 of 5 samples, each class in turn" in source.description
    labels = to_arrays(open_data(root, "in", (1, 3, 6, 6), limit=5))[1]
    assert labels.tolist() == [0, 0, 1, 1, 1]


def test_numbered_class_folders_that_are_not_their_positions_are_refused(tmp_path):
    """Folders 3 and 7 (a subset of a 10-class set) would be labelled 0 and 1 by sorted position:
    the names say otherwise, so neither reading is taken silently."""

    def folder(name: str, classes: list[str]):
        for k, c in enumerate(classes):
            write_png(tmp_path / name / c / "0.png", pixels(1, 4, 4, seed=k)[0])
        return tmp_path / name

    subset = folder("subset", ["3", "7"])
    with pytest.raises(BadInputError, match=r"named by numbers \(3, 7\).*3 -> 0, 7 -> 1"):
        open_data(subset, "in", (1, 1, 4, 4))
    with pytest.raises(BadInputError, match="not their positions"):
        open_data(folder("unpadded", [str(k) for k in range(11)]), "in", (1, 1, 4, 4))
    # One class not named by a number ('other') does not make 10 sorting before 2 right.
    mixed = folder("mixed", [*(str(k) for k in range(11)), "other"])
    with pytest.raises(BadInputError, match=r"not their positions .*\(10 -> 2, 2 -> 3"):
        open_data(mixed, "in", (1, 1, 4, 4))
    labels = to_arrays(open_data(folder("named", ["0", "1", "other"]), "in", (1, 1, 4, 4)))[1]
    assert labels.tolist() == [0, 1, 2]
    # Unlabelled use (--no-labels, eval --teacher) reads no labels: nothing to misread.
    assert to_arrays(open_data(subset, "in", (1, 1, 4, 4), labels=False))[1] is None
    for name, classes in (("plain", ["0", "1", "2"]), ("padded", [f"{k:02d}" for k in range(11)])):
        labels = to_arrays(open_data(folder(name, classes), "in", (1, 1, 4, 4)))[1]
        assert labels.tolist() == list(range(len(classes)))


def test_image_folder_and_npz_of_same_pixels_agree(image_folder, tmp_path):
    root, images = image_folder
    from_folder, _ = to_arrays(open_data(root, "in", (1, 1, 8, 8), mean=0.3, std=0.2))
    x = np.concatenate([images["ant"], images["cat"]])
    from_npz, _ = to_arrays(
        open_data(write_npz(tmp_path / "d.npz", x=x), "in", (1, 1, 8, 8), mean=0.3, std=0.2)
    )
    # The folder path converts RGB -> L with Pillow (rounded to uint8): within one grey level.
    np.testing.assert_allclose(from_folder, from_npz, atol=1.5 / 255 / 0.2)


def test_image_folder_opens_files_lazily(image_folder, monkeypatch):
    root, _ = image_folder
    opened: list[str] = []
    real_open = Image.open

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    source = open_data(root, "in", (1, 3, 6, 6))
    assert opened == []
    batches = source.batches(2)
    first = next(batches)
    assert len(first.x) == 2 and len(opened) == 2
    rest = list(batches)
    assert [len(b.x) for b in rest] == [2, 1] and len(opened) == 5


def test_images_beside_the_class_folders_are_left_out_with_a_word(image_folder):
    """Images at the top of a folder with class sub-folders have no class: left out, as
    torchvision's ImageFolder leaves them, but the data line says so (they were dropped
    without a word)."""
    root, _ = image_folder
    write_png(root / "stray.png", pixels(1, 6, 6, 3)[0])
    source = open_data(root, "in", (1, 3, 6, 6))
    assert len(source) == 5
    assert "2 classes, 1 image beside them left out" in source.description


def test_loose_images_without_class_folders_have_no_labels(tmp_path):
    for i in range(3):
        write_png(tmp_path / "loose" / f"{i}.png", pixels(1, 4, 4, seed=i)[0])
    source = open_data(tmp_path / "loose", "in", (1, 1, 4, 4))
    got, labels = to_arrays(source)
    assert got.shape == (3, 1, 4, 4) and labels is None


def test_images_in_a_class_folders_own_sub_folders_are_read(tmp_path):
    """torchvision's ImageFolder reads a class's images at any depth (cat/2019/x.png): a model
    trained so is evaluated on the same images; they were dropped without a word. Hidden folders
    stay out, and a symlink loop lists its images once."""
    root = tmp_path / "nested"
    write_png(root / "ant" / "0.png", pixels(1, 4, 4, seed=1)[0])
    write_png(root / "ant" / "2019" / "1.png", pixels(1, 4, 4, seed=2)[0])
    write_png(root / "ant" / "2019" / "deeper" / "2.png", pixels(1, 4, 4, seed=3)[0])
    write_png(root / "ant" / ".thumbs" / "3.png", pixels(1, 4, 4, seed=4)[0])
    write_png(root / "cat" / "batch" / "0.png", pixels(1, 4, 4, seed=5)[0])
    (root / "cat" / "batch" / "loop").symlink_to(root / "cat", target_is_directory=True)
    source = open_data(root, "in", (1, 1, 4, 4))
    got, labels = to_arrays(source)
    assert labels.tolist() == [0, 0, 0, 1]
    expected = np.stack([pixels(1, 4, 4, seed=k)[0] for k in (1, 2, 3, 5)])[:, None] / 255.0
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_a_class_folders_images_are_in_torchvisions_order(tmp_path):
    """torchvision's make_dataset lists a class's images folder by folder, its sorted
    os.walk: each folder's own files (sorted by name) before its sub-folders', folders in the
    order of their path strings (a-b before a/sub). The whole paths were sorted instead
    (cat/2019/x.png before cat/a.png), and --limit, which picks by this order, took other
    images than the same limit on a torchvision loader."""
    root = tmp_path / "nested"
    names = ["B.png", "a.png", "2019/x.png", "a-b/y.png", "a/sub/z.png"]  # torchvision's order
    for k, name in enumerate(reversed(names)):
        write_png(root / "ant" / name, pixels(1, 4, 4, seed=k)[0])
    source = open_data(root, "in", (1, 1, 4, 4))
    assert [p.relative_to(root / "ant").as_posix() for p in source.files] == names
    try:
        from onnx_mbs.models.torchvision_cpu import import_torchvision

        folder = import_torchvision().datasets.folder
    except ImportError:
        return
    listed = folder.make_dataset(str(root), {"ant": 0}, extensions=(".png",))
    assert [Path(p).relative_to(root / "ant").as_posix() for p, _ in listed] == names


def test_an_image_folder_gives_torchvisions_samples_and_labels(tmp_path):
    """.gif files were read, where torchvision's ImageFolder skips them (its IMG_EXTENSIONS
    have no .gif): a model was measured on other samples than it was trained on, and a class
    of GIFs alone was not empty. Suffixes compare without case, as torchvision's do; the data
    line says what was left out."""
    root = tmp_path / "mixed"
    names = {
        "ant": ["a.png", "b.gif", "C.PNG", "d.JPEG", "e.Gif", "f.bmp", "g.tiff", "notes.txt"],
        "bee": ["x.gif"],  # no image torchvision reads: an empty class, keeping its place
        "cat": ["y.png", "z.GIF", "sub/w.jpg"],
    }
    for k, (label, files) in enumerate(names.items()):
        for i, name in enumerate(files):
            if name.endswith(".txt"):
                (root / label / name).write_text("not an image")
            else:
                write_png(root / label / name, pixels(1, 4, 4, c=3, seed=10 * k + i)[0])
    source = open_data(root, "in", (1, 3, 4, 4))
    got = [(p.relative_to(root).as_posix(), int(y)) for p, y in zip(source.files, source.labels)]
    assert got == [
        ("ant/C.PNG", 0),
        ("ant/a.png", 0),
        ("ant/d.JPEG", 0),
        ("ant/f.bmp", 0),
        ("ant/g.tiff", 0),
        ("cat/y.png", 2),
        ("cat/sub/w.jpg", 2),
    ]
    assert "5 other files left out: .gif 4, .txt 1)" in source.description, source.description
    try:
        from onnx_mbs.models.torchvision_cpu import import_torchvision

        datasets = import_torchvision().datasets
    except ImportError:
        return
    theirs = datasets.ImageFolder(str(root), allow_empty=True)
    assert theirs.classes == ["ant", "bee", "cat"]
    assert [(Path(p).relative_to(root).as_posix(), y) for p, y in theirs.samples] == got


def test_a_folder_of_files_that_are_not_read_says_why(tmp_path):
    """A folder of GIFs alone (or of other files) is refused naming what it holds and the
    kinds read, not as if it held nothing."""
    for name in ("a.gif", "b.GIF"):
        write_png(tmp_path / "gifs" / "cat" / name, pixels(1, 4, 4, c=3)[0])
        write_png(tmp_path / "loose" / name, pixels(1, 4, 4, c=3)[0])
    for folder in ("gifs", "loose"):
        with pytest.raises(BadInputError) as refused:
            open_data(tmp_path / folder, "in", (1, 3, 4, 4))
        message = str(refused.value)
        assert message.startswith(f"no images found in {tmp_path / folder}"), message
        assert "2 other files (.gif 2)" in message and "torchvision's ImageFolder" in message
        assert "bmp/jpeg/jpg/pgm/png/ppm/tif/tiff/webp" in message and "gif/" not in message


def test_unreadable_image_fails_when_streamed(tmp_path):
    write_png(tmp_path / "imgs" / "a" / "0.png", pixels(1, 4, 4)[0])
    (tmp_path / "imgs" / "a" / "1.png").write_bytes(b"not a png")
    source = open_data(tmp_path / "imgs", "in", (1, 1, 4, 4))
    with pytest.raises(BadInputError, match=r"cannot read image .*1\.png"):
        to_arrays(source)


def test_images_pillow_opens_with_a_value_error_are_refused_in_one_line(tmp_path):
    """A PGM with a broken header makes Pillow raise ValueError, not OSError: it came out as a
    traceback."""
    write_png(tmp_path / "imgs" / "a" / "0.png", pixels(1, 4, 4)[0])
    (tmp_path / "imgs" / "a" / "1.pgm").write_bytes(b"P5\n4 4\n99999999\n" + bytes(16))
    with pytest.raises(BadInputError, match=r"cannot read image .*1\.pgm: maxval"):
        to_arrays(open_data(tmp_path / "imgs", "in", GRAY8))


def test_a_lab_tiff_is_read_for_a_grayscale_model(tmp_path):
    """Pillow converts LAB to RGB but not to L: a grayscale model's LAB TIFF raised ValueError.
    It is read through RGB, as for an RGB model."""
    rgb = pixels(1, 8, 8, 3)[0]
    lab = Image.fromarray(rgb).convert("LAB")
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    lab.save(tmp_path / "imgs" / "a" / "0.tif")
    got, _ = to_arrays(open_data(tmp_path / "imgs", "in", GRAY8))
    with Image.open(tmp_path / "imgs" / "a" / "0.tif") as image:
        assert image.mode == "LAB"
        expected = np.asarray(image.convert("RGB").convert("L")) / 255.0
    np.testing.assert_allclose(got[0, 0], expected, atol=1e-6)


def test_16_bit_images_pillow_opens_as_32_bit_are_read_as_16_bit(tmp_path):
    """Pillow opens a 16-bit PGM (as Pillow itself writes an I;16 image) as mode I, maxval
    scaled to 65535, and a 16-bit PNG so before 10.3: they were refused as 32-bit pixels of
    unknown range. Their range is 0..65535: read as the same image at 8 bits."""
    from onnx_mbs.data.sources import image_pixels

    gray = pixels(1, 8, 8)[0]
    folder = tmp_path / "imgs"
    for name, image in (("a16", Image.fromarray(gray.astype(np.uint16) * 257)),
                        ("b8", Image.fromarray(gray))):  # fmt: skip
        (folder / name).mkdir(parents=True)
        image.save(folder / name / "0.pgm")
    with Image.open(folder / "a16" / "0.pgm") as image:
        assert image.mode == "I"
    got, _ = to_arrays(open_data(folder, "in", (1, 3, 8, 8)))
    np.testing.assert_allclose(got[0], got[1], atol=1e-6)
    older_png = Image.fromarray(gray.astype(np.int32) * 257)  # mode I: a PNG in Pillow < 10.3
    older_png.format = "PNG"
    values, divisor = image_pixels(older_png, 1, Path("old.png"))
    np.testing.assert_allclose(values / divisor, gray / 255.0, atol=1e-6)


# --------------------------------------------------------------------------- Python readers


class Reader:
    """The onnxruntime CalibrationDataReader protocol: get_next() until None."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.items = iter([{"in": a} for a in arrays])

    def get_next(self):
        return next(self.items, None)


def test_calibration_reader_protocol():
    arrays = [np.full((2, 1, 4, 4), i, np.float32) for i in range(3)]
    source = open_data(Reader(arrays), "in", ("batch", 1, 4, 4))
    assert len(source) == 6 and source.preprocess is None
    for _ in range(2):  # replayable even though the reader is one-shot
        got, labels = to_arrays(source)
        np.testing.assert_array_equal(got, np.concatenate(arrays))
        assert labels is None


class BufferReader:
    """A reader that refills one buffer for every batch, as a streaming reader may."""

    def __init__(self, batches: int = 3) -> None:
        self.batches, self.given, self.buffer = batches, 0, np.zeros((2, 1, 4, 4), np.float32)

    def get_next(self):
        if self.given == self.batches:
            return None
        self.buffer[:] = self.given
        self.given += 1
        return {"in": self.buffer}


def test_a_reader_that_refills_one_buffer_gives_every_batch():
    """Its arrays were kept by reference: every sample read as the last batch's."""
    from onnx_mbs.data.replay import replayable

    x, _ = to_arrays(open_data(BufferReader(), "in", ("batch", 1, 4, 4)))
    assert x[:, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]
    replay = replayable(BufferReader())
    for _ in range(2):  # what a pass or loader reads again
        x, _ = to_arrays(open_data(replay, "in", ("batch", 1, 4, 4)))
        assert x[:, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]


def test_plain_iterable_of_dicts_and_limit():
    def generate():
        for i in range(4):
            yield {"in": np.full((1, 1, 4, 4), i, np.float32), "ignored": np.zeros(1)}

    source = open_data(generate(), "in", (1, 1, 4, 4), limit=3)
    got, _ = to_arrays(source)
    assert got[:, 0, 0, 0].tolist() == [0, 1, 2]


def test_reader_with_wrong_name_or_shape_is_bad_input():
    with pytest.raises(BadInputError, match="has no 'in'.*keys: other"):
        open_data([{"other": np.zeros((1, 1, 4, 4), np.float32)}], "in", (1, 1, 4, 4))
    with pytest.raises(BadInputError, match=r"shape \(1, 1, 5, 4\)"):
        open_data([{"in": np.zeros((1, 1, 5, 4), np.float32)}], "in", (1, 1, 4, 4))
    with pytest.raises(BadInputError, match="no data"):
        open_data(Reader([]), "in", (1, 1, 4, 4))
    with pytest.raises(BadInputError, match="cannot use int"):
        open_data(42, "in", (1, 1, 4, 4))


def test_reader_nan_is_reported_with_sample_index():
    arrays = [np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 1, 4, 4), np.float32)]
    arrays[1][1, 0, 2, 2] = np.inf
    source = open_data([{"in": a} for a in arrays], "in", (1, 1, 4, 4))
    with pytest.raises(BadInputError, match="sample 3 contains NaN or inf"):
        to_arrays(source)


# --------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        open_data(tmp_path / "nope", "in", GRAY8)


def test_empty_folder_and_folder_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no images found"):
        open_data(tmp_path / "empty", "in", GRAY8)
    (tmp_path / "classes" / "a").mkdir(parents=True)
    (tmp_path / "classes" / "a" / "readme.txt").write_text("hi")
    with pytest.raises(BadInputError, match="no images found"):
        open_data(tmp_path / "classes", "in", GRAY8)


def test_npz_without_x_lists_its_arrays(tmp_path):
    path = write_npz(tmp_path / "d.npz", images=pixels(1, 8, 8), y=np.zeros(1))
    with pytest.raises(BadInputError, match=r"no array 'x' \(it has: images, y\)"):
        open_data(path, "in", GRAY8)


def test_unreadable_npz_and_unknown_file_kind(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(BadInputError, match="cannot read npz"):
        open_data(tmp_path / "bad.npz", "in", GRAY8)
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(BadInputError, match="cannot use data file"):
        open_data(tmp_path / "data.csv", "in", GRAY8)


@pytest.mark.parametrize(
    ("x", "shape", "message"),
    [
        (np.zeros((2, 5, 7, 9), np.uint8), GRAY8, r"shape \(2, 5, 7, 9\)"),
        (np.zeros((2, 8), np.uint8), GRAY8, r"shape \(2, 8\)"),
        (np.zeros((2, 3, 8, 8), np.uint8), (1, 2, 8, 8), "has 3 channels but the model expects 2"),
        (np.zeros((2, 8, 8), np.int32), GRAY8, "dtype int32"),
    ],
)
def test_data_that_does_not_fit_the_model(tmp_path, x, shape, message):
    with pytest.raises(BadInputError, match=message):
        open_data(write_npz(tmp_path / "d.npz", x=x), "in", shape)


@pytest.mark.parametrize("shape", [(8, 8, 3), (8, 8, 4), (8, 8, 1)])
def test_one_image_with_channels_last_is_not_read_as_rows_of_samples(tmp_path, shape):
    """x of one (H, W, C) image read as (N, H, W) gave 8 samples of 8x3 pixels, stretched to the
    model's size: calibration or eval on stripes, without a word."""
    x = pixels(1, 8, 8, shape[2])[0]
    with pytest.raises(BadInputError, match=rf"shape \({shape[0]}, 8, {shape[2]}\).*x\[None\]"):
        open_data(write_npz(tmp_path / "d.npz", x=x), "in", RGB8)
    if shape[2] != 4:  # as advised: one sample
        got, _ = to_arrays(open_data(write_npz(tmp_path / "d.npz", x=x[None]), "in", GRAY8))
        assert got.shape == (1, 1, 8, 8)


def test_arrays_an_npz_holds_beside_what_is_read_are_named(tmp_path):
    """Arrays that are neither fed nor labels (`labels` for y, a second image array) are left
    out, and the data line says so rather than dropping them without a word."""
    from onnx_mbs.data.ready import DeclaredInput

    x = pixels(4, 8, 8)
    images = open_data(write_npz(tmp_path / "a.npz", x=x, labels=np.zeros(4)), "in", GRAY8)
    assert images.description.endswith("labels: no; ignored arrays: labels")
    ready = {"in": np.zeros((4, 1, 8, 8), np.float32), "y": np.zeros(4, np.int64), "x": x}
    declared = [DeclaredInput("in", (None, 1, 8, 8), np.dtype(np.float32))]
    source = open_data(write_npz(tmp_path / "b.npz", **ready), "in", GRAY8, inputs=declared)
    assert source.description.endswith("labels: yes; ignored arrays: x")
    plain = open_data(write_npz(tmp_path / "c.npz", x=x, y=np.zeros(4)), "in", GRAY8)
    assert "ignored" not in plain.description


def test_normalised_floats_for_an_input_named_x_say_how_to_feed_them(tmp_path):
    """An npz x is image data for a model whose only input is named x: normalised floats are
    refused, and the refusal now says why they were not fed as they are and what to do."""
    from onnx_mbs.data.ready import DeclaredInput

    x = np.random.default_rng(0).normal(size=(4, 1, 8, 8)).astype(np.float32)
    declared = [DeclaredInput("x", (None, 1, 8, 8), np.dtype(np.float32))]
    path = write_npz(tmp_path / "d.npz", x=x)
    with pytest.raises(BadInputError, match=r"neither \[0, 1\].*named x.*read as images.*\[\{'x'"):
        open_data(path, "x", GRAY8, inputs=declared)
    with pytest.raises(BadInputError, match="neither") as refused:  # other inputs: as before
        open_data(path, "in", GRAY8)
    assert "named x" not in str(refused.value)


def test_label_problems(tmp_path):
    x = pixels(4, 8, 8)
    with pytest.raises(BadInputError, match="3 labels for 4 samples"):
        open_data(write_npz(tmp_path / "a.npz", x=x, y=np.arange(3)), "in", GRAY8)
    with pytest.raises(BadInputError, match="not whole numbers"):
        open_data(write_npz(tmp_path / "b.npz", x=x, y=np.full(4, 0.5)), "in", GRAY8)
    with pytest.raises(BadInputError, match=r"shape \(4, 2\)"):
        open_data(write_npz(tmp_path / "c.npz", x=x, y=np.zeros((4, 2))), "in", GRAY8)
    # Past int64 they would wrap to negative indices (an IndexError when scored).
    for k, huge in enumerate((np.full(4, 1e20), np.full(4, 2**63, np.uint64))):
        with pytest.raises(BadInputError, match="expected class indices"):
            open_data(write_npz(tmp_path / f"d{k}.npz", x=x, y=huge), "in", GRAY8)


def test_nan_in_npz_names_the_sample(tmp_path):
    x = np.random.default_rng(0).random((5, 8, 8), dtype=np.float32)
    x[3, 1, 1] = np.nan
    source = open_data(write_npz(tmp_path / "d.npz", x=x), "in", GRAY8)
    batches = source.batches(2)
    assert len(next(batches).x) == 2  # the clean first batch streams fine
    with pytest.raises(BadInputError, match="sample 3 contains NaN"):
        next(batches)


@pytest.mark.parametrize("limit", [0, -3])
def test_non_positive_limit(tmp_path, limit):
    with pytest.raises(BadInputError, match="limit must be a positive"):
        open_data(write_npz(tmp_path / "d.npz", x=pixels(2, 8, 8)), "in", GRAY8, limit=limit)


def test_bad_mean_std_and_model_shape(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=pixels(2, 8, 8, 3))
    with pytest.raises(BadInputError, match="std must be positive"):
        open_data(path, "in", RGB8, std=0)
    with pytest.raises(BadInputError, match="must be 1 or 3"):
        open_data(path, "in", RGB8, mean=(0.1, 0.2))
    with pytest.raises(BadInputError, match="not a number"):
        open_data(path, "in", RGB8, metadata={"onnx_mbs.mean": "a,b,c"})
    with pytest.raises(BadInputError, match="fixed C, H, W"):
        open_data(path, "in", (1, 3, "h", "w"))


def test_split_suffix_only_for_idx_folders(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=pixels(2, 8, 8))
    with pytest.raises(BadInputError, match="only applies to IDX"):
        open_data(f"{path}:train", "in", GRAY8)


def test_batch_size_must_be_positive(tmp_path):
    source = open_data(write_npz(tmp_path / "d.npz", x=pixels(2, 8, 8)), "in", GRAY8)
    with pytest.raises(BadInputError, match="batch size"):
        next(source.batches(0))


def size_then_image_model():
    """Two inputs, an int64 `size` (N, 2) declared before the float image `input` (N, 1, 8, 8),
    as detectors declare an image-size input: Conv -> Relu -> Conv -> Relu, scaled by the
    sum of `size`."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
        "w2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32),
        "axis": np.array([1], np.int64),
    }
    node = helper.make_node
    nodes = [
        node("Cast", ["size"], ["sizes"], to=TensorProto.FLOAT),
        node("ReduceSum", ["sizes", "axis"], ["total"], keepdims=1),
        node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        node("Relu", ["c1"], ["r1"]),
        node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        node("Relu", ["c2"], ["r2"]),
        node("GlobalAveragePool", ["r2"], ["pooled"]),
        node("Flatten", ["pooled"], ["flat"]),
        node("Mul", ["flat", "total"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "size_then_image",
        [
            helper.make_tensor_value_info("size", TensorProto.INT64, ["n", 2]),
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 8, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_model_ready_int64_input_declared_first_is_fed_as_it_is(tmp_path):
    """docs/data.md: model-ready arrays are fed as they are, int64 ones included. An int64
    input declared before the image was taken as the one to measure and refused as 'expected
    a float image tensor'."""
    from onnx_mbs.data.fit import open_for_model
    from onnx_mbs.pipeline import reduce

    model = size_then_image_model()
    size = np.tile(np.array([[3, 4]], np.int64), (6, 1))
    x = np.random.default_rng(1).random((6, 1, 8, 8), dtype=np.float32)
    path = write_npz(tmp_path / "ready.npz", size=size, input=x)
    source = open_for_model(path, model)
    (batch,) = source.batches(64)
    assert source.input_name == "input" and batch.x.dtype == np.float32
    np.testing.assert_array_equal(batch.extra["size"], size)
    _, report = reduce(model, path, progress=False, evaluate_accuracy=False)
    assert report.samples == 6
    assert 0 < report.rho["conv1"] < 1 and 0 < report.rho["conv2"] < 1


def test_several_inputs_refused_by_to_arrays_name_the_whole_file(tmp_path):
    """The npz was named by its description cut at the first ':' ('model-ready npz run')."""
    from onnx_mbs.data.ready import DeclaredInput

    declared = [
        DeclaredInput("in", (None, 1, 4, 4), np.dtype(np.float32)),
        DeclaredInput("scale", (None,), np.dtype(np.float32)),
    ]
    x = np.zeros((2, 1, 4, 4), np.float32)
    path = write_npz(tmp_path / "run:1.npz", **{"in": x, "scale": np.ones(2, np.float32)})
    source = open_data(path, "in", (1, 1, 4, 4), inputs=declared)
    with pytest.raises(BadInputError, match=r"^model-ready npz run:1\.npz gives several"):
        to_arrays(source)


@pytest.mark.parametrize("shape", [(2, 70, 60), (2, 1, 70, 60), (2, 70, 60, 3)])
def test_npz_images_past_the_pixel_limit_are_refused(tmp_path, monkeypatch, shape):
    """Image folders refuse images past MAX_IMAGE_PIXELS before decoding; an npz's samples
    are held to the same limit before their float copies are made (a batch of 64 such RGB
    samples would take 26 GB)."""
    import onnx_mbs.data.spec as spec

    monkeypatch.setattr(spec, "MAX_IMAGE_PIXELS", 70 * 60 - 1)
    path = write_npz(tmp_path / "d.npz", x=np.zeros(shape, np.uint8))
    with pytest.raises(BadInputError, match=r"d.npz x holds images of 70 x 60 pixels, more than"):
        open_data(path, "in", GRAY8)
    monkeypatch.setattr(spec, "MAX_IMAGE_PIXELS", 70 * 60)
    assert to_arrays(open_data(path, "in", GRAY8))[0].shape == (2, 1, 8, 8)


def uint8_image_model():
    """A model taking uint8 images (N, 1, 8, 8), as deployed graphs do: Cast -> Sub -> Div
    normalise inside the graph, then Conv -> Relu -> Conv -> Relu -> pool -> 8 class scores."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "mean": np.array(127.5, np.float32),
        "std": np.array(64.0, np.float32),
        "w1": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
        "w2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32),
    }
    node = helper.make_node
    nodes = [
        node("Cast", ["input"], ["pixels"], to=TensorProto.FLOAT),
        node("Sub", ["pixels", "mean"], ["centred"]),
        node("Div", ["centred", "std"], ["normalised"]),
        node("Conv", ["normalised", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        node("Relu", ["c1"], ["r1"]),
        node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        node("Relu", ["c2"], ["r2"]),
        node("GlobalAveragePool", ["r2"], ["pooled"]),
        node("Flatten", ["pooled"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "uint8_image",
        [helper.make_tensor_value_info("input", TensorProto.UINT8, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_model_ready_uint8_images_are_fed_as_they_are(tmp_path):
    """docs/data.md: model-ready data is fed as it is, its dtype the input's own. A model
    taking uint8 images was refused with model-ready uint8 data ("has type tensor(uint8);
    expected a float image tensor"), so it could be neither calibrated nor evaluated."""
    from onnx_mbs.data.fit import open_for_model
    from onnx_mbs.evaluate import agreement, evaluate
    from onnx_mbs.pipeline import reduce
    from onnx_mbs.runtime import CPU

    model = uint8_image_model()
    x = np.random.default_rng(1).integers(0, 256, (6, 1, 8, 8)).astype(np.uint8)
    y = np.arange(6) % 8
    path = write_npz(tmp_path / "ready.npz", input=x, y=y)
    _, report = reduce(model, path, progress=False, evaluate_accuracy=False)
    assert report.samples == 6
    assert 0 < report.rho["conv1"] < 1 and 0 < report.rho["conv2"] < 1
    result = evaluate(model, path, [CPU], progress=False)
    assert result.samples == 6 and result.nonfinite == 0
    agreed = agreement(model, model, open_for_model(path, model), [CPU], progress=False)
    assert agreed.samples == 6
    images = write_npz(tmp_path / "images.npz", x=x[:, 0], y=y)  # preprocessed to float
    with pytest.raises(BadInputError, match=r"tensor\(uint8\); .* a model-ready .npz, an array"):
        evaluate(model, images, [CPU], progress=False)


def test_evaluate_takes_the_input_shapes_its_refusal_asks_for(tmp_path):
    """onnx_mbs.evaluate of a model with dynamic H and W from a data spec refused asking for
    `input_shapes={...}`, a keyword it did not take (TypeError when given)."""
    from graphs import dynamic_input_model

    from onnx_mbs.evaluate import evaluate
    from onnx_mbs.runtime import CPU

    model = dynamic_input_model()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 12, 10, 3), dtype=np.uint8)
    path = write_npz(tmp_path / "images.npz", x=x, y=np.arange(6) % 5)
    with pytest.raises(BadInputError, match=r"input_shapes=\{'input': \[1, 3, HEIGHT, WIDTH\]\}"):
        evaluate(model, path, [CPU], progress=False)
    result = evaluate(model, path, [CPU], progress=False, input_shapes={"input": [1, 3, 12, 10]})
    assert result.samples == 6


def test_model_ready_uint8_images_for_an_input_named_x_are_fed_as_they_are(tmp_path):
    """An npz x is image data for a model whose only 4-D input is named x, read as floats;
    for a uint8 input so named that was a dead end: refused as not a float input, "to feed it
    as it is: a model-ready .npz, an array named 'x'", which the npz was. Images are never fed
    to a uint8 input, so there the npz x is model-ready, as docs/data.md says of an npz naming
    every input."""
    from onnx_mbs.evaluate import evaluate
    from onnx_mbs.runtime import CPU

    model = uint8_image_model()
    model.graph.input[0].name = model.graph.node[0].input[0] = "x"
    x = np.random.default_rng(1).integers(0, 256, (6, 1, 8, 8)).astype(np.uint8)
    path = write_npz(tmp_path / "ready.npz", x=x, y=np.arange(6) % 8)
    result = evaluate(model, path, [CPU], progress=False)
    assert result.samples == 6 and result.nonfinite == 0
