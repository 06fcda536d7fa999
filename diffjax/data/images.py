"""Image and array datasets and a grain input pipeline: shuffled, sharded per process,
checkpointable.

Every pipeline yields batches ``{"image": float32 [B, *shape], "label": int32 [B]}``, ``B`` being
the per-process batch size and ``shape`` that of one example: ``(H, W, C)`` for images, ``(d,)``
for vectors (2D points are ``(2,)``); the key is ``"image"`` for both. Pixels are mapped to the
model range by ``x = 2 u / 255 - 1`` for ``uint8`` data (the DDPM convention, Ho et al. 2020,
https://arxiv.org/abs/2006.11239, Sec. 3.3); float data are mapped affinely from a stated
``value_range`` when loaded, or kept as they are (``keep_values``; the default for vectors).

Sources (names resolved once, by :func:`get_dataset` / :func:`load_arrays`):

* ``"digits"``: scikit-learn's 8x8 handwritten digits (1797 images, values 0..16, shipped with
  scikit-learn, no download), as ``[1797, 8, 8, 1]``.
* ``"npz"``: arrays in a NumPy ``.npz`` file (read with ``allow_pickle=False``, always): images
  ``[N, H, W, C]`` / ``[N, C, H, W]`` or vectors ``[N, d]``.
* ``"folder"``: ``root/<class_name>/*.png|jpg|jpeg``, read with PIL; labels index the sorted
  class directory names.
* ``"tfds"``: a TensorFlow Datasets random-access source (``tfds.data_source``), when
  ``tensorflow-datasets`` is installed and the dataset is prepared in ``array_record`` format.

CIFAR-10 from a local copy: the "python version" batches of the official archive are pickles,
which diffjax never reads. Convert them once, in an environment you trust, to ``.npz``::

  import numpy as np, torchvision
  ds = torchvision.datasets.CIFAR10(root, train=True, download=True)   # ds.data: uint8 NHWC
  np.savez("cifar10_train.npz", image=ds.data, label=np.asarray(ds.targets, np.int32))

(or ``tfds.as_numpy(tfds.load("cifar10", split="train", batch_size=-1))`` for the arrays), then
use ``get_dataset("npz", path="cifar10_train.npz")``. An image folder works as well.

Checkpointing: the iterator of :func:`make_loader` is a ``grain.DataLoaderIterator``; its state
(:func:`iterator_state`, a small JSON-able dict) restores the exact continuation of the stream
(:func:`restore_iterator`). Inside an orbax ``CheckpointManager``, save the iterator itself with
``grain.checkpoint.CheckpointSave(iterator)`` / ``grain.checkpoint.CheckpointRestore(iterator)``.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np

from diffjax._lookup import lookup

__all__ = [
  "DatasetTooSmallError",
  "ImageSource",
  "TfdsImageSource",
  "load_digits",
  "load_npz",
  "load_folder",
  "tfds_source",
  "ARRAY_LOADERS",
  "load_arrays",
  "DATASETS",
  "get_dataset",
  "to_model_range",
  "from_model_range",
  "take",
  "make_loader",
  "iterator_state",
  "restore_iterator",
]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_LAYOUT_TO_NHWC = {"NHWC": (0, 1, 2, 3), "NCHW": (0, 2, 3, 1)}


# ------------------------------------------------------------------------------------------------
# Validation shared by every in-memory source.


def _wrong_rank(shape: tuple[int, ...], *, origin: str) -> str:
  return (
    f"arrays from {origin} have shape {shape}; expected 4-D images [N, H, W, C] or 2-D "
    "vectors [N, d]. Add a channel axis to grayscale images (images[..., None]), reshape "
    "scalars to [N, 1], or pass layout='NCHW' for channel-first images"
  )


def _validate_arrays(images: np.ndarray, labels: np.ndarray, *, origin: str) -> None:
  """Raises one clear ValueError for arrays a pipeline cannot use; ``origin`` names the data.

  ``images`` are 4-D images ``[N, H, W, C]`` or 2-D vectors ``[N, d]``.
  """
  if images.ndim not in (2, 4):
    raise ValueError(_wrong_rank(images.shape, origin=origin))
  if images.shape[0] == 0:
    raise ValueError(f"{origin} holds no images (shape {images.shape}); it must not be empty")
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise ValueError(
      f"labels from {origin} have shape {labels.shape} but images have shape {images.shape}; "
      f"expected labels of shape [{images.shape[0]}], one integer per image"
    )
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels from {origin} have dtype {labels.dtype}; expected integers")
  if images.dtype != np.uint8:
    if images.dtype != np.float32:
      raise ValueError(
        f"images from {origin} have dtype {images.dtype}; expected uint8 in "
        "[0, 255] or float32 in [-1, 1]"
      )
    bad = int(np.size(images) - np.count_nonzero(np.isfinite(images)))
    if bad:
      raise ValueError(
        f"images from {origin} contain {bad} NaN or infinite values; clean the data before training"
      )


def _to_nhwc(images: np.ndarray, *, layout: str, origin: str) -> np.ndarray:
  """Images ``[N, H, W, C]`` from ``layout``; vectors ``[N, d]`` unchanged (layout NHWC)."""
  axes = lookup(_LAYOUT_TO_NHWC, layout, "layout", hint=f" (images from {origin})")
  if images.ndim == 2:
    if layout != "NHWC":
      raise ValueError(
        f"layout={layout!r} but {origin} holds vectors of shape {images.shape}, not images; "
        "the layout applies to 4-D images only: keep the default 'NHWC'"
      )
    return images
  if images.ndim != 4:
    raise ValueError(_wrong_rank(images.shape, origin=origin))
  # A channel-first array read as channel-last is the commonest npz mistake: catch it by shape.
  if layout == "NHWC" and images.shape[1] in (1, 3, 4) and images.shape[3] not in (1, 3, 4):
    raise ValueError(
      f"images from {origin} have shape {images.shape}, which looks channel-first;"
      " pass layout='NCHW'"
    )
  return np.ascontiguousarray(np.transpose(images, axes))


def _finite_float32(images: np.ndarray, *, origin: str) -> np.ndarray:
  images = images.astype(np.float32)
  finite = np.isfinite(images)
  if not finite.all():
    raise ValueError(
      f"arrays from {origin} contain {int(finite.size - finite.sum())} NaN or "
      "infinite values; clean the data before training"
    )
  return images


def _scale_images(
  images: np.ndarray,
  *,
  value_range: tuple[float, float] | None,
  origin: str,
  keep_values: bool = False,
) -> np.ndarray:
  """Returns uint8 images in [0, 255] unchanged, or float32 arrays mapped to [-1, 1].

  ``x = 2 (u - lo) / (hi - lo) - 1`` for ``value_range = (lo, hi)``. Without a range, integer
  images must already lie in [0, 255] (kept as uint8) and float images in [0, 1]; vectors
  (``[N, d]``) are kept as they are. ``keep_values`` keeps any data as it is (float32).
  """
  if keep_values or (value_range is None and images.ndim == 2):
    if value_range is not None:
      raise ValueError(
        f"value_range={value_range!r} and keep_values=True for {origin}: choose one (a range "
        "maps the data to [-1, 1], keep_values uses it as it is)"
      )
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
      raise ValueError(
        f"arrays from {origin} have dtype {images.dtype}; expected integers or floats"
      )
    return _finite_float32(images, origin=origin)
  if value_range is None:
    if np.issubdtype(images.dtype, np.integer):
      if images.size and (images.min() < 0 or images.max() > 255):
        raise ValueError(
          f"integer images from {origin} span [{images.min()}, {images.max()}], outside "
          "[0, 255]; pass value_range=(lo, hi) with the range of the raw values"
        )
      return images.astype(np.uint8)
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(
        f"images from {origin} have dtype {images.dtype}; expected integers or floats"
      )
    value_range = (0.0, 1.0)
  lo, hi = (float(v) for v in value_range)
  if not hi > lo:
    raise ValueError(f"value_range={value_range!r} for {origin} must be (lo, hi) with hi > lo")
  images = _finite_float32(images, origin=origin)
  mn, mx = float(images.min()), float(images.max())
  # Data outside the stated range would leave [-1, 1] silently; a small slack absorbs rounding.
  slack = 1e-6 * (hi - lo)
  if mn < lo - slack or mx > hi + slack:
    raise ValueError(
      f"arrays from {origin} span [{mn:g}, {mx:g}], outside value_range=({lo:g}, {hi:g}); "
      "pass the range of the raw values, e.g. value_range=(-1.0, 1.0) for data already in "
      "the model range, or keep the values as they are"
    )
  return ((images - lo) * np.float32(2.0 / (hi - lo)) - 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# In-memory loaders: each returns (images uint8 [N,H,W,C] in [0,255] or float32 in [-1,1],
# labels int32 [N]).


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's handwritten digits as float32 ``[1797, 8, 8, 1]`` in ``[-1, 1]``.

  ``x = u / 8 - 1`` maps the raw values ``u in {0, ..., 16}`` onto ``[-1, 1]`` (the UCI optical
  recognition of handwritten digits data, Alpaydin & Kaynak 1998, via
  ``sklearn.datasets.load_digits``).

  Returns:
    ``(images, labels)``: float32 ``[1797, 8, 8, 1]`` and int32 ``[1797]`` in ``0..9``.
  """
  from sklearn import datasets  # pylint: disable=import-outside-toplevel

  raw = datasets.load_digits()
  images = (raw.images.astype(np.float32) / 8.0 - 1.0)[..., None]
  return images, raw.target.astype(np.int32)


