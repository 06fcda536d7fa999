"""Pictures of a trained model: 2D samples over the target with trajectories, image grids."""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np

__all__ = ["plot_2d", "plot_image_grid", "plot_experiment"]


def plot_2d(
  path: str | pathlib.Path,
  *,
  samples: np.ndarray,
  target: np.ndarray | None,
  trajectories: np.ndarray | None,
  title: str = "",
) -> None:
  """Generated points (blue) over target points (grey), with trajectories (olive) from the
  source (black dots) to the generated points, as in TorchCFM's figures."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(6, 6))
  if target is not None:
    ax.scatter(target[:, 0], target[:, 1], s=2, c="0.6", alpha=0.5, label="target")
  if trajectories is not None:
    for trajectory in np.moveaxis(trajectories, 1, 0):
      ax.plot(trajectory[:, 0], trajectory[:, 1], c="olive", lw=0.6, alpha=0.8)
    ax.scatter(trajectories[0, :, 0], trajectories[0, :, 1], s=6, c="black", label="source")
  ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:blue", alpha=0.6, label="generated")
  ax.legend(loc="upper right", markerscale=4)
  ax.set_title(title)
  ax.set_aspect("equal")
  _save(fig, path)


def plot_image_grid(path: str | pathlib.Path, *, images: np.ndarray, title: str = "") -> None:
  """A square grid of images in [-1, 1], NHWC."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  images = np.clip((np.asarray(images) + 1.0) / 2.0, 0.0, 1.0)
  side = int(np.floor(np.sqrt(images.shape[0])))
  images = images[: side * side]
  h, w, c = images.shape[1:]
  grid = images.reshape(side, side, h, w, c).transpose(0, 2, 1, 3, 4).reshape(side * h, side * w, c)
  fig, ax = plt.subplots(figsize=(6, 6))
  ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None)
  ax.set_axis_off()
  ax.set_title(title)
  _save(fig, path)


def _save(fig, path) -> None:
  """Writes the PNG atomically (a kill mid-write never leaves a broken samples.png)."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  tmp = path.with_name(path.stem + ".tmp.png")
  fig.savefig(tmp, dpi=110, bbox_inches="tight")
  plt.close(fig)
  os.replace(tmp, path)


def plot_experiment(
  state,
  workdir,
  *,
  generate,
  target_sampler,
  data_shape: tuple[int, ...],
  seed: int,
  num: int,
  steps: int,
  num_trajectories: int,
  title: str,
) -> None:
  """WORKDIR/samples.png from the EMA parameters of ``state``: a 2D scatter over the target with
  ``num_trajectories`` trajectories, or a grid of 64 images."""
  key = jax.random.PRNGKey(seed + 1)
  vectors = len(data_shape) == 1
  out = generate(
    state.ema_params, key, num if vectors else 64, steps=steps, return_trajectories=True
  )
  samples = np.asarray(out["samples"])
  title = f"{title}, step {int(state.step)}"
  if vectors:
    target = None
    if target_sampler is not None:
      target = np.asarray(target_sampler(jax.random.PRNGKey(seed + 2), num))
    trajectories = out.get("trajectories")
    if trajectories is not None:
      trajectories = np.asarray(trajectories)[:, :num_trajectories]
    plot_2d(
      pathlib.Path(workdir) / "samples.png",
      samples=samples,
      target=target,
      trajectories=trajectories,
      title=title,
    )
  else:
    plot_image_grid(pathlib.Path(workdir) / "samples.png", images=samples, title=title)
