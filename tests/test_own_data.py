"""A researcher's own data: an npz of any example shape trained from a config (data.kind="npz").

The README's "Train on your own data" example is read from README.md and run, so it cannot go
stale: the fast test runs its Python and validates its train command's config; the slow test runs
its three commands end to end with small step counts appended. The other tests check what the
loader hands the model against the file's arrays themselves (vectors of five dimensions,
channel-first images, labels, value ranges) and that every data mistake is one line naming the
key and the fix, before anything compiles.
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex

import jax
import numpy as np
import pytest
from tiny import TINY, tiny_config

from diffjax import cli
from diffjax.data import images
from diffjax.train import config as config_lib
from diffjax.train import image_input

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTION = "## Train on your own data"


def _readme_example() -> tuple[str, list[list[str]]]:
  """The section's Python code and its ``diffjax`` commands (each split like a shell would)."""
  text = (ROOT / "README.md").read_text()
  assert SECTION in text, f"README.md has no {SECTION!r} section"
  section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
  python = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  bash = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
  assert len(python) == 1 and len(bash) == 1, "one python block and one bash block"
  commands = [shlex.split(line) for line in bash[0].splitlines() if line.startswith("diffjax ")]
  return python[0], commands


def _run_python(code: str, folder: pathlib.Path, monkeypatch) -> None:
  monkeypatch.chdir(folder)
  exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 -- our README


def _config_of(train: list[str]):
  """The config the README's ``diffjax train`` command builds (configs/ resolved in the repo)."""
  assert train[:2] == ["diffjax", "train"]
  args = train[2:]
  path = args[args.index("--config") + 1]
  config = config_lib.load_config_file(str(ROOT / path))
  return config, [a for a in args if a.startswith("--config.")]


def test_readme_example_makes_a_valid_config(tmp_path, monkeypatch):
  code, commands = _readme_example()
  assert [c[1] for c in commands] == ["train", "sample", "evaluate"]
  workdirs = {c[c.index("--workdir") + 1] for c in commands}
  assert len(workdirs) == 1, "train, sample and evaluate use one workdir"
  _run_python(code, tmp_path, monkeypatch)
  config, overrides = _config_of(commands[0])
  config_lib.apply_overrides(config, overrides)
  assert config.data.kind == "npz" and tuple(config.data.shape) == (2,)
  config_lib.validate(config, num_devices=None)  # reads the file the code wrote
  points = image_input.host_source(config)
  with np.load(tmp_path / config.data.path) as f:
    (array,) = f.values()
  np.testing.assert_array_equal(images.take(points, [0, len(array) - 1]), array[[0, -1]])


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch, capsys):
  code, (train, sample, evaluate) = _readme_example()
  _run_python(code, tmp_path, monkeypatch)
  args = train[1:]
  args[args.index("--config") + 1] = str(ROOT / args[args.index("--config") + 1])
  assert cli.main([*args, *TINY]) == 0
  assert cli.main([*sample[1:], "--num", "64", "--steps", "2"]) == 0
  out = pathlib.Path(sample[sample.index("--out") + 1])
  with np.load(out) as f:
    assert f["samples"].shape == (64, 2) and np.isfinite(f["samples"]).all()
  capsys.readouterr()
  assert cli.main([*evaluate[1:], "--num", "64", "--steps", "2"]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # W2 against 64 points of the file: a 12-step model is far off, but finite and positive.
  assert 0.0 < report["w2"] < 50.0
  workdir = pathlib.Path(train[train.index("--workdir") + 1])
  assert (workdir / "samples.png").is_file()


# ---- what the loader hands the model, against the file ------------------------------------


def _npz(tmp_path, name="data.npz", **arrays) -> str:
  path = tmp_path / name
  np.savez(path, **arrays)
  return str(path)


def _npz_config(path, *overrides, shape):
  return tiny_config(
    "--config.data.kind=npz",
    f"--config.data.path={path}",
    f"--config.data.shape={shape}",
    "--config.train.batch_size=8",
    *overrides,
  )


def _first_batch(config) -> dict:
  loader = images.make_loader(
    source=image_input.host_source(config), batch_size=8, seed=0, shuffle=False
  )
  return next(iter(loader))


def test_vectors_of_five_dimensions_are_used_as_they_are(tmp_path):
  rng = np.random.default_rng(0)
  vectors = 40.0 * rng.normal(size=(50, 5)) + 7.0  # far outside [-1, 1]: auto keeps vectors
  config = _npz_config(_npz(tmp_path, x=vectors), shape="(5,)")
  config_lib.validate(config, num_devices=None)
  batch = _first_batch(config)
  np.testing.assert_allclose(batch["image"], vectors[:8].astype(np.float32))
  assert batch["label"].tolist() == [0] * 8  # no labels in the file: unconditional
  # Reference points: min(num, N) distinct rows of the file, the same for the same key.
  reference = image_input.make_reference_points(config)
  key = jax.random.PRNGKey(3)
  drawn = reference(key, 20)
  rows = {tuple(row) for row in vectors.astype(np.float32)}
  assert drawn.shape == (20, 5) and all(tuple(row) in rows for row in drawn)
  assert len({tuple(row) for row in drawn}) == 20
  np.testing.assert_array_equal(drawn, reference(key, 20))
  assert reference(key, 500).shape == (50, 5)  # all of them, each once


def test_channel_first_images_with_a_value_range(tmp_path):
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, size=(16, 1, 8, 6), dtype=np.uint8)  # [N, C, H, W]
  path = _npz(tmp_path, image=pixels)
  expected = np.transpose(pixels, (0, 2, 3, 1)).astype(np.float64) / 127.5 - 1.0
  for value_range in ("0,255", "auto"):  # a stated range, and uint8's own [0, 255]
    config = _npz_config(
      path,
      "--config.data.layout=nchw",
      f"--config.data.value_range={value_range}",
      "--config.model.name=unet",
      shape="(8, 6, 1)",
    )
    assert image_input.dataset_kwargs(config)["layout"] == "NCHW"
    config_lib.validate(config, num_devices=None)
    np.testing.assert_allclose(_first_batch(config)["image"], expected[:8], atol=1e-6)


