"""The `diffjax` command end to end on a tiny config, and its one-line errors."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from diffjax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "toy2d_icfm.py")
TINY = [
  "--config.train.steps=20",
  "--config.train.fused_steps=10",
  "--config.train.log_every=10",
  "--config.train.checkpoint_every=10",
  "--config.train.batch_size=64",
  "--config.model.width=32",
  "--config.train.progress_bar=false",
  "--config.sample.num=64",
  "--config.sample.steps=4",
]


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cli")
  assert cli.main(["train", "--config", CONFIG, "--workdir", str(workdir), *TINY]) == 0
  return workdir


def test_train_writes_workdir(trained_workdir):
  for name in ("config.json", "metrics.jsonl", "samples.png", "checkpoints"):
    assert (trained_workdir / name).exists(), name


@pytest.mark.slow
def test_sample_every_flow_sampler(trained_workdir, tmp_path, capsys):
  for sampler in ("euler", "heun", "rk4", "dopri5"):
    out = tmp_path / f"{sampler}.npz"
    assert (
      cli.main(
        [
          "sample",
          "--workdir",
          str(trained_workdir),
          "--num",
          "50",
          "--out",
          str(out),
          "--steps",
          "4",
          "--sampler",
          sampler,
        ]
      )
      == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with np.load(out, allow_pickle=False) as f:
      samples = f["samples"]
    assert samples.shape == (50, 2) and np.isfinite(samples).all()
    assert report["num"] == 50 and report["step"] == 20 and report["nfe"] > 0


# slow: a second evaluate through the CLI (6 s); tests/test_evaluate_cli.py covers the command fast
@pytest.mark.slow
def test_evaluate_prints_w2(trained_workdir, capsys):
  assert (
    cli.main(["evaluate", "--workdir", str(trained_workdir), "--num", "200", "--steps", "8"]) == 0
  )
  metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # A 20-step model is far from the target but W2 is a finite positive distance.
  assert metrics["step"] == 20 and 0.0 < metrics["w2"] < 20.0
  # NLL of 8gaussians points (nats): finite; no density on R^2 that puts its mass this spread
  # out can have an NLL below the target's own entropy-ish scale of ~2.5, so a negative value
  # would be a sign error in the divergence integral.
  assert np.isfinite(metrics["nll"]) and metrics["nll"] > 0.0


@pytest.mark.parametrize(
  "override, fragment",
  [
    ("--config.train.stepz=3", "train.stepz: unknown key"),
    ("--config.train.steps=abc", "expected an integer"),
    ("--config.train.steps=-5", "train.steps=-5: must be > 0"),
    ("--config.optimizer.learning_rate=nan", "must be a finite number"),
    ("--config.train.batch_size=60", "not divisible by"),
    ("--config.model.name=resnet", "model.name='resnet': unknown"),
    ("--config.data.target=spiral", "data.target='spiral': unknown"),
    ("--config.objective.name=magic", "objective.name='magic': unknown"),
    ("--config.data.shape=(3,)", "data.shape=(3,)"),
    ("--config.train.ema_decay=1.5", "train.ema_decay=1.5"),
  ],
)
def test_bad_config_fails_in_one_line(tmp_path, capsys, override, fragment):
  workdir = tmp_path / "wd"
  code = cli.main(["train", "--config", CONFIG, "--workdir", str(workdir), *TINY, override])
  err = capsys.readouterr().err
  assert code == 2
  assert fragment in err, err
  assert "Traceback" not in err
  assert not workdir.exists()  # nothing written


@pytest.mark.slow
def test_errors_before_any_compile_in_a_fresh_process(tmp_path):
  """A config typo exits 2 with one line and no traceback, also as a real process."""
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "diffjax.cli",
      "train",
      "--config",
      CONFIG,
      "--workdir",
      str(tmp_path / "wd"),
      "--config.optimizer.lr=0.1",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("diffjax: error: --config.optimizer.lr: unknown key")
  assert "Traceback" not in proc.stderr


def test_workdir_that_is_a_file(tmp_path, capsys):
  path = tmp_path / "file"
  path.write_text("x")
  assert cli.main(["train", "--config", CONFIG, "--workdir", str(path), *TINY]) == 2
  assert "is a file" in capsys.readouterr().err
  assert path.read_text() == "x"


def test_sample_needs_a_trained_workdir(tmp_path, capsys):
  assert (
    cli.main(["sample", "--workdir", str(tmp_path), "--num", "4", "--out", str(tmp_path / "s.npz")])
    == 2
  )
  assert "config.json not found" in capsys.readouterr().err