def _first_key(keys: list[str], candidates: tuple[str, ...]) -> str | None:
  return next((k for k in candidates if k in keys), None)


def load_npz(
  *,
  path: str,
  image_key: str | None = None,
  label_key: str | None = None,
  layout: str = "NHWC",
  value_range: tuple[float, float] | None = None,
  keep_values: bool = False,
  require_labels: bool = True,
  key_names: tuple[str, str] = ("image_key", "label_key"),
) -> tuple[np.ndarray, np.ndarray]:
  """Images or vectors and their labels from a ``.npz`` file, read with
  ``np.load(path, allow_pickle=False)``.

  The examples are images ``[N, H, W, C]`` (``[N, C, H, W]`` with ``layout="NCHW"``) or vectors
  ``[N, d]`` (2D points: ``d = 2``). Values: with ``value_range = (lo, hi)`` they are mapped to
  ``[-1, 1]`` by ``x = 2 (u - lo) / (hi - lo) - 1`` and must lie inside the range; without one,
  integer images in ``[0, 255]`` stay uint8 (mapped per batch by :func:`to_model_range`), float
  images must lie in ``[0, 1]`` (the range then is ``(0, 1)``), and vectors are kept as they are
  (float32). ``keep_values`` keeps images as they are too.

  Args:
    path: the ``.npz`` file.
    image_key: array name of the examples; default ``"image"``, else ``"x"``.
    label_key: array name of the labels; default ``"label"``, else ``"y"``; ``""`` reads no
      labels (every label is 0: unconditional data).
    layout: ``"NHWC"`` (channel-last) or ``"NCHW"`` (channel-first, transposed on load); images
      only.
    value_range: range of the raw values; required for integer images outside ``[0, 255]``.
    keep_values: use the values as they are (float32), without mapping them to ``[-1, 1]``.
    require_labels: if False and the label array is absent, every label is 0 (unconditional
      data); if True, a missing label array is an error (except with ``label_key=""``).
    key_names: how the caller spells ``image_key`` and ``label_key`` (e.g. the config's
      ``data.key``, ``data.label_key``), for the messages naming the fix.

  Returns:
    ``(examples, labels)``: uint8 or float32 ``[N, H, W, C]`` or float32 ``[N, d]``, and int32
    ``[N]``.
  """
  origin = f"npz file {path!r}"
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{origin} does not exist; pass path= to an existing .npz file")
  with open(path, "rb") as f:
    is_zip = f.read(4) == b"PK\x03\x04"
  if not is_zip:
    raise ValueError(
      f"{origin} is not a .npz (zip) archive; save arrays with np.savez(path, image=..., label=...)"
    )
  try:
    with np.load(path, allow_pickle=False) as archive:
      keys = sorted(archive.files)
      image_name = image_key or _first_key(keys, ("image", "x"))
      label_name = _first_key(keys, ("label", "y")) if label_key is None else label_key or None
      if image_name not in keys:
        raise KeyError(
          f"{origin} has no array {image_name or 'image/x'!r}; it holds "
          f"{keys}. Set {key_names[0]} to the examples' name"
        )
      if label_name is not None and label_name not in keys:
        if require_labels:
          raise KeyError(
            f"{origin} has no label array {label_key!r}; it holds {keys}. Set {key_names[1]} "
            f"to the labels' name, or {key_names[1]}='' for unlabelled data"
          )
        label_name = None
      if label_name is None and require_labels and label_key is None:
        raise KeyError(
          f"{origin} has no label array ('label' or 'y'); it holds {keys}. "
          f"Set {key_names[1]} to the labels' name, or require_labels=False for "
          "unlabelled data"
        )
      images = archive[image_name]
      labels = archive[label_name] if label_name is not None else None
  except KeyError as error:
    raise ValueError(error.args[0]) from None
  except ValueError as error:
    if "allow_pickle" in str(error):
      raise ValueError(
        f"{origin} stores object arrays, which need pickle; diffjax never "
        "unpickles. Re-save plain numeric arrays"
      ) from error
    raise ValueError(
      f"{origin} is not a readable .npz archive ({error}); re-save it with "
      "np.savez(path, image=..., label=...)"
    ) from error
  except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as error:
    raise ValueError(
      f"{origin} is not a readable .npz archive ({error}); re-save it with "
      "np.savez(path, image=..., label=...)"
    ) from error
  if labels is None:
    labels = np.zeros((images.shape[0] if images.ndim else 0,), np.int32)
  images = _to_nhwc(images, layout=layout, origin=origin)
  images = _scale_images(images, value_range=value_range, origin=origin, keep_values=keep_values)
  _validate_arrays(images, labels, origin=origin)
  return images, labels.astype(np.int32)


