"""`diffjax sample`: the picture beside the samples, class labels and trajectories.

The workdirs hold a tiny model's initial state as a committed checkpoint, as `diffjax train`
leaves one, without compiling a train step (the plumbing under test does not need a trained
model); the slow test trains one through the CLI.
"""

from __future__ import annotations

import json
import pathlib

import jax
import matplotlib.image
import numpy as np
import pytest
from workdirs import digits_config, workdir_at_init  # noqa: F401  (re-exported for other tests)

from diffjax import cli, plots
from diffjax import run as run_lib


@pytest.fixture()
def toy(toy_init_workdir) -> pathlib.Path:
  return toy_init_workdir  # shared read-only (conftest.py): these tests write elsewhere


@pytest.fixture()
def digits(digits_init_workdir) -> pathlib.Path:
  return digits_init_workdir


def sample(capsys, workdir, out, *args) -> dict:
  code = cli.main(["sample", "--workdir", str(workdir), "--out", str(out), *args])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  return json.loads(captured.out.strip().splitlines()[-1])


def test_2d_picture_and_trajectories(toy, tmp_path, capsys):
  out = tmp_path / "s.npz"
  report = sample(capsys, toy, out, "--num", "50", "--steps", "3", "--trajectories", "5")
  assert report["png"] == str(tmp_path / "s.png") and report["nfe"] == 3
  with np.load(out) as saved:
    samples, paths = saved["samples"], saved["trajectories"]
    assert sorted(saved) == ["samples", "trajectories"]  # no labels for an unconditional model
  assert samples.shape == (50, 2) and paths.shape == (4, 5, 2)
  # The last state is the sample (drawn by a second program: float rounding only).
  np.testing.assert_allclose(paths[-1], samples[:5], rtol=1e-5, atol=1e-6)
  # The first state is sample i's source draw, N(0, I) from the key fold_in(PRNGKey(seed), i)
  # split three ways (source, labels, sampler), recomputed here from those keys.
  for i in range(5):
    key_source = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), i), 3)[0]
    source = np.asarray(jax.random.normal(key_source, (1, 2)))[0]
    np.testing.assert_allclose(paths[0, i], source, rtol=1e-6, atol=1e-6)
  assert np.abs(paths[1] - paths[0]).min() > 0  # the paths move
  png = matplotlib.image.imread(tmp_path / "s.png")
  assert png.shape == (plots.SCATTER_PIXELS, plots.SCATTER_PIXELS, 4)
  # Something is drawn: a good share of the pixels is not the white background.
  assert np.mean(png[..., :3].min(axis=-1) < 0.9) > 0.01


def test_image_grid_with_labels(digits, tmp_path, capsys):
  out = tmp_path / "d.npz"
  sample(capsys, digits, out, "--num", "20", "--labels", "0,3,7")
  with np.load(out) as saved:
    images, labels = saved["samples"], saved["label"]
  np.testing.assert_array_equal(labels, [0, 3, 7] * 6 + [0, 3])
  png = matplotlib.image.imread(tmp_path / "d.png")
  # 20 tiles: 5 columns, 4 rows; 8x8 images scaled 8x to 64 pixels, gaps of 8, a 14-pixel
  # label band above each tile, a 24-pixel title band: 5 * 64 + 6 * 8 = 368 wide and
  # 24 + 4 * (14 + 64) + 5 * 8 = 376 high.
  assert png.shape == (376, 368, 4)
  layout = plots.image_grid_layout(num=20, image_shape=(8, 8), labelled=True, titled=True)
  assert (layout.height, layout.width) == (376, 368)
  for index in (0, 19):  # the first and the last tile are these samples, pixel for pixel
    top, left = layout.tile(index)
    tile = png[top : top + 64 : 8, left : left + 64 : 8, 0]
    expected = np.clip((images[index, ..., 0] + 1.0) / 2.0, 0.0, 1.0)
    np.testing.assert_allclose(tile, expected, atol=1.5 / 255)
  gap = png[: layout.title_height + layout.gap, :, :3]
  assert np.all(gap[layout.title_height :] == 1.0)  # white space between title and tiles


