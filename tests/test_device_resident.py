"""A small in-memory data set held on the devices (data.device_resident): its batches are drawn
inside the fused step from the step's key.

Checked against the file itself: every drawn row is a row of the npz and carries that row's
label; the draw is uniform (counts within a few standard errors of n / N); a run interrupted
and resumed ends bit-equal to an uninterrupted one; a fused chunk equals the same steps taken
one by one on batches drawn outside the program; the auto rule follows the size limit; and each
bad setting is one line naming the key and the fix.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from tiny import tiny_config

from diffjax.data import images
from diffjax.train import config as config_lib
from diffjax.train import device_data, image_input, loop
from diffjax.train import sharding as sharding_lib
from diffjax.train import trainer as trainer_lib
from diffjax.train.experiment import build_experiment
from diffjax.train.step import step_keys, train_step

NUM_ROWS = 40


def _rows(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """40 distinct 2D points and their labels (3 classes)."""
  points = np.random.default_rng(seed).normal(size=(NUM_ROWS, 2)).astype(np.float32)
  return points, (np.arange(NUM_ROWS) % 3).astype(np.int32)


def _npz_config(tmp_path, *overrides: str, labelled: bool = False):
  points, labels = _rows()
  path = tmp_path / "points.npz"
  np.savez(path, x=points, **({"label": labels} if labelled else {}))
  config = tiny_config(
    "--config.data.kind=npz",
    f"--config.data.path={path}",
    "--config.data.shape=(2,)",
    "--config.train.batch_size=16",
    *overrides,
  )
  config_lib.validate(config, num_devices=None)
  return config


def _mesh(count: int = 1):
  return sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:count])


def _row_indices(drawn: np.ndarray, points: np.ndarray) -> np.ndarray:
  """The row of ``points`` each drawn point is (exact float equality); fails if one is none."""
  matches = (drawn[:, None, :] == points[None, :, :]).all(axis=-1)
  assert matches.any(axis=1).all(), "a drawn point is no row of the file"
  return matches.argmax(axis=1)


def test_batches_are_rows_of_the_file_with_their_labels(tmp_path):
  """A conditional model on 8 devices: each example of a drawn batch is a row of the npz, its
  label that row's label, and the batch is sharded over the mesh like the toys' batches."""
  config = _npz_config(tmp_path, "--config.data.num_classes=3", labelled=True)
  mesh = _mesh(8)
  experiment = build_experiment(config, mesh=mesh)
  assert experiment.device_data is not None and experiment.make_iterator is None
  points, labels = _rows()
  seen = set()
  for step in range(5):
    batch = experiment.sample_batch(jax.random.PRNGKey(step))
    assert batch["x"].shape == (16, 2) and batch["label"].dtype == np.int32
    assert batch["x"].sharding.is_equivalent_to(sharding_lib.batch_sharding(mesh), 2)
    rows = _row_indices(np.asarray(batch["x"]), points)
    np.testing.assert_array_equal(np.asarray(batch["label"]), labels[rows])
    seen.update(rows.tolist())
  assert len(seen) > 20  # 80 draws of 40 rows: not the same few rows over and over


def test_resident_images_hold_the_values_grain_hands_the_model(tmp_path):
  """uint8 channel-first images: the resident arrays are the loader's (same layout and value
  range handling), equal to every record grain's pipeline would read, in the model range."""
  pixels = np.random.default_rng(5).integers(0, 256, size=(12, 1, 4, 3), dtype=np.uint8)
  np.savez(tmp_path / "images.npz", image=pixels)
  config = tiny_config(
    "--config.data.kind=npz",
    f"--config.data.path={tmp_path / 'images.npz'}",
    "--config.data.shape=(4, 3, 1)",
    "--config.data.layout=nchw",
    "--config.train.batch_size=8",
  )
  config_lib.validate(config, num_devices=None)
  resident = device_data.place(config, *device_data.load_in_memory(config), mesh=_mesh())
  grain_records = images.take(image_input.host_source(config), np.arange(12))
  np.testing.assert_array_equal(np.asarray(resident.arrays["x"]), grain_records)
  expected = np.transpose(pixels, (0, 2, 3, 1)) / 127.5 - 1.0  # x = 2 u / 255 - 1, NHWC
  np.testing.assert_allclose(grain_records, expected, atol=1e-6)


