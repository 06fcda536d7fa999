"""On-device 2D toy distributions, as sources or targets of flows and diffusions.

Every sampler is a pure function ``fn(key, num, **options) -> [num, 2] float32``; where the
distribution is a mixture with natural components, a labelled variant
``fn_labelled(key, num, **options) -> ([num, 2] float32, [num] int32)`` also returns the
component of each point (for class-conditional models). ``num`` fixes a shape, so it is static
under ``jax.jit``: ``jax.jit(fn, static_argnums=1)`` or ``jax.jit(functools.partial(fn,
num=n))``. Points are i.i.d. draws of the *distribution* that the reference generator samples:
where a reference spreads points deterministically (sklearn's ``linspace`` angles, FFJORD's
exactly ``num // 5`` points per pinwheel arm) we draw the angle, arm or component at random.

Sources of the conventions:

* FFJORD toy datasets (Grathwohl et al. 2019, https://arxiv.org/abs/1810.01367, their
  ``lib/toy_data.py``): checkerboard, pinwheel, 2spirals, swissroll, circles;
* TorchCFM (Tong et al. 2024, https://arxiv.org/abs/2302.00482, ``torchcfm/utils.py``):
  8gaussians (scale 5, covariance ``sqrt(0.1) I``), moons (``*3 - 1``), scurve (``[x, z]``);
* WGAN-GP (Gulrajani et al. 2017, https://arxiv.org/abs/1704.00028): 25gaussians;
* scikit-learn's ``make_moons``, ``make_s_curve``, ``make_swiss_roll``, ``make_circles``
  (Pedregosa et al. 2011) for the curves themselves.

Names resolve to samplers once, at the edge, through :func:`get_toy2d`.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array

from diffjax._lookup import lookup

__all__ = [
  "normal",
  "eight_gaussians",
  "eight_gaussians_labelled",
  "twenty_five_gaussians",
  "twenty_five_gaussians_labelled",
  "moons",
  "moons_labelled",
  "s_curve",
  "checkerboard",
  "checkerboard_labelled",
  "pinwheel",
  "pinwheel_labelled",
  "swiss_roll",
  "two_spirals",
  "two_spirals_labelled",
  "circles",
  "circles_labelled",
  "TOY2D",
  "TOY2D_LABELLED",
  "get_toy2d",
  "num_classes",
]

_F32 = jnp.float32


def _check_num(num) -> int:
  if isinstance(num, bool) or not isinstance(num, numbers.Integral) or num < 0:
    raise ValueError(
      f"num must be a non-negative Python int (a static shape); got {num!r}. "
      "Under jax.jit mark it static: jax.jit(fn, static_argnums=1)"
    )
  return int(num)


def _uniform(key: Array, num: int) -> Array:
  return jax.random.uniform(key, (num,), dtype=_F32)


def _stack(x: Array, y: Array) -> Array:
  return jnp.stack([x, y], axis=-1).astype(_F32)


def normal(key: Array, num: int, *, std: float = 1.0) -> Array:
  """Isotropic Gaussian ``x ~ N(0, std^2 I_2)``; the usual flow-matching source.

  Args:
    key: PRNG key.
    num: number of points (static).
    std: standard deviation per coordinate.

  Returns:
    ``[num, 2]`` float32.
  """
  return std * jax.random.normal(key, (_check_num(num), 2), dtype=_F32)


def eight_gaussians_labelled(
  key: Array, num: int, *, scale: float = 5.0, var: float = 0.1
) -> tuple[Array, Array]:
  """Equal mixture of 8 Gaussians on a circle, with the component of each point.

  ``k ~ U{0..7}``, ``x = scale (cos(k pi / 4), sin(k pi / 4)) + var^(1/4) eps``, ``eps ~ N(0, I)``:
  each component has covariance ``sqrt(var) I`` (std ``var^(1/4)``, 0.562 by default). This is the
  distribution TorchCFM's ``sample_8gaussians`` draws (``eight_normal_sample(n, 2, scale=5,
  var=0.1)`` builds ``MultivariateNormal(0, sqrt(var) * I)``, i.e. ``sqrt(var)`` is the
  covariance, not the std); Tong et al. 2024, https://arxiv.org/abs/2302.00482. Labels follow the
  angle ``k``, not TorchCFM's list order.

  Returns:
    ``([num, 2] float32, [num] int32)``.
  """
  num = _check_num(num)
  key_k, key_eps = jax.random.split(key)
  k = jax.random.randint(key_k, (num,), 0, 8, dtype=jnp.int32)
  angle = k.astype(_F32) * (math.pi / 4)
  std = var**0.25
  eps = jax.random.normal(key_eps, (num, 2), dtype=_F32)
  return scale * _stack(jnp.cos(angle), jnp.sin(angle)) + std * eps, k


def eight_gaussians(key: Array, num: int, **options) -> Array:
  """Points of :func:`eight_gaussians_labelled` (TorchCFM's 8 Gaussians)."""
  return eight_gaussians_labelled(key, num, **options)[0]


def twenty_five_gaussians_labelled(
  key: Array, num: int, *, spacing: float = 2.0 / 2.828, std: float = 0.05 / 2.828
) -> tuple[Array, Array]:
  """Equal mixture of 25 Gaussians on a 5 x 5 grid, with the component of each point.

  ``(i, j) ~ U{-2..2}^2``, ``x = spacing (i, j) + std eps``, label ``5 (i + 2) + (j + 2)``.
  Defaults reproduce WGAN-GP's toy set, ``(2 (i, j) + 0.05 eps) / 2.828`` (Gulrajani et al. 2017,
  https://arxiv.org/abs/1704.00028, their ``gan_toy.py``).

  Returns:
    ``([num, 2] float32, [num] int32)``.
  """
  num = _check_num(num)
  key_k, key_eps = jax.random.split(key)
  k = jax.random.randint(key_k, (num,), 0, 25, dtype=jnp.int32)
  i, j = k // 5 - 2, k % 5 - 2
  eps = jax.random.normal(key_eps, (num, 2), dtype=_F32)
  return spacing * _stack(i.astype(_F32), j.astype(_F32)) + std * eps, k


def twenty_five_gaussians(key: Array, num: int, **options) -> Array:
  """Points of :func:`twenty_five_gaussians_labelled` (WGAN-GP's 25 Gaussians)."""
  return twenty_five_gaussians_labelled(key, num, **options)[0]


def moons_labelled(
  key: Array, num: int, *, noise: float = 0.2, scale: float = 3.0, shift: float = -1.0
) -> tuple[Array, Array]:
  """Two interleaved half circles (sklearn's ``make_moons``), scaled, with the moon of each point.

  ``theta ~ U(0, pi)``, ``m ~ Bernoulli(1/2)``; the outer moon (``m = 0``) is
  ``(cos theta, sin theta)``, the inner (``m = 1``) ``(1 - cos theta, 1/2 - sin theta)``; then
  ``x = scale (moon + noise eps) + shift``. Defaults: ``make_moons(noise=0.2)`` then ``* 3 - 1``
  as in TorchCFM's ``sample_moons`` (Tong et al. 2024, https://arxiv.org/abs/2302.00482). Note:
  TorchCFM calls torchdyn's ``generate_moons``, which (in the version we read) adds one *uniform*
  ``U(0, noise)`` shift to both coordinates instead of sklearn's Gaussian noise; we follow
  sklearn's distribution, which is the one everyone else means by "moons".

  Returns:
    ``([num, 2] float32, [num] int32)``: label 0 outer moon, 1 inner (sklearn's ``y``).
  """
  num = _check_num(num)
  key_theta, key_m, key_eps = jax.random.split(key, 3)
  theta = math.pi * _uniform(key_theta, num)
  inner = jax.random.bernoulli(key_m, 0.5, (num,))
  x = jnp.where(inner, 1.0 - jnp.cos(theta), jnp.cos(theta))
  y = jnp.where(inner, 0.5 - jnp.sin(theta), jnp.sin(theta))
  eps = jax.random.normal(key_eps, (num, 2), dtype=_F32)
  return scale * (_stack(x, y) + noise * eps) + shift, inner.astype(jnp.int32)


def moons(key: Array, num: int, **options) -> Array:
  """Points of :func:`moons_labelled`."""
  return moons_labelled(key, num, **options)[0]


def s_curve(key: Array, num: int, *, noise: float = 0.1, scale: float = 1.0) -> Array:
  """sklearn's ``make_s_curve`` projected on its (x, z) coordinates, scaled.

  ``t = 3 pi (u - 1/2)``, ``u ~ U(0, 1)``; ``x = sin t + noise eps_1``,
  ``z = sign(t) (cos t - 1) + noise eps_2``; returns ``scale (x, z)`` (``X[:, [0, 2]]`` of
  ``make_s_curve(noise=noise)``; the dropped ``y ~ U(0, 2)`` is independent of the rest). The
  projection is TorchCFM's "scurve" (Tong et al. 2024, https://arxiv.org/abs/2302.00482; their
  runner uses ``noise=0.05, scale=1.5``). The default ``noise=0.1, scale=1`` keeps sklearn's units:
  ``x in [-1, 1]``, ``z in [-2, 2]``.

  Returns:
    ``[num, 2]`` float32.
  """
  num = _check_num(num)
  key_t, key_eps = jax.random.split(key)
  t = 3.0 * math.pi * (_uniform(key_t, num) - 0.5)
  eps = jax.random.normal(key_eps, (num, 2), dtype=_F32)
  return scale * (_stack(jnp.sin(t), jnp.sign(t) * (jnp.cos(t) - 1.0)) + noise * eps)


def checkerboard_labelled(key: Array, num: int, *, scale: float = 2.0) -> tuple[Array, Array]:
  """FFJORD's checkerboard: uniform on the 8 black cells of a 4 x 4 board, with the cell.

  ``a ~ U(-2, 2)``, ``b ~ Bernoulli(1/2)``, ``c = u - 2 b + (floor(a) mod 2)`` with
  ``u ~ U(0, 1)``; ``x = scale (a, c)`` (FFJORD ``scale = 2``: the board spans ``[-4, 4]^2``).
  Grathwohl et al. (2019), https://arxiv.org/abs/1810.01367, ``lib/toy_data.py``.

  Returns:
    ``([num, 2] float32, [num] int32)``: the cell ``2 column + row``, with ``column =
    floor(a) + 2 in {0..3}`` from the left and ``row = 1 - b`` (0 the lower, 1 the upper black
    cell of that column).
  """
  num = _check_num(num)
  key_a, key_b, key_u = jax.random.split(key, 3)
  a = 4.0 * _uniform(key_a, num) - 2.0
  lower = jax.random.bernoulli(key_b, 0.5, (num,))
  column = jnp.floor(a)
  c = _uniform(key_u, num) - 2.0 * lower + jnp.mod(column, 2.0)
  label = 2 * (column.astype(jnp.int32) + 2) + 1 - lower.astype(jnp.int32)
  return scale * _stack(a, c), label


def checkerboard(key: Array, num: int, **options) -> Array:
  """Points of :func:`checkerboard_labelled`."""
  return checkerboard_labelled(key, num, **options)[0]


def pinwheel_labelled(
  key: Array,
  num: int,
  *,
  arms: int = 5,
  radial_std: float = 0.3,
  tangential_std: float = 0.1,
  rate: float = 0.25,
) -> tuple[Array, Array]:
  """FFJORD's pinwheel: ``arms`` curved Gaussian arms, with the arm of each point.

  ``k ~ U{0..arms-1}``, ``f = (1 + radial_std e_1, tangential_std e_2)``, angle
  ``phi = 2 pi k / arms + rate exp(f_1)``, and ``x = 2 f R(phi)`` with the row-vector product
  ``f R``, ``R = [[cos phi, -sin phi], [sin phi, cos phi]]``, i.e.
  ``x = 2 (f_1 cos phi + f_2 sin phi, -f_1 sin phi + f_2 cos phi)``. Grathwohl et al. (2019),
  https://arxiv.org/abs/1810.01367, ``lib/toy_data.py`` (which puts exactly ``num // 5`` points on
  each arm; we draw the arm).

  Returns:
    ``([num, 2] float32, [num] int32)``.
  """
  num = _check_num(num)
  key_k, key_e = jax.random.split(key)
  k = jax.random.randint(key_k, (num,), 0, arms, dtype=jnp.int32)
  e = jax.random.normal(key_e, (num, 2), dtype=_F32)
  f1, f2 = 1.0 + radial_std * e[:, 0], tangential_std * e[:, 1]
  phi = 2.0 * math.pi / arms * k.astype(_F32) + rate * jnp.exp(f1)
  cos, sin = jnp.cos(phi), jnp.sin(phi)
  return 2.0 * _stack(f1 * cos + f2 * sin, -f1 * sin + f2 * cos), k


def pinwheel(key: Array, num: int, **options) -> Array:
  """Points of :func:`pinwheel_labelled`."""
  return pinwheel_labelled(key, num, **options)[0]


def swiss_roll(key: Array, num: int, *, noise: float = 1.0, scale: float = 0.2) -> Array:
  """FFJORD's swiss roll: sklearn's ``make_swiss_roll`` projected on (x, z), divided by 5.

  ``t = 3 pi / 2 (1 + 2 u)``, ``u ~ U(0, 1)``; ``x = t cos t + noise eps_1``,
  ``z = t sin t + noise eps_2``; returns ``scale (x, z)``. FFJORD uses
  ``make_swiss_roll(noise=1.0)[:, [0, 2]] / 5`` (``scale = 1/5``); Grathwohl et al. (2019),
  https://arxiv.org/abs/1810.01367, ``lib/toy_data.py``.

  Returns:
    ``[num, 2]`` float32.
  """
  num = _check_num(num)
  key_t, key_eps = jax.random.split(key)
  t = 1.5 * math.pi * (1.0 + 2.0 * _uniform(key_t, num))
  eps = jax.random.normal(key_eps, (num, 2), dtype=_F32)
  return scale * (_stack(t * jnp.cos(t), t * jnp.sin(t)) + noise * eps)


def two_spirals_labelled(key: Array, num: int, *, noise: float = 0.1) -> tuple[Array, Array]:
  """FFJORD's two spirals, with the spiral of each point.

  ``r = sqrt(u) 3 pi`` (540 degrees), ``d = (-r cos r + v_1 / 2, r sin r + v_2 / 2)`` with
  ``u, v_1, v_2 ~ U(0, 1)``; spiral ``s ~ Bernoulli(1/2)`` and ``x = (1 - 2 s) d / 3 + noise eps``.
  Grathwohl et al. (2019), https://arxiv.org/abs/1810.01367, ``lib/toy_data.py`` (which puts
  exactly half the points on each spiral; we draw the spiral).

  Returns:
    ``([num, 2] float32, [num] int32)``: label 0 for ``d``, 1 for ``-d``.
  """
  num = _check_num(num)
  key_u, key_v, key_s, key_eps = jax.random.split(key, 4)
  r = jnp.sqrt(_uniform(key_u, num)) * (3.0 * math.pi)
  v = jax.random.uniform(key_v, (num, 2), dtype=_F32)
  d = _stack(-jnp.cos(r) * r, jnp.sin(r) * r) + 0.5 * v
  second = jax.random.bernoulli(key_s, 0.5, (num,))
  sign = jnp.where(second, -1.0, 1.0).astype(_F32)[:, None]
  eps = jax.random.normal(key_eps, (num, 2), dtype=_F32)
  return sign * d / 3.0 + noise * eps, second.astype(jnp.int32)


def two_spirals(key: Array, num: int, **options) -> Array:
  """Points of :func:`two_spirals_labelled`."""
  return two_spirals_labelled(key, num, **options)[0]


def circles_labelled(
  key: Array, num: int, *, factor: float = 0.5, noise: float = 0.08, scale: float = 3.0
) -> tuple[Array, Array]:
  """Two concentric circles (sklearn's ``make_circles``), scaled, with the circle of each point.

  ``theta ~ U(0, 2 pi)``, ``m ~ Bernoulli(1/2)``, radius ``1`` (outer, ``m = 0``) or ``factor``
  (inner, ``m = 1``); ``x = scale (radius (cos theta, sin theta) + noise eps)``. Defaults are
  FFJORD's ``make_circles(factor=0.5, noise=0.08) * 3`` (Grathwohl et al. 2019,
  https://arxiv.org/abs/1810.01367, ``lib/toy_data.py``).

  Returns:
    ``([num, 2] float32, [num] int32)``: label 0 outer, 1 inner (sklearn's ``y``).
  """
  num = _check_num(num)
  key_theta, key_m, key_eps = jax.random.split(key, 3)
  theta = 2.0 * math.pi * _uniform(key_theta, num)
  inner = jax.random.bernoulli(key_m, 0.5, (num,))
  radius = jnp.where(inner, factor, 1.0).astype(_F32)
  eps = jax.random.normal(key_eps, (num, 2), dtype=_F32)
  points = radius[:, None] * _stack(jnp.cos(theta), jnp.sin(theta)) + noise * eps
  return scale * points, inner.astype(jnp.int32)


def circles(key: Array, num: int, **options) -> Array:
  """Points of :func:`circles_labelled`."""
  return circles_labelled(key, num, **options)[0]


TOY2D: dict[str, Callable[..., Array]] = {
  "normal": normal,
  "gaussian": normal,
  "8gaussians": eight_gaussians,
  "25gaussians": twenty_five_gaussians,
  "moons": moons,
  "scurve": s_curve,
  "checkerboard": checkerboard,
  "pinwheel": pinwheel,
  "swissroll": swiss_roll,
  "2spirals": two_spirals,
  "circles": circles,
}

TOY2D_LABELLED: dict[str, Callable[..., tuple[Array, Array]]] = {
  "8gaussians": eight_gaussians_labelled,
  "25gaussians": twenty_five_gaussians_labelled,
  "moons": moons_labelled,
  "checkerboard": checkerboard_labelled,
  "pinwheel": pinwheel_labelled,
  "2spirals": two_spirals_labelled,
  "circles": circles_labelled,
}

_NUM_CLASSES: dict[str, Callable[..., int]] = {
  "8gaussians": lambda **_: 8,
  "25gaussians": lambda **_: 25,
  "moons": lambda **_: 2,
  "checkerboard": lambda **_: 8,
  "pinwheel": lambda arms=5, **_: arms,
  "2spirals": lambda **_: 2,
  "circles": lambda **_: 2,
}


# Each unlabelled wrapper takes **options; its valid options are those of its labelled sampler.
_LABELLED_OF: dict[Callable, Callable] = {
  eight_gaussians: eight_gaussians_labelled,
  twenty_five_gaussians: twenty_five_gaussians_labelled,
  moons: moons_labelled,
  checkerboard: checkerboard_labelled,
  pinwheel: pinwheel_labelled,
  two_spirals: two_spirals_labelled,
  circles: circles_labelled,
}


def _options(fn: Callable) -> set[str]:
  return {
    p.name
    for p in inspect.signature(_LABELLED_OF.get(fn, fn)).parameters.values()
    if p.kind == inspect.Parameter.KEYWORD_ONLY
  }


def get_toy2d(name: str, *, labelled: bool = False, **options) -> Callable:
  """Resolves a toy distribution by name, once, at the edge, and binds its options.

  Names: "normal" (alias "gaussian"), "8gaussians", "25gaussians", "moons", "scurve",
  "checkerboard", "pinwheel", "swissroll", "2spirals", "circles"; with ``labelled=True`` one of
  ``TOY2D_LABELLED`` (the mixtures).

  Returns:
    ``fn(key, num) -> [num, 2] float32``, or ``-> ([num, 2] float32, [num] int32)`` if labelled.

  Raises:
    ValueError: unknown name, no labelled variant, or an unknown option.
  """
  table = TOY2D_LABELLED if labelled else TOY2D
  if labelled and name in TOY2D and name not in TOY2D_LABELLED:
    raise ValueError(
      f"toy distribution {name!r} has no labelled variant; labelled ones: {sorted(TOY2D_LABELLED)}"
    )
  fn = lookup(table, name, "toy distribution")
  valid = _options(fn)
  unknown = sorted(set(options) - valid)
  if unknown:
    raise ValueError(
      f"unknown option(s) {unknown} for toy distribution {name!r}; valid options: {sorted(valid)}"
    )
  return functools.partial(fn, **options)


def num_classes(name: str, **options) -> int:
  """Number of labels of the labelled toy distribution ``name`` with ``options``."""
  if name not in TOY2D_LABELLED:
    raise ValueError(
      f"toy distribution {name!r} has no labels; labelled ones: {sorted(TOY2D_LABELLED)}"
    )
  return _NUM_CLASSES[name](**options)
