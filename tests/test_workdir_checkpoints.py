"""The checkpoint folder in a hostile workdir (issue 19.1, 19.2, 19.7; 13.7): path characters
orbax mishandles, markers only for steps orbax opens back, read-only readers, symbolic links,
exclusive temporary files, and digests taken per shard."""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax import cli
from diffjax import run as run_lib
from diffjax.train import atomic_write, integrity, loop
from diffjax.train import checkpoint as ckpt
from diffjax.train import config as config_lib
from diffjax.train import sharding as sharding_lib
from diffjax.train.trainer import make_trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy2d_icfm.py")


def _tree_state():
  return {"w": jnp.arange(12.0).reshape(4, 3), "b": {"c": jnp.ones(5, jnp.int32)}}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _save_and_commit(directory: pathlib.Path, step: int = 1):
  manager = ckpt.make_checkpoint_manager(directory, keep=3, async_save=False)
  try:
    pending = ckpt.save_step(manager, step, _tree_state(), {"step": step})
    ckpt.commit_step(manager, pending, config={}, is_lead=True)
  finally:
    manager.close()


def _listing(directory: pathlib.Path) -> dict:
  """Every entry under ``directory`` (links not followed) with its kind, size and mtime."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      st = os.lstat(os.path.join(root, name))
      out[os.path.relpath(os.path.join(root, name), directory)] = (
        st.st_mode,
        st.st_size,
        st.st_mtime_ns,
      )
  return out


# -- 19.1: path characters -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sweep[lr=0.001]", "a]b", "a[b", "run*", "run?", "a\\b"])
def test_unsafe_path_characters_are_refused_in_one_line(tmp_path, name):
  with pytest.raises(ckpt.CheckpointPathError) as info:
    ckpt.check_directory(tmp_path / name / "checkpoints")
  message = str(info.value)
  assert "\n" not in message and "--workdir without" in message
  bad = [c for c in name if c in ckpt.UNSAFE_PATH_CHARACTERS]
  assert all(repr(c) in message for c in bad)
  fixed = message.rsplit("e.g. ", 1)[1].strip("'")
  ckpt.check_directory(pathlib.Path(fixed) / "checkpoints")  # the suggestion is accepted


def test_unsafe_characters_in_the_working_directory_count(tmp_path, monkeypatch):
  cwd = tmp_path / "lab[1]"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  with pytest.raises(ckpt.CheckpointPathError, match=r"'\['"):
    ckpt.check_directory(pathlib.Path("run") / "checkpoints")


SAFE = [" ", "%", "%20", "#", "=", ",", "é", "日本", "'", '"', ":", ";", "&", "$", "!", "{}", "~"]


@pytest.mark.parametrize("chars", SAFE)
def test_safe_path_characters_save_and_restore(tmp_path, chars):
  directory = tmp_path / f"w{chars}x" / "checkpoints"
  ckpt.check_directory(directory)
  _save_and_commit(directory)
  manager = ckpt.make_checkpoint_manager(directory, keep=3, async_save=False, read_only=True)
  try:
    restored = ckpt.restore_verified(
      manager,
      _abstract(_tree_state()),
      config={},
      move_bad=False,
      config_differences=lambda a, b: [],
    )
  finally:
    manager.close()
  assert restored is not None and restored[0] == 1
  np.testing.assert_array_equal(restored[1]["w"], _tree_state()["w"])


@pytest.mark.parametrize("name", ["sweep[lr=0.001]", "a\\b"])
def test_no_marker_for_a_step_orbax_cannot_open(tmp_path, name):
  """Saved through orbax anyway (bypassing the path check): the step is never trusted."""
  directory = tmp_path / name / "checkpoints"
  with pytest.raises(ckpt.CheckpointUnreadableError, match="no commit marker written"):
    _save_and_commit(directory)
  assert not list(directory.glob(f"*/{integrity.COMMIT_FILE}"))
  assert isinstance(ckpt.CheckpointUnreadableError("x"), ckpt.CheckpointMismatchError)


def test_marker_written_for_a_step_orbax_opens(tmp_path):
  directory = tmp_path / "plain" / "checkpoints"
  _save_and_commit(directory)
  record, reason = integrity.read_commit(directory / "1")
  assert reason is None and integrity.verify_files(directory / "1", record) is None


def test_cli_refuses_a_bracketed_workdir_before_training(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "sweep[lr=0.001]"
  monkeypatch.setattr(loop, "_Run", None)  # the loop must never be reached
  code = cli.main(
    ["train", "--config", f"{TOY}:small", "--config.train.progress_bar=false"]
    + ["--workdir", str(workdir)]
  )
  lines = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(lines) == 1, lines
  assert "'['" in lines[0] and "--workdir without" in lines[0]
  assert not (workdir / "checkpoints").exists()


# -- 19.2: read-only readers -----------------------------------------------------------------


def _toy_config(*overrides):
  config = config_lib.load_config_file(f"{TOY}:small")
  config_lib.apply_overrides(config, ["--config.train.progress_bar=false", *overrides])
  return config


def _write_run(workdir: pathlib.Path, config, steps, devices) -> None:
  """A workdir as ``diffjax train`` leaves it (config.json, committed steps), without the cost
  of compiling a train step: the initial state saved at each of ``steps``."""
  mesh = sharding_lib.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp, devices=devices)
  state = make_trainer(config, mesh).create_state()
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(config_lib.config_to_json(config))
  manager = ckpt.make_checkpoint_manager(workdir / "checkpoints", keep=5, async_save=False)
  try:
    for step in steps:
      pending = ckpt.save_step(manager, step, state, {"step": step})
      ckpt.commit_step(manager, pending, config=config_lib.resume_fingerprint(config), is_lead=True)
  finally:
    manager.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A toy workdir with committed steps 20 and 40."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  _write_run(workdir, _toy_config(), [20, 40], jax.devices()[:1])
  return workdir


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
  return dst


def test_reader_changes_nothing_in_checkpoints(trained, tmp_path):
  workdir = _copy(trained, tmp_path / "w")
  checkpoints = workdir / "checkpoints"
  # A save in progress (its tmp folder) and a step renamed but not yet committed.
  tmp = checkpoints / "60.orbax-checkpoint-tmp-1234"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "partial").write_bytes(b"x" * 100)
  _copy(checkpoints / "40", checkpoints / "80")
  (checkpoints / "80" / integrity.COMMIT_FILE).unlink()
  before = _listing(workdir)
  _, _, params, step = run_lib.restore_for_inference(workdir)
  assert step == 40 and jax.tree.leaves(params)
  assert _listing(workdir) == before  # nothing created, deleted, moved or touched
  assert not (workdir / ckpt.QUARANTINE).exists()


def test_reader_starts_over_when_a_trainer_deletes_the_step_it_reads(
  trained, tmp_path, monkeypatch
):
  # The trainer's rotation (train.keep_checkpoints) deletes step 20 while the reader verifies it:
  # the read starts over and finds the newest step; a workdir that never settles is one line.
  workdir = _copy(trained, tmp_path / "w")
  real, calls = ckpt.restore_verified, []

  def rotating(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
      raise FileNotFoundError(2, "No such file", str(workdir / "checkpoints" / "20"))
    return real(*args, **kwargs)

  monkeypatch.setattr(ckpt, "restore_verified", rotating)
  assert run_lib.restore_for_inference(workdir)[3] == 40 and len(calls) == 2

  def vanishing(*args, **kwargs):
    raise FileNotFoundError(2, "No such file", str(workdir / "checkpoints" / "40"))

  monkeypatch.setattr(ckpt, "restore_verified", vanishing)
  with pytest.raises(run_lib.UsageError, match="kept vanishing while being read"):
    run_lib.restore_for_inference(workdir)


def test_reader_starts_over_when_every_step_it_listed_failed_and_a_new_one_appeared(
  trained, tmp_path, monkeypatch
):
  # The read finds no usable step (the steps it listed were deleted or half-read: orbax's error
  # is caught as a bad step) while the trainer commits a newer one: it starts over and finds it.
  # Steps that never stop changing are one line; an unchanged listing with no usable step is
  # the usual "none usable" error at once, without rereading.
  workdir = _copy(trained, tmp_path / "w")
  aside = tmp_path / "40"
  (workdir / "checkpoints" / "40").rename(aside)
  real, calls = ckpt.restore_verified, []

  def rotating(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
      aside.rename(workdir / "checkpoints" / "40")
      return None
    return real(*args, **kwargs)

  monkeypatch.setattr(ckpt, "restore_verified", rotating)
  assert run_lib.restore_for_inference(workdir)[3] == 40 and len(calls) == 2

  def churning(*args, **kwargs):
    calls.append(1)
    _copy(workdir / "checkpoints" / "40", workdir / "checkpoints" / str(100 + len(calls)))
    return None

  monkeypatch.setattr(ckpt, "restore_verified", churning)
  with pytest.raises(run_lib.UsageError, match="kept changing while being read"):
    run_lib.restore_for_inference(workdir)

  calls.clear()
  monkeypatch.setattr(ckpt, "restore_verified", lambda *args, **kwargs: calls.append(1))
  with pytest.raises(run_lib.UsageError, match="is usable"):
    run_lib.restore_for_inference(workdir)
  assert len(calls) == 1


def test_reader_without_checkpoints_creates_nothing(trained, tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "config.json").write_bytes((trained / "config.json").read_bytes())
  with pytest.raises(run_lib.UsageError, match="train first"):
    run_lib.restore_for_inference(workdir)
  assert sorted(p.name for p in workdir.iterdir()) == ["config.json"]


def test_trainer_still_cleans_its_own_tmp_dirs(trained, tmp_path):
  checkpoints = _copy(trained, tmp_path / "w") / "checkpoints"
  (checkpoints / "60.orbax-checkpoint-tmp-1234").mkdir()
  assert ckpt.prepare_directory(checkpoints) == ["60.orbax-checkpoint-tmp-1234"]


# -- 19.7: symbolic links and exclusive temporary files ---------------------------------------


def test_symlink_named_like_a_step_is_refused_in_one_line(trained, tmp_path):
  workdir = _copy(trained, tmp_path / "w")
  outside = tmp_path / "outside"
  outside.mkdir()
  (workdir / "checkpoints" / "100").symlink_to(outside)
  before = _listing(workdir)
  for call in (
    lambda: ckpt.prepare_directory(workdir / "checkpoints", config={}, config_differences=None),
    lambda: run_lib.restore_for_inference(workdir),
  ):
    with pytest.raises(ckpt.CheckpointPathError) as info:
      call()
    assert "\n" not in str(info.value) and "is a symbolic link" in str(info.value)
    assert isinstance(info.value, config_lib.ConfigError)  # the CLI's one line, exit 2
  assert _listing(workdir) == before and not any(outside.iterdir())


def test_symlinked_quarantine_is_not_followed(trained, tmp_path):
  workdir = _copy(trained, tmp_path / "w")
  outside = tmp_path / "outside"
  outside.mkdir()
  (workdir / ckpt.QUARANTINE).symlink_to(outside)
  (workdir / "checkpoints" / "40" / integrity.COMMIT_FILE).unlink()  # a bad step to move
  with pytest.raises(ckpt.CheckpointPathError, match="symbolic link or a file"):
    ckpt.prepare_directory(workdir / "checkpoints", config={}, config_differences=None)
  with pytest.raises(NotADirectoryError):
    integrity.quarantine(workdir / "checkpoints" / "40", into=workdir / ckpt.QUARANTINE, reason="x")
  assert not any(outside.iterdir()) and (workdir / "checkpoints" / "40").is_dir()


def test_symlink_inside_a_step_makes_it_untrusted(trained, tmp_path):
  step_dir = _copy(trained, tmp_path / "w") / "checkpoints" / "40"
  record, _ = integrity.read_commit(step_dir)
  target = next(p for p in sorted((step_dir / "state").rglob("*")) if p.is_file())
  outside = tmp_path / "outside_file"
  outside.write_bytes(target.read_bytes())
  target.unlink()
  target.symlink_to(outside)  # same bytes, but through a link
  assert "symbolic link" in integrity.verify_files(step_dir, record)


def test_marker_write_ignores_a_planted_tmp_link(tmp_path):
  directory = tmp_path / "ck"
  victim = tmp_path / "victim.txt"
  victim.write_text("keep me")
  manager = ckpt.make_checkpoint_manager(directory, keep=3, async_save=False)
  try:
    pending = ckpt.save_step(manager, 1, _tree_state(), {"step": 1})
    manager.wait_until_finished()
    (directory / "1" / (integrity.COMMIT_FILE + ".tmp")).symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
      ckpt.commit_step(manager, pending, config={}, is_lead=True)
  finally:
    manager.close()
  assert victim.read_text() == "keep me"


def test_atomic_open_never_writes_through_a_link(tmp_path):
  victim = tmp_path / "victim.txt"
  victim.write_text("keep me")
  path = tmp_path / "config.json"
  (tmp_path / "config.json.tmp").symlink_to(victim)  # the old fixed temporary name
  path.symlink_to(victim)  # the destination itself a link
  atomic_write.write_atomic(path, '{"a": 1}')
  assert victim.read_text() == "keep me"
  assert not path.is_symlink() and path.read_text() == '{"a": 1}'
  with pytest.raises(FileExistsError):
    atomic_write.create_exclusive(tmp_path / "config.json.tmp")
  assert victim.read_text() == "keep me"
  leftovers = sorted(p.name for p in tmp_path.iterdir())
  assert leftovers == ["config.json", "config.json.tmp", "victim.txt"]


def test_atomic_open_leaves_the_old_file_on_error(tmp_path):
  path = tmp_path / "out.npz"
  path.write_bytes(b"old")
  with pytest.raises(RuntimeError), atomic_write.atomic_open(path) as f:
    np.savez(f, x=np.ones(3))
    raise RuntimeError("interrupted")
  assert path.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [path]
  with atomic_write.atomic_open(path) as f:
    np.savez(f, x=np.ones(3))
  np.testing.assert_array_equal(np.load(path)["x"], np.ones(3))


# -- 13.7: digests per shard -------------------------------------------------------------------


def _mesh(n):
  return jax.make_mesh((n,), ("fsdp",), devices=jax.devices()[:n])


def test_sharded_array_is_digested_block_by_block():
  x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
  sharded = jax.device_put(x, NamedSharding(_mesh(8), P("fsdp")))
  digest = integrity.array_digests({"x": sharded})["['x']"]
  spec, blocks = digest.rsplit(" ", 1)
  assert spec == "float32 [8, 6]"
  expected = ";".join(
    f"{i}:{i + 1},0:6={hashlib.sha256(x[i : i + 1].tobytes()).hexdigest()}" for i in range(8)
  )
  assert blocks == expected


def test_replicated_array_is_one_plain_sha256_hashed_once(monkeypatch):
  x = np.arange(10, dtype=np.float32)
  replicated = jax.device_put(x, NamedSharding(_mesh(8), P()))
  hashed = []
  real = integrity._sha256
  monkeypatch.setattr(integrity, "_sha256", lambda a: hashed.append(a.shape) or real(a))
  digest = integrity.array_digests({"x": replicated})["['x']"]
  assert digest == f"float32 [10] {hashlib.sha256(x.tobytes()).hexdigest()}"
  assert hashed == [(10,)]  # replica 0 only, not once per device


def test_digests_merge_from_processes_and_verify_in_another_layout():
  x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
  tree = {"x": jax.device_put(x, NamedSharding(_mesh(4), P("fsdp"))), "s": jnp.int32(7)}
  local = integrity.local_array_digests(tree)
  # Two "processes", each owning half of the blocks of x (the scalar on the first).
  blocks = sorted(local["['x']"][2])
  first = {k: [*v[:2], dict(v[2])] for k, v in local.items()}
  second = {k: [*v[:2], {}] for k, v in local.items()}
  for b in blocks[2:]:
    second["['x']"][2][b] = first["['x']"][2].pop(b)
  recorded = integrity.merge_digests([first, second])
  assert recorded == integrity.array_digests(tree)
  # Restored replicated on one device (sample/evaluate), or with two shards: verifies.
  for layout in (jax.devices()[0], NamedSharding(_mesh(2), P("fsdp"))):
    restored = {"x": jax.device_put(x, layout), "s": jnp.int32(7)}
    assert integrity.array_problems(restored, recorded) == []
  bad = x.copy()
  bad[5, 2] = np.nextafter(bad[5, 2], np.inf)  # one bit
  assert integrity.array_problems({"x": jnp.asarray(bad), "s": jnp.int32(7)}, recorded) == ["['x']"]
  cast = {"x": jnp.asarray(x, jnp.bfloat16), "s": jnp.int32(7)}
  assert integrity.array_problems(cast, recorded) == ["['x']"]


@pytest.mark.slow
def test_fsdp_checkpoint_restores_replicated(tmp_path):
  """FSDP over 4 devices: the per-shard digests of the marker verify a replicated restore."""
  config = _toy_config("--config.model.width=64", "--config.mesh.fsdp=4")
  _write_run(tmp_path / "run", config, [10], jax.devices()[:4])
  record, _ = integrity.read_commit(tmp_path / "run" / "checkpoints" / "10")
  assert any(";" in v for v in record["arrays"].values())  # some arrays stored in blocks
  _, _, _, step = run_lib.restore_for_inference(tmp_path / "run")
  assert step == 10


# -- 19.2: a reader during a run (slow) ----------------------------------------------------------


@pytest.mark.slow
def test_readers_during_training_leave_the_trainer_running(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  trainer = subprocess.Popen(
    [sys.executable, "-m", "diffjax.cli", "train", "--config", TOY]
    + ["--config.train.steps=6000", "--config.train.checkpoint_every=100"]
    + ["--config.train.progress_bar=false", "--workdir", str(workdir)],
    env=env,
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  readers = []
  try:
    deadline = time.monotonic() + 300
    while not list((workdir / "checkpoints").glob(f"*/{integrity.COMMIT_FILE}")):
      assert trainer.poll() is None and time.monotonic() < deadline
      time.sleep(0.5)
    for command in (["evaluate", "--num", "100"], ["sample", "--num", "64"]) * 2:
      if trainer.poll() is not None:
        break
      extra = ["--out", str(tmp_path / f"s{len(readers)}.npz")] if command[0] == "sample" else []
      readers.append(
        subprocess.run(
          [sys.executable, "-m", "diffjax.cli", *command, "--workdir", str(workdir), *extra],
          env=env,
          cwd=ROOT,
          capture_output=True,
          text=True,
          timeout=300,
          check=False,
        )
      )
    out, _ = trainer.communicate(timeout=600)
  finally:
    if trainer.poll() is None:
      trainer.kill()
  assert trainer.returncode == 0, out[-3000:]
  failed = [r for r in readers if r.returncode != 0]
  assert len(readers) >= 2 and not failed, "\n\n".join(
    f"{' '.join(r.args[3:])} exited {r.returncode}:\n{r.stderr[-4000:]}" for r in failed
  )
  assert not (workdir / ckpt.QUARANTINE).exists()