def test_draw_is_uniform_with_replacement():
  """n = 40,000 draws over N = 40 rows: each count is Binomial(n, 1/N), mean 1000, standard
  error sqrt(n p (1 - p)) = 31.2; all within 4.5 standard errors (a fixed key: the bound is a
  one-in-5,000 event per row for a correct sampler, a row never drawn or drawn twice as often is
  hundreds of standard errors off)."""
  points, labels = _rows()
  arrays = {"x": points, "label": labels}
  n, p = 40_000, 1.0 / NUM_ROWS
  draw = jax.jit(functools.partial(device_data.draw_batch, batch_size=n))
  batch = np.asarray(draw(jax.random.PRNGKey(7), arrays)["x"])
  counts = np.bincount(_row_indices(batch, points), minlength=NUM_ROWS)
  standard_error = np.sqrt(n * p * (1 - p))
  assert np.abs(counts - n * p).max() < 4.5 * standard_error, counts
  # A function of the key: the same key gives the same batch, another key another one.
  np.testing.assert_array_equal(np.asarray(draw(jax.random.PRNGKey(7), arrays)["x"]), batch)
  assert not np.array_equal(np.asarray(draw(jax.random.PRNGKey(8), arrays)["x"]), batch)


def test_flip_mirrors_images_along_their_width():
  """With ``flip``, each drawn image is its row or that row mirrored left-right, both seen."""
  images = np.random.default_rng(1).normal(size=(6, 4, 5, 1)).astype(np.float32)
  arrays = {"x": images, "label": np.zeros(6, np.int32)}
  drawn = np.asarray(
    device_data.draw_batch(jax.random.PRNGKey(0), arrays, batch_size=64, flip=True)["x"]
  )
  as_is = (drawn[:, None] == images[None]).all(axis=(2, 3, 4))
  mirrored = (drawn[:, None] == images[None, :, :, ::-1]).all(axis=(2, 3, 4))
  assert (as_is | mirrored).any(axis=1).all()
  assert as_is.any(axis=1).sum() > 10 and mirrored.any(axis=1).sum() > 10


