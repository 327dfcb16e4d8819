"""Datasets for the experiments: idx files (MNIST, Fashion-MNIST), MultiMNIST, 8x8 digits.

The idx reader needs only ``gzip`` and numpy. Files are looked up in a data directory,
checked against their published md5 sums and, where the machine is online and the caller
allows it, downloaded. When neither works, :class:`DatasetNotFoundError` says which files
to put where.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "ChecksumError",
    "ClassificationData",
    "DataFileError",
    "DatasetNotFoundError",
    "IdxDataset",
    "MultiMnistData",
    "RegressionData",
    "load_digits_data",
    "load_idx_dataset",
    "load_uci",
    "locate_idx_files",
    "make_multi_pair",
    "make_multimnist",
    "md5sum",
    "read_idx",
    "stratified_split",
]

# idx type codes (third byte of the magic number) -> big-endian numpy dtype
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are neither in the data directory nor downloadable."""


class ChecksumError(ValueError):
    """A data file's md5 differs from the published one (truncated or wrong file)."""


class DataFileError(ValueError):
    """A data file cannot be read as what it should be (truncated, not gzip, not idx,
    labels out of range); the message names the file."""


@dataclass(frozen=True)
class IdxDataset:
    """The four idx files of an MNIST-format dataset and where to download them.

    Attributes:
        name: directory name under the data directory (``"mnist"``).
        files: split key (``"train-images"``, ...) -> (file name, md5 of the .gz file).
        mirrors: base URLs tried in order.
    """

    name: str
    files: dict[str, tuple[str, str]]
    mirrors: tuple[str, ...]