def _open_image(path: str, *, origin: str, mode: str, size: tuple[int, int] | None) -> np.ndarray:
  """One image file as uint8 ``[H, W, C]`` (converted to ``mode``, resized to ``size``)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  fix = "remove or replace the file"
  try:
    # A header claiming more than Pillow's MAX_IMAGE_PIXELS (a decompression bomb: a few bytes
    # that decode to gigabytes) is refused before its pixels are decoded.
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(path) as img:
        img = img.convert(mode)
        if size is not None and img.size != size:
          img = img.resize(size, Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
    raise ValueError(
      f"image {path!r} in {origin} is too large to decode safely (Pillow: "
      f"{' '.join(str(error).split())}); {fix}, or shrink it"
    ) from None
  except OSError as error:
    raise ValueError(f"cannot read image {path!r} in {origin} ({error}); {fix}") from error


def load_folder(
  *, root: str, image_size: tuple[int, int] | None = None, channels: int = 3
) -> tuple[np.ndarray, np.ndarray]:
  """Images from ``root/<class_name>/*.png|jpg|jpeg`` as uint8 ``[N, H, W, C]``.

  Labels index the sorted class directory names (the ``torchvision.datasets.ImageFolder``
  convention); files within a class are read in sorted order.

  Args:
    root: directory holding one sub-directory per class.
    image_size: ``(height, width)`` to resize every image to (bicubic, antialiased); if None,
      all images must already share one size.
    channels: 3 (converted to RGB) or 1 (converted to grayscale, ``L``).

  Returns:
    ``(images, labels)``: uint8 ``[N, H, W, channels]`` and int32 ``[N]``.
  """
  origin = f"image folder {root!r}"
  modes = {1: "L", 3: "RGB"}
  if channels not in modes:
    raise ValueError(f"channels={channels!r} for {origin}; choose one of {sorted(modes)}")
  if not os.path.isdir(root):
    raise FileNotFoundError(
      f"{origin} does not exist; pass root= to a directory of class sub-directories"
    )
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  files = [
    (os.path.join(root, c, f), label)
    for label, c in enumerate(classes)
    for f in sorted(os.listdir(os.path.join(root, c)))
    if f.lower().endswith(_IMAGE_SUFFIXES)
  ]
  if not files:
    raise ValueError(
      f"{origin} is empty: expected {root}/<class_name>/*.png|jpg|jpeg, found "
      f"class directories {classes}"
    )
  size = None if image_size is None else (int(image_size[1]), int(image_size[0]))  # PIL: (W, H)
  images = []
  for path, _ in files:
    array = _open_image(path, origin=origin, mode=modes[channels], size=size)
    if images and array.shape != images[0].shape:
      raise ValueError(
        f"image {path!r} has size {array.shape[:2]} but {files[0][0]!r} has "
        f"{images[0].shape[:2]}; pass image_size=(height, width) to resize all images"
      )
    images.append(array)
  images = np.stack(images).reshape((len(files),) + images[0].shape[:2] + (channels,))
  labels = np.asarray([label for _, label in files], np.int32)
  _validate_arrays(images, labels, origin=origin)
  return images, labels


ARRAY_LOADERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
  "digits": load_digits,
  "npz": load_npz,
  "folder": load_folder,
}


def load_arrays(source: str, /, **kwargs) -> tuple[np.ndarray, np.ndarray]:
  """Resolves an in-memory source by name (once, at the edge) and loads its arrays.

  Args:
    source: one of ``ARRAY_LOADERS`` ("digits", "npz", "folder").
    **kwargs: keyword arguments of the loader (``path=`` for npz, ``root=`` for folder, ...).

  Returns:
    ``(images, labels)``: uint8 ``[N, H, W, C]`` in ``[0, 255]`` or float32 in ``[-1, 1]``, and
    int32 ``[N]``.
  """
  return lookup(
    ARRAY_LOADERS,
    source,
    "in-memory image source",
    hint=" (TFDS sources are not in memory: use get_dataset('tfds', ...))",
  )(**kwargs)


# ------------------------------------------------------------------------------------------------
# grain random-access sources.


class ImageSource(grain.sources.RandomAccessDataSource):
  """A grain random-access source over in-memory ``images`` (or vectors ``[N, d]``) and
  ``labels``.

  Element ``i`` is ``{"image": images[i], "label": labels[i]}``. ``repr`` names the source, its
  shape, dtype and a CRC32 fingerprint of the data, because grain compares it when restoring an
  iterator: restoring onto different data fails loudly instead of continuing silently.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, name: str = "arrays"):
    images, labels = np.asarray(images), np.asarray(labels)
    _validate_arrays(images, labels, origin=f"source {name!r}")
    self.images, self.labels, self.name = images, labels.astype(np.int32), name
    self._fingerprint = zlib.crc32(self.labels.tobytes(), zlib.crc32(images.tobytes()))

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self.images[index], "label": self.labels[index]}

  def __repr__(self) -> str:
    return (
      f"ImageSource(name={self.name!r}, shape={self.images.shape}, "
      f"dtype={self.images.dtype}, crc32={self._fingerprint:08x})"
    )


class TfdsImageSource(grain.sources.RandomAccessDataSource):
  """Wraps a ``tfds.data_source`` so elements are ``{"image": uint8 HWC, "label": int32}``."""

  def __init__(self, source: Any, *, name: str, split: str):
    self.source, self.name, self.split = source, name, split

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self.source[index]
    return {
      "image": np.asarray(record["image"]),
      "label": np.asarray(record.get("label", 0), np.int32),
    }

  def __repr__(self) -> str:
    return f"TfdsImageSource(name={self.name!r}, split={self.split!r}, len={len(self)})"


def tfds_source(
  *, name: str = "cifar10", split: str = "train", data_dir: str | None = None, **kwargs
) -> TfdsImageSource:
  """A TensorFlow Datasets random-access source (``tfds.data_source``), e.g. CIFAR-10.

  The dataset must be prepared in ``array_record`` format (``tfds.data_source`` downloads and
  prepares it when it can reach the internet). Images are uint8, mapped to ``[-1, 1]`` by the
  loader.

  Args:
    name: TFDS dataset name (``"cifar10"``, ``"mnist"``, ...).
    split: TFDS split (``"train"``, ``"test"``, ``"train[:90%]"``, ...).
    data_dir: TFDS data directory; None uses TFDS's default.
    **kwargs: further keyword arguments of ``tfds.data_source``.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(
      f"source 'tfds' (dataset {name!r}) needs tensorflow-datasets: install it with "
      "`pip install tensorflow-datasets array_record`, or convert the data to .npz or an "
      "image folder and use source='npz' (path=...) or source='folder' (root=...)"
    ) from error
  return TfdsImageSource(
    tfds.data_source(name, split=split, data_dir=data_dir, **kwargs), name=name, split=split
  )


def _array_dataset(name: str) -> Callable[..., ImageSource]:
  def build(**kwargs) -> ImageSource:
    return ImageSource(*load_arrays(name, **kwargs), name=name)

  build.__doc__ = f"An :class:`ImageSource` over :func:`load_arrays` ``({name!r}, **kwargs)``."
  return build


DATASETS: dict[str, Callable[..., grain.sources.RandomAccessDataSource]] = {
  "digits": _array_dataset("digits"),
  "npz": _array_dataset("npz"),
  "folder": _array_dataset("folder"),
  "tfds": tfds_source,
}


def get_dataset(name: str, /, **kwargs) -> grain.sources.RandomAccessDataSource:
  """Resolves an image source by name (once, at the edge) into a grain random-access source.

  Args:
    name: one of ``DATASETS`` ("digits", "npz", "folder", "tfds").
    **kwargs: keyword arguments of the source (``path=``, ``root=``, ``split=``, ...).
  """
  return lookup(DATASETS, name, "image dataset")(**kwargs)


# ------------------------------------------------------------------------------------------------
# Pixel ranges.


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 ``u`` in ``[0, 255]`` -> float32 ``x = 2 u / 255 - 1`` in ``[-1, 1]``.

  Float images are taken to be in ``[-1, 1]`` already (the loaders map them on load) and are
  only cast to float32. DDPM convention (Ho et al. 2020, https://arxiv.org/abs/2006.11239).
  """
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
  return images.astype(np.float32)


def take(source: grain.sources.RandomAccessDataSource, indices) -> np.ndarray:
  """The examples ``source[i]["image"]`` for ``i`` in ``indices``, stacked, in the model range
  (float32; uint8 through :func:`to_model_range`): ``[len(indices), *shape]``."""
  indices = [int(i) for i in np.asarray(indices).reshape(-1)]
  if not indices:
    raise ValueError(f"indices is empty; take at least one of the {len(source)} records")
  return to_model_range(np.stack([np.asarray(source[i]["image"]) for i in indices]))


def from_model_range(images: np.ndarray) -> np.ndarray:
  """float ``x`` in ``[-1, 1]`` -> uint8 ``u = round((x + 1) 255 / 2)``, clipped to ``[0, 255]``.

  The inverse of :func:`to_model_range` on its image, for writing samples as pictures.
  """
  scaled = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


class _RandomHorizontalFlip(grain.transforms.RandomMap):
  """Mirrors ``[H, W, C]`` images left-right with probability 1/2 (Ho et al. 2020, App. B)."""

  def random_map(self, element, rng: np.random.Generator):
    if rng.random() < 0.5:
      element = {**element, "image": element["image"][:, ::-1]}
    return element


class _ToModelRange(grain.transforms.Map):
  """Batch -> ``{"image": float32 in [-1, 1], "label": int32}``."""

  def map(self, element):
    return {
      "image": to_model_range(element["image"]),
      "label": np.asarray(element["label"], np.int32),
    }


# ------------------------------------------------------------------------------------------------
# The loader.


def _shard_bounds(
  num_records: int, *, shard_options: grain.sharding.ShardOptions
) -> tuple[int, int]:
  """``[start, stop)`` of a contiguous shard, grain's even split: the first
  ``num_records % shard_count`` shards hold one extra record unless the remainder is dropped."""
  count, index = shard_options.shard_count, shard_options.shard_index
  size, extra = divmod(num_records, count)
  if shard_options.drop_remainder:
    return size * index, size * (index + 1)
  start = size * index + min(index, extra)
  return start, start + size + (index < extra)


class _ShardSource(grain.sources.RandomAccessDataSource):
  """Records ``[start, stop)`` of a parent source."""

  def __init__(self, parent: grain.sources.RandomAccessDataSource, start: int, stop: int):
    self.parent, self.start, self.stop = parent, start, stop

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int):
    return self.parent[self.start + index]

  def __repr__(self) -> str:
    return f"{self.parent!r}[{self.start}:{self.stop}]"


class DatasetTooSmallError(ValueError):
  """A process's shard of the data set holds fewer records than one batch."""

  def __init__(self, message: str, *, records: int, total: int):
    super().__init__(message)
    self.records, self.total = records, total


def _check_int(name: str, value: Any, *, low: int, high: int | None = None) -> None:
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, np.integer))
    or value < low
    or (high is not None and value >= high)
  ):
    bound = f">= {low}" if high is None else f"in [{low}, {high})"
    raise ValueError(f"{name}={value!r} must be an integer {bound}")


def make_loader(
  *,
  source: str | grain.sources.RandomAccessDataSource,
  batch_size: int,
  seed: int,
  num_epochs: int | None = None,
  shuffle: bool = True,
  process_index: int = 0,
  process_count: int = 1,
  drop_remainder: bool = True,
  augment: bool = False,
  worker_count: int = 0,
  source_kwargs: Mapping[str, Any] | None = None,
) -> grain.DataLoader:
  """A grain DataLoader of image batches, deterministic for a seed and sharded per process.

  Each process reads the disjoint, contiguous shard ``process_index`` of ``process_count``
  (grain's ``ShardOptions`` even split) and shuffles it with a fresh permutation each epoch
  (``grain.samplers.IndexSampler``; the permutation depends only on ``seed``, the process's
  shard and the epoch). Pass ``process_index=jax.process_index(),
  process_count=jax.process_count()`` in multi-host training; the global batch is then
  ``process_count * batch_size``.

  The shard is cut here, as a view of the source, and grain samples it unsharded: grain 0.2.18's
  ``IndexSampler`` with a finite ``num_epochs`` drops or repeats records when the shards are of
  unequal size. The shuffle and augmentation seed of each process is drawn from
  ``SeedSequence([seed, process_index, process_count])`` so that processes do not flip their
  k-th examples alike.

  Args:
    source: a source name resolved by :func:`get_dataset` (with ``source_kwargs``), or a grain
      random-access source such as an :class:`ImageSource`.
    batch_size: examples per batch on this process.
    seed: 32-bit non-negative integer seeding the shuffle and the augmentation.
    num_epochs: epochs to read; None repeats forever (batches then run across epoch ends).
    shuffle: shuffle within the shard each epoch.
    process_index: this process's shard index.
    process_count: the number of shards (processes).
    drop_remainder: drop the last partial batch, and the ``< process_count`` records that do not
      split evenly across processes (so every process yields the same number of batches).
    augment: random horizontal flips (probability 1/2, per example).
    worker_count: grain worker processes (0: read in this process).
    source_kwargs: keyword arguments of :func:`get_dataset` when ``source`` is a name.

  Returns:
    A ``grain.DataLoader``; ``iter(loader)`` yields ``{"image": float32 [B, H, W, C],
    "label": int32 [B]}`` with ``B = batch_size`` (the last batch of a finite stream may be
    smaller when ``drop_remainder=False``).
  """
  if isinstance(source, str):
    source = get_dataset(source, **dict(source_kwargs or {}))
  elif source_kwargs:
    raise ValueError(
      f"source_kwargs={dict(source_kwargs)!r} is only used with a source name; "
      "build the source with those arguments instead"
    )
  _check_int("batch_size", batch_size, low=1)
  _check_int("seed", seed, low=0, high=2**32)
  _check_int("process_count", process_count, low=1)
  _check_int("process_index", process_index, low=0, high=process_count)
  _check_int("worker_count", worker_count, low=0)
  if num_epochs is not None:
    _check_int("num_epochs", num_epochs, low=1)
  shard_options = grain.sharding.ShardOptions(
    shard_index=process_index, shard_count=process_count, drop_remainder=drop_remainder
  )
  start, stop = _shard_bounds(len(source), shard_options=shard_options)
  if stop == start or (drop_remainder and stop - start < batch_size):
    raise DatasetTooSmallError(
      f"process {process_index} of {process_count} gets {stop - start} of the "
      f"{len(source)} records of {source!r}, fewer than batch_size={batch_size}; use a "
      "smaller per-process batch_size or drop_remainder=False",
      records=stop - start,
      total=len(source),
    )
  shard = source if (start, stop) == (0, len(source)) else _ShardSource(source, start, stop)
  process_seed = int(
    np.random.SeedSequence([seed, process_index, process_count]).generate_state(1)[0]
  )
  sampler = grain.samplers.IndexSampler(
    num_records=len(shard),
    shard_options=grain.sharding.NoSharding(),
    shuffle=shuffle,
    num_epochs=num_epochs,
    seed=process_seed,
  )
  if worker_count > 0:
    from absl import flags  # pylint: disable=import-outside-toplevel

    # grain's worker processes read its absl flags, which only programs started by absl.app
    # have parsed; accept their defaults (idempotent; a later absl.app.run parses as usual).
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
  operations = [_RandomHorizontalFlip()] if augment else []
  operations += [
    grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder),
    _ToModelRange(),
  ]
  # An in-memory record is read in microseconds; grain's prefetch threads poll every pending
  # read per record, which costs more than the reads themselves, so memory is read in line.
  read_options = None
  if isinstance(source, ImageSource):
    read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return grain.DataLoader(
    data_source=shard,
    sampler=sampler,
    operations=operations,
    worker_count=worker_count,
    shard_options=grain.sharding.NoSharding(),
    read_options=read_options,
  )


def iterator_state(iterator: grain.DataLoaderIterator) -> dict[str, Any]:
  """The position of a loader's iterator as a JSON-able dict (grain's ``get_state``).

  Saving it with a training checkpoint and passing it to :func:`restore_iterator` continues the
  stream exactly where it stopped.
  """
  return json.loads(iterator.get_state().decode())


def restore_iterator(
  loader: grain.DataLoader, state: Mapping[str, Any] | bytes | str
) -> grain.DataLoaderIterator:
  """A fresh iterator of ``loader`` positioned at ``state`` (from :func:`iterator_state`).

  The loader must be built with the same source, sampler options and worker count as the one
  whose iterator was saved; grain checks this and raises a ValueError naming the mismatch.
  """
  if isinstance(state, str):
    state = state.encode()
  elif not isinstance(state, bytes):
    state = json.dumps(dict(state)).encode()
  iterator = iter(loader)
  iterator.set_state(state)
  return iterator
