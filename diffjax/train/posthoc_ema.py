"""Post-hoc EMA: power-function averages tracked in training, any width reconstructed after.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2,
https://arxiv.org/abs/2312.02696), Section 3 and Appendix C. An EMA whose averaging profile
over the training time ``tau`` in ``[0, t]`` is the power function

  p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)

keeps its shape as ``t`` grows: its width relative to ``t`` is ``sigma_rel``, a function of
``gamma`` alone (:func:`sigma_rel_from_gamma`). Training tracks a few such averages and saves
them now and then (the *snapshots*); after training, a least-squares combination of the
snapshots' profiles approximates the profile of any other ``sigma_rel``, and the same
combination of the snapshots' parameters is that EMA (:func:`reconstruction_weights`).

The math is pure: :func:`gamma_from_sigma_rel`, :func:`power_ema_beta`,
:func:`power_ema_update` (jit-safe, inside the train step) and the closed-form inner products
and solve (NumPy float64 on the host: the Gram matrix of many snapshots is ill-conditioned).

The snapshot store, WORKDIR/posthoc_ema/: one ``step_XXXXXXXXX.npz`` per snapshot (every
tracked profile's parameters at that step), written by the train loop alone, each through a
fresh temporary file renamed into place, and ``manifest.json`` listing the trusted snapshots
with the SHA-256 of each file, replaced atomically after the file it names is durable. A kill
between the two leaves a file the manifest does not name (ignored, overwritten when that step is
written again); a kill during either write leaves the previous manifest and every snapshot it
names. Readers check each file's digest. The store lives beside ``checkpoints/``, so
``train.keep_checkpoints`` never deletes a snapshot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.train import config as config_lib
from diffjax.train.atomic_write import atomic_open, write_atomic

__all__ = [
  "SIGMA_REL_MAX",
  "STORE_DIR",
  "MAX_RESIDUAL",
  "sigma_rel_from_gamma",
  "gamma_from_sigma_rel",
  "power_ema_beta",
  "power_ema_update",
  "power_profile_dot",
  "reconstruction_weights",
  "reconstruction_residual",
  "reconstructable_range",
  "PosthocEmaError",
  "Snapshot",
  "SnapshotStore",
  "write_snapshot",
  "prune_snapshots",
  "read_store",
  "Reconstruction",
  "plan_reconstruction",
  "reconstruct",
]

log = logging.getLogger("diffjax")

# sigma_rel at gamma = 0 (a uniform average over the whole run): the widest power profile;
# gamma in (-1, 0) would give the same widths again, so gamma > 0 is the branch used.
SIGMA_REL_MAX = math.sqrt(1.0 / 12.0)
STORE_DIR = "posthoc_ema"
MANIFEST = "manifest.json"
# A sigma_rel counts as reconstructable when the snapshots' best combination matches its
# profile to this relative L2 error (profiles, not parameters: independent of the run).
MAX_RESIDUAL = 0.05
# At least this many snapshot times: one time gives only the tracked widths' span at that time.
MIN_SNAPSHOTS = 2


def sigma_rel_from_gamma(gamma):
  """Relative standard deviation of the power-function profile of exponent ``gamma``.

  ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))`` (EDM2 eq. 3, Karras et al.
  2024, https://arxiv.org/abs/2312.02696): the profile's standard deviation over ``tau`` divided
  by its support ``t``.
  """
  gamma = np.asarray(gamma, np.float64)
  return np.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def gamma_from_sigma_rel(sigma_rel) -> np.ndarray:
  """The exponent ``gamma > 0`` whose power profile has relative width ``sigma_rel``.

  Squaring EDM2 eq. 3 with ``s = sigma_rel^-2`` gives the cubic
  ``gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0``; its largest real root is the answer
  (EDM2 Algorithm 2, Karras et al. 2024, https://arxiv.org/abs/2312.02696). Requires
  ``0 < sigma_rel < sqrt(1/12)`` (:data:`SIGMA_REL_MAX`, the width at ``gamma = 0``).
  """
  values = np.asarray(sigma_rel, np.float64)
  if not np.all((values > 0) & (values < SIGMA_REL_MAX)):
    raise ValueError(
      f"sigma_rel={sigma_rel!r}: must lie in (0, {SIGMA_REL_MAX:.4f}) (a power-function EMA "
      "with gamma > 0); choose values such as 0.05 or 0.1"
    )
  gammas = []
  for value in values.reshape(-1):
    s = value**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    gammas.append(roots[np.abs(roots.imag) < 1e-6 * np.abs(roots).max()].real.max())
  return np.asarray(gammas).reshape(values.shape)


def power_ema_beta(t: jax.Array, gamma: float) -> jax.Array:
  """The decay of step ``t`` (``t = 1, 2, ...``): ``beta_t = (1 - 1/t)^(gamma + 1)``.

  With ``ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t`` the average after ``t`` steps is
  ``sum_tau (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1) theta_tau``: the power profile
  ``p_{t,gamma}`` integrated over each step ``(tau - 1, tau]`` (EDM2 eq. 2 and Algorithm 1,
  Karras et al. 2024, https://arxiv.org/abs/2312.02696). ``beta_1 = 0``, so the start value is
  forgotten at once. Written as ``exp((gamma + 1) log1p(-1/t))`` because ``1 - 1/t`` rounds to
  1 in float32 for large ``t``.
  """
  t = jnp.asarray(t, jnp.float32)
  return jnp.exp((gamma + 1.0) * jnp.log1p(-1.0 / t))


def power_ema_update(average: Any, params: Any, *, t: jax.Array, gamma: float) -> Any:
  """``average <- beta_t average + (1 - beta_t) params`` leaf by leaf, ``beta_t`` of
  :func:`power_ema_beta` (EDM2 Algorithm 1, https://arxiv.org/abs/2312.02696)."""
  beta = power_ema_beta(t, gamma)
  return jax.tree.map(lambda a, p: (beta * a + (1.0 - beta) * p).astype(a.dtype), average, params)


def power_profile_dot(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
  """The L2 inner product of two power profiles, in closed form (broadcasting):

  ``<p_{t_a,g_a}, p_{t_b,g_b}> = int_0^min(t_a,t_b) p_{t_a,g_a} p_{t_b,g_b} dtau
  = (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) max(t_a, t_b)) (t_a/t_b)^e``, with ``e = g_b`` when
  ``t_a < t_b`` and ``e = -g_a`` otherwise (EDM2 Appendix C.2 and Algorithm 3, Karras et al.
  2024, https://arxiv.org/abs/2312.02696); the ratio form never raises ``t`` to a large power.
  """
  t_a, gamma_a, t_b, gamma_b = (np.asarray(x, np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
  exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
  numerator = (gamma_a + 1.0) * (gamma_b + 1.0) * (t_a / t_b) ** exponent
  return numerator / ((gamma_a + gamma_b + 1.0) * np.maximum(t_a, t_b))


def _gram(times, gammas, target_t, target_gammas):
  col = lambda x: np.asarray(x, np.float64).reshape(-1, 1)
  row = lambda x: np.asarray(x, np.float64).reshape(1, -1)
  a = power_profile_dot(col(times), col(gammas), row(times), row(gammas))
  b = power_profile_dot(col(times), col(gammas), target_t, row(target_gammas))
  return a, b


def reconstruction_weights(*, times, gammas, target_t: float, target_gammas) -> np.ndarray:
  """Weights ``x`` (``[snapshots, targets]``) with ``sum_i x_i p_{t_i,g_i} ~ p_{t_r,g_r}``.

  Least squares in L2 over ``tau``: ``A x = b``, ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_r>``
  (:func:`power_profile_dot`), solved by ``lstsq`` (EDM2 Appendix C.2, Algorithm 3, Karras et
  al. 2024, https://arxiv.org/abs/2312.02696). Because an EMA is linear in the parameters,
  ``sum_i x_i ema_i`` is the EMA of (approximately) profile ``p_{t_r,g_r}``.

  Args:
    times, gammas: ``[snapshots]``, each stored average's step ``t_i`` and exponent ``g_i``.
    target_t: the reconstruction's ``t_r`` (usually the last snapshot's step).
    target_gammas: ``[targets]`` exponents to reconstruct.
  """
  a, b = _gram(times, gammas, target_t, target_gammas)
  return np.linalg.lstsq(a, b, rcond=None)[0]


def reconstruction_residual(*, times, gammas, target_t: float, target_gammas) -> np.ndarray:
  """``||sum_i x_i p_i - p_r|| / ||p_r||`` for the weights of :func:`reconstruction_weights`,
  per target, in closed form: ``||r||^2 = <p_r,p_r> - 2 x.b + x.A x`` with
  ``<p_r,p_r> = (g_r + 1)^2 / ((2 g_r + 1) t_r)``."""
  a, b = _gram(times, gammas, target_t, target_gammas)
  x = np.linalg.lstsq(a, b, rcond=None)[0]
  g = np.asarray(target_gammas, np.float64).reshape(-1)
  norm2 = (g + 1.0) ** 2 / ((2.0 * g + 1.0) * target_t)
  squared = norm2 - 2.0 * np.sum(x * b, axis=0) + np.sum(x * (a @ x), axis=0)
  return np.sqrt(np.maximum(squared, 0.0) / norm2)


def reconstructable_range(
  *, times, gammas, target_t: float, max_residual: float = MAX_RESIDUAL
) -> tuple[float, float] | None:
  """The ``sigma_rel`` interval, around the tracked widths, that the snapshots reconstruct to
  within ``max_residual`` (:func:`reconstruction_residual`), on a grid of 400 log-spaced
  widths; ``None`` when even the tracked widths miss it."""
  grid = np.geomspace(1e-3, SIGMA_REL_MAX * 0.999, 400)
  good = (
    reconstruction_residual(
      times=times, gammas=gammas, target_t=target_t, target_gammas=gamma_from_sigma_rel(grid)
    )
    <= max_residual
  )
  tracked = sigma_rel_from_gamma(np.unique(gammas))
  inside = np.flatnonzero(good & (grid >= tracked.min()) & (grid <= tracked.max()))
  if inside.size == 0:
    return None
  lo = hi = int(inside[0])
  while lo > 0 and good[lo - 1]:
    lo -= 1
  while hi + 1 < grid.size and good[hi + 1]:
    hi += 1
  return float(grid[lo]), float(grid[hi])


# ---- the snapshot store (written by the train loop, read by evaluate) -------------------------


class PosthocEmaError(config_lib.ConfigError):
  """A post-hoc EMA request the workdir cannot serve, or a store diffjax refuses to use (one
  line naming the value and the fix)."""


def _folder(workdir) -> pathlib.Path:
  """WORKDIR/posthoc_ema; refused when it is a symbolic link or a file (never written
  through)."""
  folder = pathlib.Path(workdir) / STORE_DIR
  if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
    kind = "a symbolic link" if folder.is_symlink() else "not a folder"
    raise PosthocEmaError(
      f"{folder} is {kind}; diffjax keeps the post-hoc EMA snapshots in a plain folder there: "
      "remove it, or copy what it points to in its place"
    )
  return folder


@dataclasses.dataclass(frozen=True)
class Snapshot:
  step: int
  file: str
  sha256: str


@dataclasses.dataclass(frozen=True)
class SnapshotStore:
  """What WORKDIR/posthoc_ema/manifest.json says: the tracked widths, their exponents, the
  parameter leaves' paths and shapes, and the trusted snapshots in step order."""

  folder: pathlib.Path
  sigma_rels: tuple[float, ...]
  gammas: tuple[float, ...]
  leaves: tuple[str, ...]
  snapshots: tuple[Snapshot, ...]


def _host(tree: Any) -> Any:
  """The tree as NumPy arrays on every process (gathered where shards live on other hosts)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _read_manifest(folder: pathlib.Path) -> dict | None:
  path = folder / MANIFEST
  if not path.is_file():
    return None
  try:
    manifest = json.loads(path.read_bytes())
    manifest["snapshots"] = [dict(s) for s in manifest["snapshots"]]
    return manifest
  except (ValueError, KeyError, TypeError) as e:
    raise PosthocEmaError(
      f"{path} is unreadable ({type(e).__name__}); its snapshots cannot be trusted: move "
      f"{folder} aside (the post-hoc EMA then starts again from the next snapshot)"
    ) from None


def _write_manifest(folder: pathlib.Path, manifest: dict) -> None:
  write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def write_snapshot(
  workdir: pathlib.Path,
  *,
  step: int,
  profiles: Sequence[Any],
  sigma_rels: Sequence[float],
  gammas: Sequence[float],
  is_lead: bool,
) -> None:
  """Stores the tracked averages ``profiles`` (one parameter tree each) of step ``step``.

  Every process calls it (the gather of sharded leaves is collective); only the lead writes:
  the ``.npz`` through a temporary file renamed into place and synced, then the manifest
  naming it with its SHA-256, replaced atomically. A snapshot of the same step is replaced.
  """
  arrays = _host(tuple(profiles))
  if not is_lead:
    return
  folder = _folder(workdir)
  folder.mkdir(exist_ok=True)
  flat = [jax.tree_util.tree_flatten_with_path(p) for p in arrays]
  paths = [jax.tree_util.keystr(path) for path, _ in flat[0][0]]
  buffer = io.BytesIO()
  np.savez(
    buffer,
    **{f"p{i}_{j}": leaf for i, (items, _) in enumerate(flat) for j, (_, leaf) in enumerate(items)},
  )
  data = buffer.getvalue()
  name = f"step_{int(step):09d}.npz"
  with atomic_open(folder / name, "wb") as f:
    f.write(data)
  manifest = _read_manifest(folder) or {}
  kept = [s for s in manifest.get("snapshots", []) if s["step"] != int(step)]
  kept.append({"step": int(step), "file": name, "sha256": _sha256(data)})
  _write_manifest(
    folder,
    {
      "sigma_rels": [float(s) for s in sigma_rels],
      "gammas": [float(g) for g in gammas],
      "leaves": paths,
      "shapes": [list(leaf.shape) for _, leaf in flat[0][0]],
      "snapshots": sorted(kept, key=lambda s: s["step"]),
    },
  )


def prune_snapshots(workdir: pathlib.Path, *, after: int) -> list[int]:
  """Drops from the manifest every snapshot newer than step ``after`` (a resume from an older
  checkpoint retraces those steps and writes them again); returns the steps dropped."""
  folder = _folder(workdir)
  manifest = _read_manifest(folder)
  if manifest is None:
    return []
  dropped = [s["step"] for s in manifest["snapshots"] if s["step"] > after]
  if dropped:
    manifest["snapshots"] = [s for s in manifest["snapshots"] if s["step"] <= after]
    _write_manifest(folder, manifest)
  return dropped


def read_store(workdir: pathlib.Path) -> SnapshotStore:
  """The manifest of WORKDIR/posthoc_ema; :class:`PosthocEmaError` when there is none."""
  folder = _folder(workdir)
  manifest = _read_manifest(folder)
  if manifest is None:
    raise PosthocEmaError(
      f"--workdir {workdir} has no post-hoc EMA snapshots ({folder / MANIFEST} is missing): it "
      "was trained without train.posthoc_ema.sigma_rels; train with e.g. "
      "--config.train.posthoc_ema.sigma_rels='(0.05, 0.1)', or drop --sigma-rel"
    )
  return SnapshotStore(
    folder=folder,
    sigma_rels=tuple(manifest["sigma_rels"]),
    gammas=tuple(manifest["gammas"]),
    leaves=tuple(manifest["leaves"]),
    snapshots=tuple(Snapshot(s["step"], s["file"], s["sha256"]) for s in manifest["snapshots"]),
  )


def _verified_bytes(store: SnapshotStore, snapshot: Snapshot) -> bytes | None:
  """The file of ``snapshot``, or ``None`` (with a warning) when it is missing or its digest
  differs from the manifest's."""
  path = store.folder / snapshot.file
  if not re.fullmatch(r"step_\d{9}\.npz", snapshot.file) or not path.is_file():
    log.warning("post-hoc EMA snapshot %s is missing; left out", path)
    return None
  data = path.read_bytes()
  if _sha256(data) != snapshot.sha256:
    log.warning("post-hoc EMA snapshot %s does not match its digest (damaged); left out", path)
    return None
  return data


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """What :func:`plan_reconstruction` decided: the snapshots used, the step ``t_r`` of the
  result, the weights ``[snapshots x profiles, targets]`` and each target's profile residual."""

  store: SnapshotStore
  snapshots: tuple[Snapshot, ...]
  sigma_rels: tuple[float, ...]
  step: int
  weights: np.ndarray
  residuals: tuple[float, ...]
  range: tuple[float, float]

  def info(self) -> dict:
    return {
      "tracked_sigma_rels": list(self.store.sigma_rels),
      "snapshots": len(self.snapshots),
      "snapshot_steps": [self.snapshots[0].step, self.snapshots[-1].step],
      "range": list(self.range),
      "residuals": list(self.residuals),
    }


def plan_reconstruction(workdir: pathlib.Path, *, sigma_rels: Sequence[float]) -> Reconstruction:
  """Checks a request for the EMAs of ``sigma_rels`` at the last snapshot's step and solves
  for their weights (:func:`reconstruction_weights`); reads the manifest and checks each
  snapshot's digest, loads no parameters.

  Raises :class:`PosthocEmaError` (one line) for a workdir without snapshots, too few usable
  snapshots, or a ``sigma_rel`` outside what they reconstruct to within
  :data:`MAX_RESIDUAL` (:func:`reconstructable_range`; the range is named).
  """
  requested = tuple(float(s) for s in sigma_rels)
  bad = [s for s in requested if not (0.0 < s < SIGMA_REL_MAX)]
  if bad:
    raise PosthocEmaError(
      f"--sigma-rel {bad[0]:g}: a power-function EMA has 0 < sigma_rel < "
      f"{SIGMA_REL_MAX:.4f}; choose values such as 0.05,0.08,0.12"
    )
  store = read_store(workdir)
  snapshots = [s for s in store.snapshots if _verified_bytes(store, s) is not None]
  if len(snapshots) < MIN_SNAPSHOTS:
    raise PosthocEmaError(
      f"--workdir {workdir} holds {len(snapshots)} usable post-hoc EMA snapshot(s) in "
      f"{store.folder}; reconstructing needs at least {MIN_SNAPSHOTS}: train longer (one is "
      "written at every checkpoint, or every train.posthoc_ema.snapshot_every steps)"
    )
  count = len(store.gammas)
  times = np.repeat([float(s.step) for s in snapshots], count)
  gammas = np.tile(np.asarray(store.gammas, np.float64), len(snapshots))
  target_t = float(snapshots[-1].step)
  span = reconstructable_range(times=times, gammas=gammas, target_t=target_t)
  tracked = ", ".join(f"{s:g}" for s in store.sigma_rels)
  where = f"{len(snapshots)} snapshots, steps {snapshots[0].step} to {snapshots[-1].step}"
  if span is None:
    raise PosthocEmaError(
      f"--workdir {workdir}: its {where} of sigma_rel {tracked} reconstruct no sigma_rel to "
      f"within {MAX_RESIDUAL:.0%}; train longer for more snapshots"
    )
  outside = [s for s in requested if not span[0] <= s <= span[1]]
  if outside:
    raise PosthocEmaError(
      f"--sigma-rel {outside[0]:g}: the stored profiles (sigma_rel {tracked}; {where}) "
      f"reconstruct sigma_rel in [{span[0]:.3g}, {span[1]:.3g}] to within {MAX_RESIDUAL:.0%}; "
      "choose values in that range"
    )
  target_gammas = gamma_from_sigma_rel(np.asarray(requested))
  kwargs = dict(times=times, gammas=gammas, target_t=target_t, target_gammas=target_gammas)
  return Reconstruction(
    store=store,
    snapshots=tuple(snapshots),
    sigma_rels=requested,
    step=int(target_t),
    weights=reconstruction_weights(**kwargs),
    residuals=tuple(float(r) for r in reconstruction_residual(**kwargs)),
    range=span,
  )


def reconstruct(plan: Reconstruction, *, template: Any) -> list[Any]:
  """The parameters of each planned ``sigma_rel``: ``sum_i x_i ema_i`` over the snapshots'
  stored averages (float64 sums, one snapshot in memory at a time), in the structure and
  dtypes of ``template`` (a parameter tree of the trained model, e.g. the checkpoint's EMA)."""
  leaves, treedef = jax.tree.flatten(template)
  store = plan.store
  if len(leaves) != len(store.leaves):
    raise PosthocEmaError(
      f"{store.folder}: its snapshots hold {len(store.leaves)} arrays per model, the workdir's "
      f"model {len(leaves)}; the snapshots belong to another run: move {store.folder} aside"
    )
  count = len(store.gammas)
  sums = [[np.zeros(np.shape(leaf), np.float64) for leaf in leaves] for _ in plan.sigma_rels]
  for n, snapshot in enumerate(plan.snapshots):
    data = _verified_bytes(store, snapshot)
    if data is None:
      raise PosthocEmaError(
        f"post-hoc EMA snapshot {store.folder / snapshot.file} changed while it was read; run "
        "the same command again"
      )
    with np.load(io.BytesIO(data)) as npz:
      for i in range(count):
        for j in range(len(leaves)):
          value = npz[f"p{i}_{j}"].astype(np.float64)
          for k, total in enumerate(sums):
            total[j] += plan.weights[n * count + i, k] * value
  return [
    jax.tree.unflatten(
      treedef, [s.astype(leaf.dtype) for s, leaf in zip(total, leaves, strict=True)]
    )
    for total in sums
  ]