# slow: samples every digits label through the CLI (4 s); the label handling stays fast above
@pytest.mark.slow
def test_each_sample_follows_its_label(digits, tmp_path, capsys):
  """Sample i depends on the seed, i and its label only. Without labels a conditional model
  samples every class in turn (0, 1, 2, 3): its samples 1 and 2 are those of --label 1 and
  --label 2 at the same positions, and the samples of two labels differ."""
  drawn = {}
  for args in ([], ["--label", "1"], ["--labels", "2"]):
    out = tmp_path / f"{len(drawn)}.npz"
    sample(capsys, digits, out, "--num", "4", *args)
    with np.load(out) as saved:
      drawn[args[-1] if args else "all"] = (saved["samples"], list(saved["label"]))
  assert drawn["all"][1] == [0, 1, 2, 3] and drawn["1"][1] == [1] * 4 and drawn["2"][1] == [2] * 4
  assert np.abs(drawn["1"][0] - drawn["2"][0]).max() > 1e-3
  np.testing.assert_allclose(drawn["all"][0][1], drawn["1"][0][1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(drawn["all"][0][2], drawn["2"][0][2], rtol=1e-5, atol=1e-6)


@pytest.fixture()
def no_restore(monkeypatch):
  def restore(*args, **kwargs):
    raise AssertionError("a bad argument reached the checkpoint restore")

  monkeypatch.setattr(run_lib, "restore_for_inference", restore)


@pytest.mark.parametrize(
  "which, args, fragment",
  [
    ("toy", ["--labels", "1"], "is unconditional (data.num_classes=0), so it takes no labels"),
    ("toy", ["--label", "0"], "--label 0: the model in"),
    ("digits", ["--labels", "0,12"], "label 12 is out of range; this model's labels are 0 .. 9"),
    ("digits", ["--label=-1"], "label -1 is out of range"),
    ("digits", ["--labels", "1,x"], "--labels 1,x: must be an integer or comma-separated"),
    ("digits", ["--labels", "1", "--label", "2"], "pass one of them"),
    ("digits", ["--num", "2", "--labels", "1,2,3"], "3 labels for --num 2"),
    ("digits", ["--num", "5", "--trajectories", "6"], "--trajectories 6: must be an integer in 0"),
    ("digits", ["--trajectories=-1"], "--trajectories -1"),
  ],
)
def test_bad_labels_and_trajectories_are_one_line(
  toy, digits, tmp_path, capsys, no_restore, which, args, fragment
):
  workdir = {"toy": toy, "digits": digits}[which]
  out = tmp_path / "s.npz"
  code = cli.main(["sample", "--workdir", str(workdir), "--out", str(out), *args])
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2 and len(lines) == 1 and lines[0].startswith("diffjax: error: "), err
  assert fragment in lines[0] and "Traceback" not in err, lines[0]
  assert not out.exists() and not out.with_suffix(".png").exists()


@pytest.mark.slow
def test_trained_conditional_digits_end_to_end(tmp_path, capsys):
  """A class-conditional digits model trained through the CLI: labelled samples and their
  grid, then an evaluation with the likelihood in bits per dimension."""
  workdir = tmp_path / "w"
  run_lib.train_from_cli(digits_config(), str(workdir))
  out = tmp_path / "d.npz"
  sample(capsys, workdir, out, "--num", "30", "--label", "4", "--trajectories", "3")
  with np.load(out) as saved:
    assert list(saved["label"]) == [4] * 30 and saved["trajectories"].shape == (3, 3, 8, 8, 1)
  assert (
    matplotlib.image.imread(tmp_path / "d.png").shape[:2]
    == (plots.image_grid_layout(num=30, image_shape=(8, 8), labelled=True, titled=True)[-2:])
  )
  code = cli.main(["evaluate", "--workdir", str(workdir), "--num", "32", "--likelihood"])
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert code == 0 and np.isfinite(report["digits_frechet_distance"])
  assert report["nats_per_dim"] == pytest.approx(report["bits_per_dim"] * np.log(2.0))
