"""Pictures of a trained model: 2D samples over the target with trajectories, image grids with
class labels, and a sample metric against the number of network evaluations.

Every picture has a fixed size in pixels (no tight cropping), so a script or a test knows the
size of what it reads back: a 2D scatter is ``SCATTER_PIXELS`` square; an image grid's size
follows :func:`image_grid_layout`. Each PNG is written atomically (:func:`_save`).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np

__all__ = [
  "DPI",
  "SCATTER_PIXELS",
  "MAX_POINTS",
  "MAX_TILES",
  "GridLayout",
  "image_grid_layout",
  "plot_2d",
  "plot_image_grid",
  "plot_metric_vs_nfe",
  "plot_experiment",
]

DPI = 110
_SCATTER_INCHES = 6.0
SCATTER_PIXELS = int(_SCATTER_INCHES * DPI)
"""Width and height of a 2D scatter (:func:`plot_2d`) in pixels."""
MAX_POINTS = 10_000
"""At most this many points of each set are drawn in a scatter (the first ones)."""
MAX_TILES = 64
"""At most this many images are drawn in a grid (the first ones)."""
_TILE_PIXELS = 64  # an image is scaled up by the largest integer that keeps it this small
_LABEL_PIXELS = 14  # the band above each tile that holds its class label
_TITLE_PIXELS = 24
_BACKGROUND = 1.0  # white gaps, so tiles of dark images stay apart


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  return plt


def plot_2d(
  path: str | pathlib.Path,
  *,
  samples: np.ndarray,
  target: np.ndarray | None,
  trajectories: np.ndarray | None,
  title: str = "",
  labels: np.ndarray | None = None,
) -> None:
  """Generated points (blue, or coloured by class ``labels``) over target points (grey), with
  trajectories ``[steps + 1, K, 2]`` (olive) from the source (black dots) to the generated
  points, as in TorchCFM's figures. ``SCATTER_PIXELS`` square; at most ``MAX_POINTS`` of each
  set are drawn."""
  plt = _pyplot()
  samples = np.asarray(samples)[:MAX_POINTS]
  fig, ax = plt.subplots(figsize=(_SCATTER_INCHES, _SCATTER_INCHES), dpi=DPI)
  if target is not None:
    target = np.asarray(target)[:MAX_POINTS]
    ax.scatter(target[:, 0], target[:, 1], s=2, c="0.6", alpha=0.5, label="target")
  if trajectories is not None:
    for trajectory in np.moveaxis(np.asarray(trajectories), 1, 0):
      ax.plot(trajectory[:, 0], trajectory[:, 1], c="olive", lw=0.6, alpha=0.8)
    ax.scatter(trajectories[0, :, 0], trajectories[0, :, 1], s=6, c="black", label="source")
  if labels is None:
    ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:blue", alpha=0.6, label="generated")
  else:
    ax.scatter(
      samples[:, 0],
      samples[:, 1],
      s=2,
      c=np.asarray(labels)[: len(samples)],
      cmap="tab10",
      alpha=0.6,
      label="generated (colour: label)",
    )
  ax.legend(loc="upper right", markerscale=4)
  ax.set_title(title, fontsize=9)
  ax.set_aspect("equal")
  fig.tight_layout()
  _save(fig, path)


class GridLayout(NamedTuple):
  """Where :func:`plot_image_grid` puts things, in pixels from the top left.

  Attributes:
    cols, rows: tiles per row and per column.
    scale: each image pixel becomes ``scale x scale`` pixels.
    tile_height, tile_width: one tile (``scale`` times the image's height and width).
    gap: white space between tiles and around the grid.
    label_height: the band above each tile for its label (0 without labels).
    title_height: the band at the top for the title (0 without a title).
    height, width: the whole picture.
  """

  cols: int
  rows: int
  scale: int
  tile_height: int
  tile_width: int
  gap: int
  label_height: int
  title_height: int
  height: int
  width: int

  def tile(self, index: int) -> tuple[int, int]:
    """``(top, left)`` of tile ``index`` (row-major)."""
    row, col = divmod(index, self.cols)
    top = self.title_height + self.gap + row * (self.label_height + self.tile_height + self.gap)
    return top + self.label_height, self.gap + col * (self.tile_width + self.gap)


def image_grid_layout(
  *, num: int, image_shape: tuple[int, int], labelled: bool, titled: bool
) -> GridLayout:
  """The layout of a grid of ``min(num, MAX_TILES)`` images of ``image_shape = (H, W)``:
  ``ceil(sqrt(n))`` columns, images scaled up by ``max(1, 64 // max(H, W))``, gaps of an eighth
  of a tile (at least 2 pixels)."""
  n = min(int(num), MAX_TILES)
  if n < 1:
    raise ValueError(f"num={num}: a grid needs at least one image")
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  h, w = image_shape
  scale = max(1, _TILE_PIXELS // max(h, w))
  tile_h, tile_w = h * scale, w * scale
  gap = max(2, max(tile_h, tile_w) // 8)
  label = _LABEL_PIXELS if labelled else 0
  title = _TITLE_PIXELS if titled else 0
  return GridLayout(
    cols=cols,
    rows=rows,
    scale=scale,
    tile_height=tile_h,
    tile_width=tile_w,
    gap=gap,
    label_height=label,
    title_height=title,
    height=title + rows * (label + tile_h) + (rows + 1) * gap,
    width=cols * tile_w + (cols + 1) * gap,
  )


def plot_image_grid(
  path: str | pathlib.Path,
  *,
  images: np.ndarray,
  title: str = "",
  labels: np.ndarray | None = None,
) -> None:
  """A grid of the first ``MAX_TILES`` images (NHWC in ``[-1, 1]``, 1 or 3 channels), white
  gaps between tiles and, given ``labels``, each tile's class label above it. Drawn pixel for
  pixel (each image pixel a ``scale x scale`` block, no resampling); the size is
  :func:`image_grid_layout`'s."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
      f"images of shape {images.shape}: expected [N, H, W, C] with C = 1 or 3 channels"
    )
  layout = image_grid_layout(
    num=images.shape[0],
    image_shape=images.shape[1:3],
    labelled=labels is not None,
    titled=bool(title),
  )
  count = min(images.shape[0], MAX_TILES)
  pixels = np.clip((images[:count] + 1.0) / 2.0, 0.0, 1.0)
  pixels = np.repeat(np.repeat(pixels, layout.scale, axis=1), layout.scale, axis=2)
  if pixels.shape[-1] == 1:
    pixels = np.repeat(pixels, 3, axis=-1)
  canvas = np.full((layout.height, layout.width, 3), _BACKGROUND, np.float32)
  for index in range(count):
    top, left = layout.tile(index)
    canvas[top : top + layout.tile_height, left : left + layout.tile_width] = pixels[index]

  plt = _pyplot()
  fig = plt.figure(figsize=(layout.width / DPI, layout.height / DPI), dpi=DPI)
  fig.figimage(canvas, xo=0, yo=0, origin="upper", resize=False)

  def text(x: float, y: float, value: str, size: float) -> None:
    # Pixels from the top left to the figure's fractions (origin at the bottom left).
    fig.text(
      x / layout.width,
      1.0 - y / layout.height,
      value,
      ha="center",
      va="center",
      fontsize=size,
    )

  if title:
    text(layout.width / 2, layout.title_height / 2, title, 8)
  if labels is not None:
    labels = np.asarray(labels)
    for index in range(count):
      top, left = layout.tile(index)
      text(left + layout.tile_width / 2, top - layout.label_height / 2, str(labels[index]), 7)
  _save(fig, path)


def plot_metric_vs_nfe(
  path: str | pathlib.Path,
  *,
  rows: Sequence[Mapping],
  metrics: Mapping[str, str],
  floor: Mapping[str, float | None],
  title: str = "",
) -> None:
  """One panel per metric (``metrics`` maps a row key to its axis label): the metric against
  the number of network evaluations (log scale), one line per sampler (an adaptive solver is
  one point), and the two-sample noise floor ``floor[key]`` as a dashed line. ``rows`` are the
  dicts of ``diffjax evaluate``'s table (``sampler``, ``nfe`` and the metric keys); a row
  whose metric is ``None`` (non-finite samples) is left out."""
  plt = _pyplot()
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel

  names = list(metrics)
  fig, axes = plt.subplots(1, len(names), figsize=(5.0 * len(names), 4.0), dpi=DPI, squeeze=False)
  samplers = list(dict.fromkeys(row["sampler"] for row in rows))
  for ax, name in zip(axes[0], names, strict=True):
    for sampler in samplers:
      points = sorted(
        (row["nfe"], row[name])
        for row in rows
        if row["sampler"] == sampler and row.get(name) is not None
      )
      if points:
        nfe, value = zip(*points, strict=True)
        ax.plot(nfe, value, marker="o", label=sampler)
    if floor.get(name) is not None:
      ax.axhline(floor[name], color="0.4", ls="--", lw=1.0, label="two-sample floor")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 1, 10, 100: NFE counts
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(metrics[name])
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  _save(fig, path)


def _save(fig, path) -> None:
  """Writes the PNG atomically (:func:`~diffjax.train.atomic_write.atomic_open`: a planted
  symlink is never followed, a kill mid-write never leaves a broken picture)."""
  from diffjax.train.atomic_write import atomic_open  # pylint: disable=import-outside-toplevel

  plt = _pyplot()
  try:
    with atomic_open(path, "wb") as f:
      fig.savefig(f, format="png", dpi=DPI)
  finally:
    plt.close(fig)


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