# slow: chunk against steps on device-resident data (20 s); the fast suite keeps the in-graph draw
# tests above
@pytest.mark.slow
@pytest.mark.parametrize("objective", ["icfm", "otcfm"])
def test_fused_chunk_equals_the_steps_one_by_one(tmp_path, objective):
  """``train.fused_steps`` applies: one chunk of 4 steps, its batches drawn inside the program,
  equals 4 single steps on batches drawn outside any program from the same step keys (float32
  rounding of the scan aside), and compiles once; for a class-conditional model. OT-CFM
  (label-conditional exact OT): the chunk's couplings are solved on the host between its two
  programs, both given the resident arrays."""
  config = _npz_config(
    tmp_path,
    "--config.data.num_classes=3",
    f"--config.objective.name={objective}",
    labelled=True,
  )
  trainer = trainer_lib.make_trainer(config, _mesh())
  experiment = trainer.experiment
  fused, metrics = trainer.advance(trainer.create_state(), 4, None)
  assert trainer.trace_count[0] == 1 and np.asarray(metrics["loss"]).shape == (4,)

  kwargs = dict(
    pair_fn=experiment.pair_fn,
    loss_fn=experiment.loss_fn,
    optimizer=trainer.optimizer,
    ema_decay=config.train.ema_decay,
  )
  one_step = jax.jit(lambda s, b: train_step(s, b, **kwargs))
  stepped, losses = trainer.create_state(), []
  for _ in range(4):
    batch = experiment.sample_batch(step_keys(stepped.key, stepped.step)[0])
    stepped, step_metrics = one_step(stepped, batch)
    losses.append(float(step_metrics["loss"]))
  np.testing.assert_allclose(np.asarray(metrics["loss"]), losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(stepped)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # an end-to-end CLI run; the fast suite keeps the unit checks
def test_interrupted_run_resumes_bit_equal(tmp_path):
  """A run stopped after 4 steps and resumed from its workdir to 8 ends bit-equal to 8 steps
  without a stop (the trainer's chunks of 2, as the loop cuts them): the resumed run draws the
  batches the uninterrupted one drew, with nothing but the step restored. 3-D vectors: no plot
  to draw, so the test times the training only."""
  overrides = (
    "--config.data.shape=(3,)",
    "--config.train.steps=8",
    "--config.train.fused_steps=2",
    "--config.train.checkpoint_every=4",
  )
  points = np.random.default_rng(4).normal(size=(NUM_ROWS, 3)).astype(np.float32)
  np.savez(tmp_path / "vectors.npz", x=points)
  path = f"--config.data.path={tmp_path / 'vectors.npz'}"
  devices = jax.devices()[:1]
  stopped = _npz_config(tmp_path, *overrides, path, "--config.train.steps=4")
  assert int(loop.train(stopped, tmp_path / "run", devices=devices)["state"].step) == 4
  resumed = loop.train(_npz_config(tmp_path, *overrides, path), tmp_path / "run", devices=devices)
  assert resumed["start_step"] == 4 and int(resumed["state"].step) == 8
  assert resumed["experiment"].device_data is not None and resumed["trace_count"] == 1
  assert [s for s, _ in resumed["losses"]] == [6, 8]

  trainer = trainer_lib.make_trainer(_npz_config(tmp_path, *overrides, path), _mesh())
  state, losses = trainer.create_state(), []
  for _ in range(4):
    state, metrics = trainer.advance(state, 2, None)
    losses.append(float(np.mean(np.asarray(metrics["loss"]))))
  for a, b in zip(jax.tree.leaves(resumed["state"]), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [loss for _, loss in resumed["losses"]] == losses[2:]


def test_auto_holds_small_data_on_the_devices_and_larger_data_in_grain(tmp_path):
  """``auto``: 40 points take 40 x (2 + 1) x 4 = 480 bytes; a limit of 480 bytes keeps them on
  the devices, 479 bytes sends them through grain; ``on`` ignores the limit, ``off`` always
  reads through grain."""
  assert device_data.resident_bytes(num_examples=NUM_ROWS, example_shape=(2,)) == 480
  limit = lambda num_bytes: f"--config.data.device_resident_max_mb={num_bytes / 2**20!r}"
  mesh = _mesh()
  cases = [
    ([limit(480)], True),
    ([limit(479)], False),
    (["--config.data.device_resident=on"], True),
    (["--config.data.device_resident=off"], False),
  ]
  for overrides, resident in cases:
    experiment = build_experiment(_npz_config(tmp_path, *overrides), mesh=mesh)
    assert (experiment.device_data is not None) == resident, overrides
    assert (experiment.make_iterator is None) == resident, overrides
  assert device_data.fits_on_devices(mode="on", num_bytes=10**12, max_mb=1.0)
  assert not device_data.fits_on_devices(mode="off", num_bytes=1, max_mb=1.0)


def test_runs_from_before_the_key_resume_through_grain_or_with_the_default():
  """A checkpoint's config from before data.device_resident lacks it: its runs read grain,
  so 'off' (exactly what they did) and the default 'auto' are no difference; 'on' is."""
  config = tiny_config()
  new = config_lib.resume_fingerprint(config)
  old = {k: v for k, v in new.items() if not k.startswith("data.device_resident")}
  assert config_lib.fingerprint_differences(old, new) == []
  for mode, differs in (("off", False), ("on", True)):
    new["data.device_resident"] = mode
    assert bool(config_lib.fingerprint_differences(old, new)) == differs, mode


@pytest.mark.parametrize(
  "overrides, fragment",
  [
    (["--config.data.device_resident=yes"], "data.device_resident='yes': unknown; choose 'auto'"),
    (["--config.data.device_resident_max_mb=0"], "data.device_resident_max_mb=0.0: must be"),
    (["--config.data.device_resident_max_mb=-5"], "positive number of MiB"),
    (
      ["--config.data.device_resident=off", "--config.data.device_resident_max_mb=8"],
      "data.device_resident_max_mb=8.0 is read only by data.device_resident='auto'",
    ),
    (
      [
        "--config.data.kind=images",
        "--config.data.target=folder",
        "--config.data.shape=(8, 8, 1)",
        "--config.model.name=unet",
        "--config.data.device_resident=on",
      ],
      "only in-memory arrays",
    ),
    (["--config.data.kind=toy2d", "--config.data.device_resident=off"], "keep data.device_res"),
  ],
)
def test_bad_settings_are_one_line(tmp_path, overrides, fragment):
  points, _ = _rows()
  path = tmp_path / "points.npz"
  np.savez(path, x=points)
  (tmp_path / "folder" / "a").mkdir(parents=True)
  path_of = str(tmp_path / "folder") if "--config.data.target=folder" in overrides else str(path)
  config = tiny_config(
    "--config.data.kind=npz",
    f"--config.data.path={path_of}",
    "--config.train.batch_size=16",
    *overrides,
  )
  with pytest.raises(config_lib.ConfigError) as caught:
    config_lib.validate(config, num_devices=None)
  message = str(caught.value)
  assert fragment in message and "\n" not in message, message