@pytest.mark.parametrize(
  "value_range, lo, hi",
  [("-1,1", -1.0, 1.0), ("0,1", 0.0, 1.0), ("-4, 12", -4.0, 12.0), ("none", None, None)],
)
def test_value_ranges_map_affinely_to_the_model_range(tmp_path, value_range, lo, hi):
  raw = np.linspace(lo if lo is not None else -30.0, hi if hi is not None else 30.0, 16)
  raw = np.stack([raw, raw[::-1]], axis=1)
  config = _npz_config(
    _npz(tmp_path, x=raw), f"--config.data.value_range={value_range}", shape="(2,)"
  )
  config_lib.validate(config, num_devices=None)
  expected = raw if lo is None else 2.0 * (raw - lo) / (hi - lo) - 1.0
  np.testing.assert_allclose(_first_batch(config)["image"], expected[:8], rtol=1e-6, atol=1e-6)


def test_labels_are_read_for_a_conditional_model(tmp_path):
  rng = np.random.default_rng(2)
  points, classes = rng.normal(size=(24, 2)), np.arange(24) % 3
  path = _npz(tmp_path, x=points, cls=classes)
  conditional = _npz_config(
    path, "--config.data.label_key=cls", "--config.data.num_classes=3", shape="(2,)"
  )
  config_lib.validate(conditional, num_devices=None)
  assert _first_batch(conditional)["label"].tolist() == classes[:8].tolist()
  # Unconditional: the same file trains without its labels, and a file without any works too.
  config_lib.validate(_npz_config(path, shape="(2,)"), num_devices=None)
  bare = _npz_config(_npz(tmp_path, "bare.npz", x=points), shape="(2,)")
  config_lib.validate(bare, num_devices=None)


# ---- every mistake is one line naming the key and the fix -----------------------------------

_POINTS = np.random.default_rng(3).normal(size=(40, 2)).astype(np.float32)
_NAN = _POINTS.copy()
_NAN[5, 1] = np.nan


@pytest.mark.parametrize(
  "arrays, overrides, fragment",
  [
    (dict(x=_POINTS), ["--config.data.shape=(3,)"], "set data.shape=(2,)"),
    (dict(x=_NAN), [], "1 NaN"),
    (dict(x=_POINTS), ["--config.train.batch_size=64"], "holds 40 examples"),
    (dict(x=_POINTS), ["--config.data.augment_flip=true"], "data.augment_flip=True"),
    (dict(x=_POINTS), ["--config.data.layout=nchw"], "keep data.layout='nhwc'"),
    (dict(x=_POINTS), ["--config.data.layout=hwc"], "data.layout='hwc'"),
    (dict(x=_POINTS), ["--config.data.value_range=0-255"], "data.value_range='0-255'"),
    (dict(x=_POINTS), ["--config.data.value_range=1,0"], "lo < hi"),
    (dict(x=_POINTS), ["--config.data.value_range=0,1"], "outside value_range"),
    (dict(points=_POINTS), [], "no array 'image/x'; it holds ['points']. Set data.key"),
    (dict(x=_POINTS), ["--config.data.key=points"], "has no array 'points'"),
    (
      dict(x=_POINTS),
      ["--config.data.num_classes=3"],
      "'label'; it holds ['x']. Set data.label_key",
    ),
    (
      dict(x=_POINTS, label=np.full(40, 5)),
      ["--config.data.num_classes=3"],
      "set data.num_classes=6",
    ),
    (
      dict(x=_POINTS),
      ["--config.data.num_classes=3", "--config.data.label_key="],
      "data.label_key='' (no labels)",
    ),
    (dict(x=_POINTS[:, 0]), ["--config.data.shape=(1,)"], "reshape scalars to [N, 1]"),
    (dict(x=_POINTS), ["--config.data.shape=(2, 1)"], "holds vectors of shape (2,)"),
    (
      dict(x=np.zeros((40, 5), np.float32)),
      ["--config.data.shape=(5,)", "--config.data.source=moons"],
      "only 2D data",
    ),
    (dict(x=_POINTS), ["--config.data.path="], "data.path is empty"),
  ],
)
def test_data_mistakes_are_one_line(tmp_path, arrays, overrides, fragment):
  path = _npz(tmp_path, **arrays)
  config = tiny_config(
    "--config.data.kind=npz",
    f"--config.data.path={path}",
    "--config.train.batch_size=8",
    *overrides,
  )
  with pytest.raises(config_lib.ConfigError) as caught:
    config_lib.validate(config, num_devices=None)
  message = str(caught.value)
  assert fragment in message and "\n" not in message, message


def test_runs_from_before_the_npz_keys_still_match_their_checkpoints():
  """A checkpoint records the config fingerprint of its run; one written before data.key,
  data.label_key, data.layout and data.value_range existed lacks them, and their defaults do
  what that run did, so they are no difference; any other value of them is."""
  config = tiny_config()
  new = config_lib.resume_fingerprint(config)
  added = ("data.key", "data.label_key", "data.layout", "data.value_range")
  old = {key: value for key, value in new.items() if key not in added}
  assert config_lib.fingerprint_differences(old, new) == []
  config_lib.apply_overrides(config, ["--config.data.layout=nchw"])
  differences = config_lib.fingerprint_differences(old, config_lib.resume_fingerprint(config))
  assert differences == ["data.layout: '<absent>' -> 'nchw'"]