DATASETS: dict[str, IdxDataset] = {
    "mnist": IdxDataset(
        "mnist",
        {
            "train-images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            "train-labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            "test-images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            "test-labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        },
        (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
    ),
    "fashion-mnist": IdxDataset(
        "fashion-mnist",
        {
            "train-images": ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            "train-labels": ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            "test-images": ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            "test-labels": ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        },
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    ),
}


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_idx(path: str | Path, md5: str | None = None) -> np.ndarray:
    """Read an idx file (gzip-compressed when the name ends in ``.gz``) into an array.

    The idx format: two zero bytes, a type code, the number of dimensions ``d``, then ``d``
    big-endian int32 sizes and the data in row-major order.

    Args:
        path: the file.
        md5: when given, the file's md5 must equal it, else :class:`ChecksumError`.

    Returns:
        An array of the stored shape, in the native byte order.

    Raises:
        ChecksumError: the md5 differs.
        ValueError: the file is not a well-formed idx file (bad magic, truncated data).
    """
    path = Path(path)
    if md5 is not None:
        got = md5sum(path)
        if got != md5:
            raise ChecksumError(
                f"md5 mismatch for {path}: expected {md5}, got {got} "
                "(the file is truncated or not the published one; delete it and fetch it again)"
            )
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataFileError(
            f"{path} is not a complete gzip file ({type(exc).__name__}: {exc}); "
            "it is truncated or not what its name says: replace it"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFileError(f"{path} is not an idx file (magic bytes {raw[:4].hex() or 'missing'})")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFileError(f"{path}: truncated idx header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise DataFileError(
            f"{path}: idx header declares shape {shape} ({count * dtype.itemsize} bytes of "
            f"data) but the file holds {len(raw) - header} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
    return data.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _download(urls: list[str], target: Path, md5: str, timeout: float) -> str | None:
    """Fetch the first URL that yields a file with the right md5; return an error or None."""
    errors = []
    target.parent.mkdir(parents=True, exist_ok=True)
    for url in urls:
        fd, name = tempfile.mkstemp(dir=target.parent, suffix=".part")
        tmp_path = Path(name)
        try:
            with os.fdopen(fd, "wb") as tmp, urllib.request.urlopen(url, timeout=timeout) as resp:
                shutil.copyfileobj(resp, tmp)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            errors.append(f"{url}: {exc}")
            tmp_path.unlink(missing_ok=True)
            continue
        got = md5sum(tmp_path)
        if got != md5:
            errors.append(f"{url}: md5 {got}, expected {md5}")
            tmp_path.unlink(missing_ok=True)
            continue
        tmp_path.replace(target)
        return None
    return "; ".join(errors)


def locate_idx_files(
    dataset: str | IdxDataset,
    data_dir: str | Path,
    *,
    download: bool = True,
    verify: bool = True,
    timeout: float = 30.0,
) -> dict[str, Path]:
    """Find (or download) the four files of an idx dataset and check their md5 sums.

    A file is looked for in ``data_dir/<name>/``, ``data_dir/`` and
    ``data_dir/<NAME>/raw/`` (torchvision's layout), in that order. Missing files are
    downloaded into ``data_dir/<name>/`` when ``download`` is true. Downloads are always
    md5-checked; local files too unless ``verify`` is false (a copy re-compressed by hand,
    or synthetic test files).

    Raises:
        DatasetNotFoundError: a file is missing and could not be downloaded; the message
            names the files and the directory to put them in.
        ChecksumError: a file is present but its md5 is wrong.
    """
    info = DATASETS[dataset] if isinstance(dataset, str) else dataset
    root = Path(data_dir).expanduser()
    candidates = [root / info.name, root, root / info.name.upper() / "raw"]
    if info.name == "fashion-mnist":
        candidates.append(root / "FashionMNIST" / "raw")
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, (fname, md5) in info.files.items():
        path = next((d / fname for d in candidates if (d / fname).is_file()), None)
        if path is None:
            missing.append(key)
            continue
        # even without verification, a file that is another known data set's is a mix-up
        got = md5sum(path)
        other = _KNOWN_FILES.get(got)
        if got != md5 and other is not None:
            raise ChecksumError(
                f"{path} is {other[0]}'s {other[1]}, not {info.name}'s: point --data-dir at "
                f"a folder with the {info.name} files (or its parent, with them in "
                f"{info.name}/)"
            )
        if verify and got != md5:
            raise ChecksumError(
                f"md5 mismatch for {path}: expected {md5}, got {got} "
                "(the file is truncated or not the published one; replace it, or pass "
                "--no-verify for a copy you trust)"
            )
        found[key] = path
    target_dir = root / info.name
    created = not target_dir.exists()
    failures = []
    for key in missing:
        fname, md5 = info.files[key]
        target = root / info.name / fname
        reason = (
            _download([m + fname for m in info.mirrors], target, md5, timeout)
            if download
            else "downloading disabled"
        )
        if reason is None:
            found[key] = target
        else:
            failures.append(f"{fname} ({reason})")
    if failures:
        # a failed download must not leave an empty dataset folder that looks like data
        if created and target_dir.is_dir() and not any(target_dir.iterdir()):
            target_dir.rmdir()
        names = ", ".join(info.files[k][0] for k in info.files)
        raise DatasetNotFoundError(
            f"{info.name} data not found in {root / info.name} and could not be downloaded: "
            + "; ".join(failures)
            + f". Put the four files ({names}) into {root / info.name} "
            "or pass --data-dir DIR with DIR/" + info.name + " holding them."
        )
    return found


# md5 -> (data set, file) of every known file, to name a mix-up of data sets
_KNOWN_FILES: dict[str, tuple[str, str]] = {
    md5: (info.name, fname) for info in DATASETS.values() for fname, md5 in info.files.values()
}


@dataclass
class ClassificationData:
    """Train and test tensors of an image classification set (images kept as uint8).

    Attributes:
        train_x, test_x: ``(N, H, W)`` uint8 (or ``(N, D)`` float for digits).
        train_y, test_y: ``(N,)`` int64 class labels.
        mean, std: normalisation applied to ``x / scale`` before the model.
        scale: divisor that maps the stored values to [0, 1].
        num_classes: number of classes.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    mean: float
    std: float
    scale: float
    num_classes: int = 10

    def limit(self, train: int | None, test: int | None) -> ClassificationData:
        """The first ``train`` training and ``test`` test examples (``None``: all)."""
        return ClassificationData(
            self.train_x[:train],
            self.train_y[:train],
            self.test_x[:test],
            self.test_y[:test],
            self.mean,
            self.std,
            self.scale,
            self.num_classes,
        )


@functools.lru_cache(maxsize=2)
def _read_all(files: tuple[tuple[str, str, int], ...]) -> dict[str, np.ndarray]:
    # Decompressing the training images takes a second or two; a process that runs several
    # experiments (tests, notebooks) reads them once. Keyed by path and mtime; callers copy.
    return {key: read_idx(path) for key, path, _ in files}


# Normalisation constants of the PyTorch MNIST example (and their Fashion-MNIST analogues).
_NORMALIZE = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}


def load_idx_dataset(
    dataset: str, data_dir: str | Path, *, download: bool = True, verify: bool = True
) -> ClassificationData:
    """Load MNIST or Fashion-MNIST from idx files (see :func:`locate_idx_files`)."""
    paths = locate_idx_files(dataset, data_dir, download=download, verify=verify)
    arrays = _read_all(tuple(sorted((k, str(p), p.stat().st_mtime_ns) for k, p in paths.items())))
    for split in ("train", "test"):
        images, labels = arrays[f"{split}-images"], arrays[f"{split}-labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DataFileError(
                f"{paths[f'{split}-images']}, {paths[f'{split}-labels']}: {dataset} {split} "
                f"needs (N, H, W) images and (N,) labels, got {images.shape} and {labels.shape}"
            )
        if len(images) != len(labels):
            raise DataFileError(
                f"{paths[f'{split}-labels']}: {dataset} {split} has {len(images)} images "
                f"but {len(labels)} labels"
            )
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < 10:
            raise DataFileError(
                f"{paths[f'{split}-labels']}: labels must lie in 0..9, found "
                f"{int(labels.min())}..{int(labels.max())}"
            )
    mean, std = _NORMALIZE[dataset]
    return ClassificationData(
        torch.from_numpy(arrays["train-images"].copy()),
        torch.from_numpy(arrays["train-labels"].astype(np.int64)),
        torch.from_numpy(arrays["test-images"].copy()),
        torch.from_numpy(arrays["test-labels"].astype(np.int64)),
        mean,
        std,
        255.0,
    )


DIGITS_FILE = Path(__file__).with_name("digits.npz")


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices with every class split in the same proportion, seeded.

    Each class's examples are shuffled by ``numpy.random.default_rng(seed)`` and its first
    ``round(n_c * test_fraction)`` go to the test set; both index arrays come back sorted.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"Invalid test_fraction: {test_fraction} (expected 0 < test_fraction < 1)")
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[: round(len(members) * test_fraction)])
    test_index = np.sort(np.concatenate(test))
    train_index = np.setdiff1d(np.arange(len(labels)), test_index)
    return train_index, test_index


def load_digits_data(test_fraction: float = 0.25, split_seed: int = 0) -> ClassificationData:
    """The 8x8 handwritten digits (1797 images, bundled with the package), split stratified
    and seeded (:func:`stratified_split`).

    The images are the UCI "Optical Recognition of Handwritten Digits" test set as
    scikit-learn bundles it (``digits.npz``, CC BY 4.0, see ``DIGITS_LICENSE.txt``),
    flattened to 64 features in [0, 16]; no file outside the package, no network, and no
    scikit-learn (its 190 MB with SciPy were only needed for these 45 kB).
    """
    with np.load(DIGITS_FILE) as blob:
        x, y = blob["images"].astype(np.float32), blob["labels"].astype(np.int64)
    train, test = stratified_split(y, test_fraction, split_seed)
    return ClassificationData(
        torch.from_numpy(x[train]),
        torch.from_numpy(y[train]),
        torch.from_numpy(x[test]),
        torch.from_numpy(y[test]),
        0.0,
        1.0,
        16.0,
    )


@dataclass
class MultiMnistData:
    """MultiMNIST: two digits overlaid on a 36x36 canvas.

    Attributes:
        train_x, test_x: ``(N, 36, 36)`` uint8 images.
        train_y, test_y: ``(N, 2)`` int64 labels: column 0 the upper-left digit, 1 the
            lower-right one.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def make_multimnist(
    images: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    *,
    seed: int = 0,
    size: int = 36,
    shift: int = 4,
) -> tuple[Tensor, Tensor]:
    """Overlay pairs of digits into MultiMNIST images, deterministically given ``seed``.

    Image ``n`` puts digit ``n`` shifted up-left by ``shift`` pixels from the centre of a
    ``size x size`` canvas and digit ``perm[n]`` (``perm`` a permutation drawn from
    ``seed``) shifted down-right by the same amount; overlapping pixels take the maximum
    (Sener & Koltun 2018 build theirs the same way, then resize to 28x28; we keep 36x36).

    Args:
        images: ``(N, 28, 28)`` uint8 digits.
        labels: ``(N,)`` their classes.
        seed: seed of the pairing permutation.
        size: canvas side.
        shift: offset of each digit from the centre, in pixels.

    Returns:
        ``(N, size, size)`` uint8 images and ``(N, 2)`` int64 labels (left, right).
    """
    imgs = torch.as_tensor(np.asarray(images)).to(torch.uint8)
    labs = torch.as_tensor(np.asarray(labels)).to(torch.int64)
    if imgs.dim() != 3 or imgs.shape[0] != labs.shape[0]:
        raise ValueError(
            f"expected (N, H, W) images and (N,) labels, got {tuple(imgs.shape)} and "
            f"{tuple(labs.shape)}"
        )
    return make_multi_pair(imgs, labs, imgs, labs, seed=seed, size=size, shift=shift)


def make_multi_pair(
    left_images: Tensor | np.ndarray,
    left_labels: Tensor | np.ndarray,
    right_images: Tensor | np.ndarray,
    right_labels: Tensor | np.ndarray,
    *,
    seed: int = 0,
    size: int = 36,
    shift: int = 4,
) -> tuple[Tensor, Tensor]:
    """Overlay item ``n`` of one set (upper left) with item ``perm[n]`` of another (lower
    right), as :func:`make_multimnist` does within one set.

    Multi-(Fashion+MNIST) of Lin et al. (NeurIPS 2019, "Pareto Multi-Task Learning") puts
    an MNIST digit and a Fashion-MNIST item on one canvas: ``left`` MNIST, ``right``
    Fashion-MNIST. The output has as many images as ``left``; ``perm`` is drawn from
    ``seed`` over the first ``len(left)`` items of ``right``.
    """
    li = torch.as_tensor(np.asarray(left_images)).to(torch.uint8)
    ri = torch.as_tensor(np.asarray(right_images)).to(torch.uint8)
    if ri.shape[0] < li.shape[0] or ri.shape[1:] != li.shape[1:]:
        raise ValueError(
            f"expected at least {li.shape[0]} right images of shape {tuple(li.shape[1:])}, "
            f"got {tuple(ri.shape)}"
        )
    n = li.shape[0]
    h, w = li.shape[1:]
    centre_r, centre_c = (size - h) // 2, (size - w) // 2
    if not 0 <= shift <= min(centre_r, centre_c):
        raise ValueError(
            f"Invalid shift: {shift} (expected 0 <= shift <= {min(centre_r, centre_c)} for "
            f"{h}x{w} images on a {size}x{size} canvas)"
        )
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    out = torch.zeros((n, size, size), dtype=torch.uint8)
    r0, c0 = centre_r - shift, centre_c - shift
    out[:, r0 : r0 + h, c0 : c0 + w] = li
    r1, c1 = centre_r + shift, centre_c + shift
    out[:, r1 : r1 + h, c1 : c1 + w] = torch.maximum(out[:, r1 : r1 + h, c1 : c1 + w], ri[perm])
    ll = torch.as_tensor(np.asarray(left_labels)).to(torch.int64)
    rl = torch.as_tensor(np.asarray(right_labels)).to(torch.int64)[:n]
    return out, torch.stack([ll, rl[perm]], dim=1)


@dataclass
class RegressionData:
    """A multi-target regression set, split into train and test (float32, unscaled).

    Attributes:
        train_x, test_x: ``(N, D)`` features.
        train_y, test_y: ``(N, T)`` targets.
        feature_names, target_names: column names.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    feature_names: list[str]
    target_names: list[str]


UCI_SETS = {
    "energy": ("uci-energy-efficiency", "ENB2012_data.csv", "b45a72adaaa11663c39bd6eff2b9222a"),
    "parkinsons": (
        "uci-parkinsons-telemonitoring",
        "parkinsons_updrs.data",
        "4f97310e2c9fbeedb72e8a37822fee45",
    ),
}


def _read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    import csv

    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [r for r in reader if r]
    try:
        values = np.array([[float(v) for v in r] for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise DataFileError(f"{path}: not a numeric CSV table ({exc})") from None
    if values.ndim != 2 or values.shape[1] != len(header):
        raise DataFileError(f"{path}: rows do not match the {len(header)} header columns")
    return header, values


def load_uci(
    name: str, data_dir: str | Path, *, verify: bool = True, test_fraction: float = 0.2
) -> RegressionData:
    """UCI Energy Efficiency or Parkinsons Telemonitoring as two-target regression.

    ``"energy"`` (Tsanas & Xifara 2012): 768 buildings, features X1..X8, targets heating
    load Y1 and cooling load Y2; a random split drawn from a fixed seed. ``"parkinsons"``
    (Tsanas et al. 2010): 5875 recordings of 42 subjects, features age, sex, test_time and
    the 16 voice measures, targets motor and total UPDRS; split by subject (every fifth
    subject id in the test set), so that no subject is in both.

    The file is looked for in ``data_dir/<set dir>/`` and ``data_dir/``; its md5 is
    checked unless ``verify`` is false. No download (the UCI site is not a stable
    mirror): a missing file raises :class:`DatasetNotFoundError`.
    """
    if name not in UCI_SETS:
        raise ValueError(f"Invalid UCI set: {name!r} (expected one of {tuple(UCI_SETS)})")
    sub, file, md5 = UCI_SETS[name]
    root = Path(data_dir)
    candidates = [root / sub / file, root / file]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DatasetNotFoundError(
            f"UCI {name}: {file} not found in {root / sub} or {root}; put the file there "
            "(see ../shared/data/README.md for its provenance and md5)"
        )
    if verify and md5sum(path) != md5:
        raise ChecksumError(f"{path}: md5 {md5sum(path)} differs from the expected {md5}")
    header, table = _read_csv(path)
    if name == "energy":
        targets = ["Y1", "Y2"]
        features = [h for h in header if h.startswith("X")]
        test = np.zeros(len(table), dtype=bool)
        order = np.random.default_rng(0).permutation(len(table))
        test[order[: round(test_fraction * len(table))]] = True
    else:
        targets = ["motor_UPDRS", "total_UPDRS"]
        features = [h for h in header if h not in ("subject#", *targets)]
        test = table[:, header.index("subject#")].astype(np.int64) % 5 == 0
    missing = [c for c in (*features, *targets) if c not in header]
    if missing:
        raise DataFileError(f"{path}: missing columns {missing}")
    x = table[:, [header.index(c) for c in features]]
    y = table[:, [header.index(c) for c in targets]]

    def t(a: np.ndarray) -> Tensor:
        return torch.tensor(a, dtype=torch.float32)

    return RegressionData(t(x[~test]), t(y[~test]), t(x[test]), t(y[test]), features, targets)
