"""Tests of the grain image pipeline: sources, determinism, epochs, sharding, checkpointing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from diffjax.data import images

N_NPZ = 40
SHAPE = (6, 5, 3)


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
  """40 random uint8 RGB images; label i % 4. Pixel (0, 0, 0) stores the index for identity."""
  rng = np.random.default_rng(0)
  data = rng.integers(0, 256, size=(N_NPZ,) + SHAPE, dtype=np.uint8)
  data[:, 0, 0, 0] = np.arange(N_NPZ)
  path = str(tmp_path_factory.mktemp("npz") / "tiny.npz")
  np.savez(path, image=data, label=np.arange(N_NPZ) % 4)
  return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """12 PNGs of 4x3 pixels in 3 classes; class c has pixels 10 c + k."""
  root = tmp_path_factory.mktemp("folder")
  for c, name in enumerate(["cat", "ant", "bee"]):
    os.makedirs(root / name)
    for k in range(4):
      pixels = np.full((4, 3, 3), 10 * c + k, np.uint8)
      Image.fromarray(pixels).save(root / name / f"{k}.png")
  return str(root)


def _ids(batch) -> np.ndarray:
  """The index written into pixel (0, 0, 0), recovered from the model range."""
  return np.rint((batch["image"][:, 0, 0, 0] + 1.0) * 127.5).astype(int)


def _stream(loader, n=None):
  it = iter(loader)
  if n is None:
    return [b for b in it]
  return [next(it) for _ in range(n)]


def test_digits_shapes_dtypes_range():
  x, y = images.load_arrays("digits")
  assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float32
  assert y.shape == (1797,) and y.dtype == np.int32
  # Raw values are 0..16; u / 8 - 1 sends them onto the 17-point grid of [-1, 1].
  from sklearn.datasets import load_digits

  raw = load_digits().images
  np.testing.assert_allclose(x[..., 0], raw / 8.0 - 1.0, atol=1e-6)
  assert set(np.unique(y)) == set(range(10))
  batch = next(iter(images.make_loader(source="digits", batch_size=16, seed=0)))
  assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


def test_npz_pixels_map_to_model_range(npz_path):
  x, y = images.load_npz(path=npz_path)
  assert x.dtype == np.uint8 and x.shape == (N_NPZ,) + SHAPE and y.dtype == np.int32
  loader = images.make_loader(
    source="npz",
    source_kwargs=dict(path=npz_path),
    batch_size=8,
    seed=0,
    num_epochs=1,
    shuffle=False,
  )
  batches = _stream(loader)
  got = np.concatenate([b["image"] for b in batches])
  # Unshuffled single epoch: same order as the file; 2 u / 255 - 1 exactly (u=0 -> -1, 255 -> 1).
  np.testing.assert_allclose(got, x.astype(np.float64) * 2 / 255 - 1, atol=1e-6)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), y)
  np.testing.assert_array_equal(images.from_model_range(got), x)


def test_npz_nchw_and_float_value_range(tmp_path):
  rng = np.random.default_rng(1)
  nhwc = rng.uniform(-1.0, 1.0, size=(5, 6, 5, 3)).astype(np.float32)
  path = str(tmp_path / "nchw.npz")
  np.savez(path, x=nhwc.transpose(0, 3, 1, 2), y=np.arange(5))
  x, y = images.load_npz(path=path, layout="NCHW", value_range=(-1.0, 1.0))
  np.testing.assert_allclose(x, nhwc, atol=1e-6)
  np.testing.assert_array_equal(y, np.arange(5))
  # Same data in [0, 1] with the default float range: x = 2 u - 1.
  np.savez(path, x=(nhwc + 1) / 2, y=np.arange(5))
  np.testing.assert_allclose(images.load_npz(path=path)[0], nhwc, atol=1e-6)


def test_folder_labels_follow_sorted_class_names(folder):
  x, y = images.load_folder(root=folder)
  assert x.shape == (12, 4, 3, 3) and x.dtype == np.uint8
  # Sorted classes: ant (c=1), bee (c=2), cat (c=0) -> labels 0, 1, 2.
  np.testing.assert_array_equal(y, np.repeat([0, 1, 2], 4))
  np.testing.assert_array_equal(x[:, 0, 0, 0], [10 * c + k for c in (1, 2, 0) for k in range(4)])
  small, _ = images.load_folder(root=folder, image_size=(2, 5), channels=1)
  assert small.shape == (12, 2, 5, 1)
  # Resizing a constant image keeps it constant.
  np.testing.assert_array_equal(
    small[:, :, :, 0].min(axis=(1, 2)), small[:, :, :, 0].max(axis=(1, 2))
  )


def test_seed_determinism_and_difference(npz_path):
  def ids(seed):
    loader = images.make_loader(
      source=images.get_dataset("npz", path=npz_path), batch_size=8, seed=seed, augment=True
    )
    return np.concatenate([_ids(b) for b in _stream(loader, 10)]), _stream(loader, 3)

  a, a_batches = ids(3)
  b, b_batches = ids(3)
  c, _ = ids(4)
  np.testing.assert_array_equal(a, b)
  for u, v in zip(a_batches, b_batches, strict=True):  # also the augmentation draws
    np.testing.assert_array_equal(u["image"], v["image"])
  assert not np.array_equal(a, c)


def test_augmentation_flips_about_half(npz_path):
  source = images.get_dataset("npz", path=npz_path)
  plain = _stream(images.make_loader(source=source, batch_size=8, seed=2, num_epochs=2))
  flipped = _stream(
    images.make_loader(source=source, batch_size=8, seed=2, num_epochs=2, augment=True)
  )
  plain = np.concatenate([b["image"] for b in plain])
  flipped = np.concatenate([b["image"] for b in flipped])
  same = np.all(plain == flipped, axis=(1, 2, 3))
  mirrored = np.all(plain[:, :, ::-1] == flipped, axis=(1, 2, 3))
  assert np.all(same ^ mirrored)  # random images are never symmetric: exactly one holds
  # Fraction flipped of n=80 fair coin flips has s.e. sqrt(0.25 / 80) = 0.056; allow 5 s.e.
  assert abs(mirrored.mean() - 0.5) < 5 * np.sqrt(0.25 / 80)


def test_each_epoch_is_a_permutation(npz_path):
  source = images.get_dataset("npz", path=npz_path)
  # 40 = 5 * 8, so with drop_remainder no record is dropped; 3 epochs of 5 batches.
  loader = images.make_loader(source=source, batch_size=8, seed=0, num_epochs=3)
  ids = np.concatenate([_ids(b) for b in _stream(loader)])
  assert ids.shape == (3 * N_NPZ,)
  epochs = ids.reshape(3, N_NPZ)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(N_NPZ))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
  assert not np.array_equal(epochs[0], np.arange(N_NPZ))
  # 7 does not divide 40: with drop_remainder=False one epoch still yields each record once.
  loader = images.make_loader(
    source=source, batch_size=7, seed=0, num_epochs=1, drop_remainder=False
  )
  batches = _stream(loader)
  assert [len(b["label"]) for b in batches] == [7] * 5 + [5]
  np.testing.assert_array_equal(
    np.sort(np.concatenate([_ids(b) for b in batches])), np.arange(N_NPZ)
  )


@pytest.mark.parametrize("drop_remainder,n", [(False, 39), (True, 40)])
def test_process_shards_are_disjoint_and_cover(tmp_path, drop_remainder, n):
  data = np.zeros((n,) + SHAPE, np.uint8)
  data[:, 0, 0, 0] = np.arange(n)
  source = images.ImageSource(data, np.zeros(n, np.int32))
  shards = []
  for process_index in range(2):
    loader = images.make_loader(
      source=source,
      batch_size=4,
      seed=5,
      num_epochs=1,
      process_index=process_index,
      process_count=2,
      drop_remainder=drop_remainder,
    )
    shards.append(np.concatenate([_ids(b) for b in _stream(loader)]))
  assert not set(shards[0]) & set(shards[1])
  assert len(set(shards[0])) == len(shards[0]) and len(set(shards[1])) == len(shards[1])
  # n=40 splits 20/20 and 4 divides 20; n=39 splits 20/19, kept whole without drop_remainder.
  np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(n))


def test_checkpoint_restore_continues_identically(npz_path):
  source = images.get_dataset("npz", path=npz_path)
  loader = images.make_loader(source=source, batch_size=6, seed=7, augment=True)
  # 40 records, 6 per batch: stop mid-epoch (after 3 batches) and run past the epoch boundary.
  reference = _stream(loader, 12)
  it = iter(loader)
  for _ in range(3):
    next(it)
  state = images.iterator_state(it)
  json.dumps(state)  # JSON-able, so it can sit in a checkpoint
  for _ in range(4):  # consume more, then go back
    next(it)
  # A loader rebuilt from scratch (as after a restart) resumes from the saved state.
  fresh = images.make_loader(
    source=images.get_dataset("npz", path=npz_path), batch_size=6, seed=7, augment=True
  )
  restored = images.restore_iterator(fresh, state)
  for expected in reference[3:]:
    got = next(restored)
    np.testing.assert_array_equal(got["image"], expected["image"])
    np.testing.assert_array_equal(got["label"], expected["label"])
  # Restoring onto other data is refused.
  other = images.ImageSource(np.zeros((N_NPZ,) + SHAPE, np.uint8), np.zeros(N_NPZ, np.int32))
  with pytest.raises(ValueError, match="DataSource"):
    images.restore_iterator(
      images.make_loader(source=other, batch_size=6, seed=7, augment=True), state
    )


def test_orbax_checkpoint_of_the_iterator(tmp_path, npz_path):
  import grain
  import orbax.checkpoint as ocp

  loader = images.make_loader(
    source=images.get_dataset("npz", path=npz_path), batch_size=6, seed=3, augment=True
  )
  it = iter(loader)
  for _ in range(2):
    next(it)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
    manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = _stream(loader, 10)[2:10]  # the uninterrupted stream from batch 2 on
    restored = iter(loader)
    manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  for batch in expected:
    np.testing.assert_array_equal(next(restored)["image"], batch["image"])


def test_bad_npz_inputs_raise_clear_errors(tmp_path):
  missing = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    images.load_npz(path=missing)
  good = tmp_path / "good.npz"
  np.savez(good, image=np.zeros((4, 3, 3, 1), np.uint8), label=np.zeros(4))
  corrupt = tmp_path / "corrupt.npz"
  corrupt.write_bytes(good.read_bytes()[:60])
  with pytest.raises(ValueError, match="corrupt.npz.*readable"):
    images.load_npz(path=str(corrupt))
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"not an archive" * 8)
  with pytest.raises(ValueError, match="junk.npz"):
    images.load_npz(path=str(junk))

  def check(match, **arrays):
    path = tmp_path / "case.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
      images.load_npz(path=str(path))

  check(r"shape \(4, 3, 3\).*4-D", image=np.zeros((4, 3, 3), np.uint8), label=np.zeros(4, int))
  check(
    r"labels.*shape \(5,\).*\(4, 3, 3, 1\)",
    image=np.zeros((4, 3, 3, 1), np.uint8),
    label=np.zeros(5, int),
  )
  nan = np.zeros((4, 3, 3, 1), np.float32)
  nan[1, 2, 0, 0] = np.nan
  check("1 NaN", image=nan, label=np.zeros(4, int))
  signed = np.broadcast_to(np.linspace(-1, 1, 4, dtype=np.float32)[:, None, None, None], nan.shape)
  check(r"span \[-1, 1\].*value_range", image=signed, label=np.zeros(4, int))
  check("layout='NCHW'", image=np.zeros((4, 3, 8, 8), np.uint8), label=np.zeros(4, int))
  check("has no label array", image=np.zeros((4, 3, 3, 1), np.uint8))
  check("object arrays", image=np.array([None, 1], dtype=object), label=np.zeros(2, int))


def test_bad_folder_and_loader_arguments(tmp_path, folder, npz_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    images.load_folder(root=str(tmp_path / "nowhere"))
  empty = tmp_path / "empty"
  os.makedirs(empty / "class_a")
  with pytest.raises(ValueError, match="empty.*class_a"):
    images.load_folder(root=str(empty))
  Image.fromarray(np.zeros((4, 3, 3), np.uint8)).save(empty / "class_a" / "a.png")
  Image.fromarray(np.zeros((5, 3, 3), np.uint8)).save(empty / "class_a" / "b.png")
  with pytest.raises(ValueError, match=r"b.png.*image_size"):
    images.load_folder(root=str(empty))
  (empty / "class_a" / "c.png").write_bytes(b"broken")
  with pytest.raises(ValueError, match="c.png"):
    images.load_folder(root=str(empty), image_size=(4, 3))
  with pytest.raises(ValueError, match="'cifar'.*digits"):
    images.get_dataset("cifar")
  with pytest.raises(ValueError, match="'tfds'"):
    images.load_arrays("tfds")
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match="tensorflow-datasets.*npz"):
      images.get_dataset("tfds", name="cifar10")
  source = images.get_dataset("npz", path=npz_path)
  for kwargs, match in [
    (dict(batch_size=0), "batch_size=0"),
    (dict(seed=-1), "seed=-1"),
    (dict(process_index=2, process_count=2), "process_index=2"),
    (dict(batch_size=41), "batch_size=41"),
    (dict(num_epochs=0), "num_epochs=0"),
  ]:
    with pytest.raises(ValueError, match=match):
      images.make_loader(source=source, **{"batch_size": 8, "seed": 0, **kwargs})


@pytest.mark.slow
def test_worker_processes_give_the_same_stream_and_restore(npz_path):
  source = images.get_dataset("npz", path=npz_path)
  kwargs = dict(source=source, batch_size=6, seed=1, augment=True)
  reference = _stream(images.make_loader(**kwargs), 9)
  loader = images.make_loader(worker_count=1, **kwargs)
  it = iter(loader)
  for expected in reference[:4]:
    np.testing.assert_array_equal(next(it)["image"], expected["image"])
  state = images.iterator_state(it)
  restored = images.restore_iterator(loader, state)
  for expected in reference[4:]:
    np.testing.assert_array_equal(next(restored)["image"], expected["image"])
  del it, restored  # stop the worker processes now, not at interpreter exit
