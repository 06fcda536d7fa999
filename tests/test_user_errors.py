"""Mistakes users made, each once a silent wrong result or a traceback, now one line and exit 2:
labels outside ``data.num_classes``, a mistyped ``:variant``, ``--guidance`` on a model that
cannot be guided, and a WORKDIR/config.json edited after training."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny  # pylint: disable=wrong-import-order

from diffjax import cli
from diffjax.train import config as config_lib
from diffjax.train import loop
from diffjax.train import trainer as trainer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))
TOY = str(ROOT / "configs" / "toy2d_icfm.py")
DIGITS = str(ROOT / "configs" / "digits_fm.py")
# tests/tiny.py's run, four steps with a checkpoint every two.
TINY = [*tiny.TINY, "--config.train.steps=4", "--config.train.checkpoint_every=2"]


@pytest.fixture()
def tripwire(monkeypatch):
  """Reaching the train loop (hence compiling anything) fails the test."""

  def no_training(*args, **kwargs):
    raise AssertionError("a bad input reached training")

  monkeypatch.setattr(loop, "train", no_training)


def one_line(capsys) -> str:
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("diffjax: error: "), lines
  return lines[0]


# ---- 1. labels outside data.num_classes --------------------------------------------------------


@pytest.mark.parametrize("num_classes", [1, 2, 9])
def test_digits_labels_beyond_num_classes_fail_before_compiling(
  tmp_path, capsys, tripwire, num_classes
):
  """Digits hold labels 0..9: num_classes=1 read labels 2..9 outside the label table (NaN
  losses), 9 trained label 9 as the classifier-free null label without a word."""
  code = cli.main(
    [
      "train",
      "--config",
      DIGITS + ":small",
      "--workdir",
      str(tmp_path / "w"),
      f"--config.data.num_classes={num_classes}",
    ]
  )
  line = one_line(capsys)
  assert code == 2
  assert f"data.num_classes={num_classes} but the labels in 'digits' span 0..9" in line
  assert "set data.num_classes=10" in line
  assert not (tmp_path / "w").exists()


def _npz(path: pathlib.Path, labels) -> str:
  labels = np.asarray(labels, np.int32)
  images = np.random.default_rng(0).integers(0, 256, (labels.size, 8, 8, 1), dtype=np.uint8)
  np.savez(path, image=images, label=labels)
  return str(path)


@pytest.mark.parametrize(
  "labels, num_classes, fragment",
  [
    ([0, 1, 2] * 6, 2, "span 0..2"),  # label 2 would train as the null label
    ([-1, 0, 1] * 6, 2, "span -1..1"),
  ],
)
def test_npz_labels_outside_num_classes_fail_before_compiling(
  tmp_path, capsys, tripwire, labels, num_classes, fragment
):
  path = _npz(tmp_path / "data.npz", labels)
  code = cli.main(
    [
      "train",
      "--config",
      DIGITS + ":small",
      "--workdir",
      str(tmp_path / "w"),
      "--config.data.target=npz",
      f"--config.data.path={path}",
      f"--config.data.num_classes={num_classes}",
    ]
  )
  line = one_line(capsys)
  assert code == 2 and f"data.num_classes={num_classes}" in line and fragment in line


def test_labels_in_range_and_unconditional_models_pass():
  assert config_lib.label_problem(np.arange(10), num_classes=10, origin="x") is None
  assert config_lib.label_problem(np.arange(10), num_classes=0, origin="x") is None  # ignored
  assert "set data.num_classes=10" in config_lib.label_problem(
    np.arange(10), num_classes=3, origin="x"
  )


def test_loader_checks_labels_of_every_batch(tmp_path):
  """Sources whose labels validation cannot see (TFDS) are checked batch by batch on the host:
  the first batch is read before the train step compiles."""
  from diffjax.train import image_input
  from diffjax.train import sharding as sharding_lib

  path = _npz(tmp_path / "d.npz", [0, 1, 2] * 8)
  config = config_lib.load_config_file(DIGITS + ":small")
  config_lib.apply_overrides(
    config,
    [
      "--config.data.target=npz",
      "--config.train.batch_size=8",
      f"--config.data.path={path}",
      "--config.data.num_classes=2",
    ],
  )
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
  make_iterator, next_batch, _ = image_input.make_input_hooks(config, mesh)
  with pytest.raises(
    config_lib.ConfigError,
    match=r"data.num_classes=2 but the labels in a "
    r"batch of data.target='npz' span [01]\.\.2 .*data.num_classes >= 3",
  ):
    next_batch(make_iterator({}))


def nan_data_train(config, workdir):
  """loop.train on one device with every data point NaN (every step non-finite), no plot."""
  original = trainer_lib.build_experiment

  def build(cfg, *, mesh):
    experiment = original(cfg, mesh=mesh)
    sample_batch = experiment.sample_batch

    def nan_batch(key):
      return jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), sample_batch(key))

    return experiment._replace(sample_batch=nan_batch, plot=None)

  trainer_lib.build_experiment = build
  try:
    return loop.train(config, workdir, devices=jax.devices()[:1])
  finally:
    trainer_lib.build_experiment = original


# slow: a real all-NaN training (15 s); the halting rule itself is covered by test_reliability's
# non-finite tests
@pytest.mark.slow
def test_run_without_a_finite_step_halts(tmp_path):
  """The user's NaN run exited 0: 3 steps, all non-finite, never exceed the streak limit of 3,
  so the loop saved the untrained state and plotted. A run that never had a finite step halts."""
  config = config_lib.load_config_file(TOY)
  config_lib.apply_overrides(
    config,
    [
      *TINY,
      "--config.train.steps=3",
      "--config.train.fused_steps=3",
      "--config.train.checkpoint_every=3",
    ],
  )
  with pytest.raises(loop.NonFiniteLossError, match="every step"):
    nan_data_train(config, tmp_path / "w")
  assert not list((tmp_path / "w" / "checkpoints").glob("[0-9]*"))


# ---- 2. config variants ----------------------------------------------------------------------


def test_mistyped_variant_fails_naming_the_known_ones(tmp_path, capsys, tripwire):
  code = cli.main(
    [
      "train",
      "--config",
      str(ROOT / "configs" / "toy2d_otcfm.py") + ":smal",
      "--workdir",
      str(tmp_path / "w"),
    ]
  )
  line = one_line(capsys)
  assert code == 2
  assert "unknown variant 'smal' (did you mean 'small'?)" in line and "'small'" in line
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_declares_its_variants(path):
  """Each file lists its variants; each loads and validates, alone and all combined, and a
  name it does not declare is refused."""
  spec = importlib.util.spec_from_file_location(f"check_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  variants = module.VARIANTS
  assert isinstance(variants, tuple) and all(isinstance(v, str) and v for v in variants)
  for variant in [*variants, ",".join(variants)]:
    config_lib.validate(config_lib.load_config_file(f"{path}:{variant}"), num_devices=None)
  with pytest.raises(config_lib.ConfigError, match="unknown variant 'nonesuch'"):
    config_lib.load_config_file(f"{path}:nonesuch")


def test_variants_change_the_config():
  """``:small`` shrinks the run and ``:cond`` makes the model conditional, combined with ','."""
  small = config_lib.load_config_file(DIGITS + ":cond,small")
  assert small.train.steps == 20 and small.data.num_classes == 10
  assert config_lib.load_config_file(DIGITS).train.steps == 5_000


def test_file_without_variants_declaration(tmp_path):
  """A file that declares nothing gets its variant as before (its get_config decides);
  a malformed declaration is refused."""
  header = "from diffjax.train.config import base_config\n"
  free = tmp_path / "free.py"
  free.write_text(
    header + "def get_config(variant=''):\n  c = base_config()\n"
    "  c.train.steps = 7 if variant == 'anything' else 9\n  return c\n"
  )
  assert config_lib.load_config_file(f"{free}:anything").train.steps == 7
  assert config_lib.load_config_file(str(free)).train.steps == 9
  bad = tmp_path / "bad.py"
  bad.write_text(
    header + "VARIANTS = 'small'\ndef get_config(variant=''):\n  return base_config()\n"
  )
  with pytest.raises(config_lib.ConfigError, match="declare a tuple of variant names"):
    config_lib.load_config_file(f"{bad}:small")


# ---- 3 and 4. sampling a workdir ---------------------------------------------------------------


@pytest.fixture()
def trained_workdir(toy_init_workdir):
  """An unconditional 2D model's workdir as `diffjax train` leaves it, holding its initial state
  (what these tests check is read before any sample is drawn, or needs no trained model): the
  shared one of conftest.py, read-only (tests that edit it copy it)."""
  return toy_init_workdir


def test_guidance_on_an_unconditional_model(trained_workdir, tmp_path, capsys):
  out = tmp_path / "s.npz"
  code = cli.main(
    [
      "sample",
      "--workdir",
      str(trained_workdir),
      "--num",
      "8",
      "--out",
      str(out),
      "--guidance",
      "2.0",
    ]
  )
  line = one_line(capsys)
  assert code == 2
  assert "--guidance 2.0" in line and "unconditional (data.num_classes=0)" in line
  assert not out.exists()


def test_guidance_without_label_dropout(trained_workdir, tmp_path, capsys):
  """A conditional model trained without label dropout never trained its null label."""
  workdir = tmp_path / "cond"
  workdir.mkdir()
  config = config_lib.load_config_file(DIGITS + ":cond,small")
  config_lib.apply_overrides(config, ["--config.objective.label_dropout=0.0"])
  (workdir / "config.json").write_text(config_lib.config_to_json(config))
  code = cli.main(
    [
      "sample",
      "--workdir",
      str(workdir),
      "--num",
      "8",
      "--out",
      str(tmp_path / "s.npz"),
      "--guidance",
      "2.0",
    ]
  )
  line = one_line(capsys)
  assert code == 2 and "--guidance 2.0" in line and "objective.label_dropout=0" in line


def _edited_copy(trained_workdir, tmp_path, **changes) -> pathlib.Path:
  workdir = tmp_path / "edited"
  shutil.copytree(trained_workdir, workdir)
  path = workdir / "config.json"
  config = json.loads(path.read_text())
  for key, value in changes.items():
    group, name = key.split("__")
    config[group][name] = value
  path.write_text(json.dumps(config))
  return workdir


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_hand_edited_config_json_names_what_differs(trained_workdir, tmp_path, capsys, command):
  workdir = _edited_copy(trained_workdir, tmp_path, model__width=48)
  extra = ["--out", str(tmp_path / "s.npz")] if command == "sample" else []
  code = cli.main([command, "--workdir", str(workdir), "--num", "8", *extra])
  line = one_line(capsys)
  assert code == 2
  assert f"{workdir / 'config.json'} no longer matches" in line
  assert "model.width: 16 -> 48" in line
  assert "restore those values in config.json, or train in a new --workdir" in line
  assert "train first" not in line


def test_edit_outside_the_fingerprint_still_samples(trained_workdir, tmp_path, capsys):
  """``sample.*`` is read at inference only: editing it is not a mismatch."""
  workdir = _edited_copy(trained_workdir, tmp_path, sample__steps=3)
  out = tmp_path / "s.npz"
  assert cli.main(["sample", "--workdir", str(workdir), "--num", "8", "--out", str(out)]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["step"] == 1 and report["num"] == 8  # the fixture's one committed step


def test_only_damaged_checkpoints_is_not_called_missing(trained_workdir, tmp_path, capsys):
  """Steps whose commit markers are gone are skipped with a warning each; the error then says
  that checkpoints exist but none is usable, not "train first"."""
  from diffjax.train import integrity

  workdir = _edited_copy(trained_workdir, tmp_path)
  for marker in (workdir / "checkpoints").glob(f"*/{integrity.COMMIT_FILE}"):
    marker.unlink()
  code = cli.main(
    ["sample", "--workdir", str(workdir), "--num", "8", "--out", str(tmp_path / "s.npz")]
  )
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert code == 2 and "none of the 1 checkpoint steps" in last and "train first" not in last
