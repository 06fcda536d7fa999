"""Fast multistep solvers for any affine Gaussian process: UniPC, DEIS and DPM-Solver++(2M) SDE.

Each runs on model times ``times`` (noise to data, either clock) of a process ``x_t = alpha x0 +
sigma eps`` given by ``coefficients_fn``, with the denoiser of
:func:`~diffjax.samplers.fields.denoiser`, so every prediction target works, a velocity model on
a Gaussian flow path included (its :meth:`~diffjax.paths.Path.gaussian_coefficients` make it a
diffusion with, on the linear path, ``alpha = t``, ``sigma = 1 - t``). They are exponential
integrators in the half log-SNR ``lambda = log(alpha / sigma)``: with ``h = lambda_t -
lambda_s`` the probability-flow ODE's exact solution is

    x_t = sigma_t / sigma_s x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0_hat dlambda
        = alpha_t / alpha_s x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps_hat dlambda,

and the solvers differ in how they approximate the integral from past evaluations (Lu et al.
2022, https://arxiv.org/abs/2206.00927). One network evaluation per step.

Ends with an infinite log-SNR are allowed: a start at ``alpha = 0`` (flow time 0) and an end at
``sigma = 0``. A step with infinite ``h`` is first order (DDIM: ``x_t = alpha_t x0_hat + sigma_t
eps_hat``) and an evaluation at ``lambda = -inf`` is not used as history (it is infinitely far).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from diffjax._lookup import lookup
from diffjax.samplers.fields import CoefficientsFn, Denoiser, SamplerOutput, prepend_initial
from diffjax.samplers.ode import check_times

__all__ = [
  "unipc_bh1",
  "unipc_bh2",
  "UNIPC_VARIANTS",
  "get_unipc_variant",
  "step_orders",
  "unipc_sample",
  "deis_coefficients",
  "deis_sample",
  "DPMPP_SDE_SOLVER_TYPES",
  "get_dpmpp_sde_solver_type",
  "dpmpp_2m_sde_sample",
]

# ---- shared pieces ---------------------------------------------------------------------------


def _full(value, x):
  return jnp.full(x.shape[:1], value, dtype=jnp.result_type(value))


def _half_log_snr(alpha: Array, sigma: Array) -> Array:
  """``lambda = log(alpha / sigma)``: ``-inf`` at ``alpha = 0``, ``+inf`` at ``sigma = 0``."""
  return jnp.log(alpha) - jnp.log(sigma)


def _check_order(order, allowed, name):
  if isinstance(order, bool) or order not in allowed:
    raise ValueError(f"order={order!r}: {name} supports orders {list(allowed)}")


def step_orders(lambdas: Array, *, order: int, lower_order_final: bool = False) -> Array:
  """The order of each step ``i`` of a multistep solver: ``min(order, 1 + usable history)``.

  The history of step ``i`` is the evaluations at ``lambda_0 .. lambda_{i-1}`` with finite
  ``lambda`` (a start at ``alpha = 0`` gives none); a step with infinite ``h`` is order 1;
  ``lower_order_final`` also caps step ``i`` at ``N - i`` (the last step first order, as
  diffusers' UniPC and DPM-Solver do for few steps). ``[N]`` int32 for ``[N + 1]`` ``lambdas``.
  """
  num_steps = lambdas.shape[0] - 1
  index = jnp.arange(num_steps)
  finite = jnp.isfinite(lambdas)
  # Evaluations before step i with a finite lambda (the grid is monotone: only lambda_0 can be
  # -inf among them).
  usable = index - jnp.where(finite[0], 0, 1)
  orders = jnp.clip(jnp.minimum(order, usable + 1), 1, order)
  if lower_order_final:
    orders = jnp.minimum(orders, num_steps - index)
  h_finite = finite[:-1] & finite[1:]
  return jnp.where(h_finite, orders, 1).astype(jnp.int32)


def _shift_in(buffer: Array, value: Array) -> Array:
  """``[value, *buffer[:-1]]``: the newest entry first."""
  return jnp.concatenate([value[None].astype(buffer.dtype), buffer[:-1]])


def _finite_stand_in(lambdas: Array) -> Array:
  """``lambda`` with ``-inf`` / ``+inf`` replaced by one below / above the finite range. Only
  branches that are never selected read those entries; finite values keep them free of
  ``inf - inf`` (and of NaN under ``jax_debug_nans``)."""
  finite = jnp.isfinite(lambdas)
  low = jnp.min(jnp.where(finite, lambdas, jnp.inf))
  high = jnp.max(jnp.where(finite, lambdas, -jnp.inf))
  return jnp.where(finite, lambdas, jnp.where(lambdas > 0, high + 1.0, low - 1.0))


def _ddim(x0: Array, eps: Array, alpha_t, sigma_t) -> Array:
  """The first-order step written through both estimates, finite from ``alpha_s = 0`` too."""
  return alpha_t * x0 + sigma_t * eps


# ---- UniPC -----------------------------------------------------------------------------------


def unipc_bh1(hh: Array) -> Array:
  """UniPC's ``B(h) = h`` (variant B1 of Zhao et al. 2023,
  https://arxiv.org/abs/2302.04867), written in ``hh = -h`` of the data prediction."""
  return hh


def unipc_bh2(hh: Array) -> Array:
  """UniPC's ``B(h) = e^h - 1`` (variant B2 of Zhao et al. 2023,
  https://arxiv.org/abs/2302.04867), written in ``hh = -h`` of the data prediction."""
  return jnp.expm1(hh)


UNIPC_VARIANTS: dict[str, Callable[[Array], Array]] = {"bh1": unipc_bh1, "bh2": unipc_bh2}


def get_unipc_variant(name: str) -> Callable[[Array], Array]:
  """Resolves UniPC's ``B(h)`` by name, "bh1" or "bh2", once, at the edge."""
  return lookup(UNIPC_VARIANTS, name, "UniPC variant")


def _unipc_system(rks: list, hh: Array, b_h: Array, order: int) -> tuple[Array, Array]:
  """``R`` (rows ``r^(p-1)``, ``p = 1..order``, over ``r_1 .. r_{order-1}, 1``) and ``b_p = p! hh
  phi_{p+1}(hh) / B(h)`` with ``phi_1(z) = (e^z - 1) / z``, ``phi_{k+1}(z) = (phi_k(z) - 1 / k!)
  / z`` (Zhao et al. 2023, https://arxiv.org/abs/2302.04867)."""
  rks = jnp.stack([*rks, jnp.ones_like(hh)])
  h_phi_k = jnp.expm1(hh) / hh - 1.0
  rows, b = [], []
  for p in range(1, order + 1):
    rows.append(rks ** (p - 1))
    b.append(h_phi_k * math.factorial(p) / b_h)
    h_phi_k = h_phi_k / hh - 1.0 / math.factorial(p + 1)
  return jnp.stack(rows), jnp.stack(b)


def _unipc_differences(m0, history, lambdas_history, lam_s, h, count):
  """``r_j = (lambda_{s-j} - lambda_s) / h`` and ``D_j = (m_{s-j} - m_s) / r_j``,
  ``j = 1..count``."""
  rks, d1s = [], []
  for j in range(count):
    rk = (lambdas_history[j] - lam_s) / h
    rks.append(rk)
    d1s.append((history[j] - m0) / rk)
  return rks, d1s


def _unipc_update(x, m0, d1s, rhos, *, sigma_ratio, alpha_t, hh, b_h):
  """``x_t = sigma_t / sigma_s x - alpha_t (e^hh - 1) m0 - alpha_t B(h) sum_j rho_j D_j``."""
  out = sigma_ratio * x - alpha_t * jnp.expm1(hh) * m0
  if d1s:
    out = out - alpha_t * b_h * sum(rho * d for rho, d in zip(rhos, d1s, strict=True))
  return out


def _unipc_predictor(order: int, b_fn):
  """UniP-``order`` (Zhao et al. 2023, with data prediction): ``rho`` solves the
  first ``order - 1`` rows of ``R rho = b`` (``rho = 1/2`` for order 2, as the authors' code)."""

  def predict(x, m0, history, lambdas_history, lam_s, lam_t, sigma_ratio, alpha_t):
    h = lam_t - lam_s
    hh = -h
    b_h = b_fn(hh)
    rks, d1s = _unipc_differences(m0, history, lambdas_history, lam_s, h, order - 1)
    if order == 1:
      rhos = []
    elif order == 2:
      rhos = [jnp.asarray(0.5, hh.dtype)]
    else:
      r_matrix, b = _unipc_system(rks, hh, b_h, order)
      rhos = list(jnp.linalg.solve(r_matrix[:-1, :-1], b[:-1]))
    return _unipc_update(x, m0, d1s, rhos, sigma_ratio=sigma_ratio, alpha_t=alpha_t, hh=hh, b_h=b_h)

  return predict


def _unipc_corrector(order: int, b_fn):
  """UniC-``order`` (Zhao et al. 2023, with data prediction): ``rho`` solves ``R
  rho = b`` (``rho = 1/2`` for order 1); the new evaluation ``m_t`` enters as ``D_t = m_t -
  m_s`` with the last ``rho``."""

  def correct(x, m0, m_t, history, lambdas_history, lam_s, lam_t, sigma_ratio, alpha_t):
    h = lam_t - lam_s
    hh = -h
    b_h = b_fn(hh)
    rks, d1s = _unipc_differences(m0, history, lambdas_history, lam_s, h, order - 1)
    if order == 1:
      rhos = [jnp.asarray(0.5, hh.dtype)]
    else:
      r_matrix, b = _unipc_system(rks, hh, b_h, order)
      rhos = list(jnp.linalg.solve(r_matrix, b))
    return _unipc_update(
      x, m0, [*d1s, m_t - m0], rhos, sigma_ratio=sigma_ratio, alpha_t=alpha_t, hh=hh, b_h=b_h
    )

  return correct


def unipc_sample(
  denoise: Denoiser,
  x_init: Array,
  *,
  times: Array,
  coefficients_fn: CoefficientsFn,
  order: int = 2,
  variant: Callable[[Array], Array] = unipc_bh2,
  corrector: bool = True,
  lower_order_final: bool = True,
  return_trajectory: bool = False,
) -> SamplerOutput:
  """UniPC: the unified predictor-corrector of Zhao et al. (2023), data prediction, multistep.

  With ``m_i = x0_hat(x_i, t_i)``, ``h = lambda_t - lambda_s``, ``hh = -h``, ``r_j =
  (lambda_{s-j} - lambda_s) / h`` and ``D_j = (m_{s-j} - m_s) / r_j``, the predictor UniP-p is

      x_t = sigma_t / sigma_s x_s - alpha_t (e^hh - 1) m_s - alpha_t B(h) sum_{j<p} rho_j D_j,

  and the corrector UniC-p, once ``m_t`` is known, recomputes ``x_t`` from ``x_s`` with ``p``
  coefficients, the last on ``D_t = m_t - m_s``. ``rho`` solves ``R rho = b`` with ``R_pj =
  r_j^(p-1)`` and ``b_p = p! phi_{p+1}(hh) / B(h)`` (UniP drops the last row and column);
  ``B(h) = hh`` ("bh1") or ``e^hh - 1`` ("bh2"). ``m_t`` is evaluated at the predicted ``x_t``
  and reused by the next predictor, so the corrector costs no network evaluation; it raises the
  order from ``p`` to ``p + 1``. Zhao et al. (2023),
  https://arxiv.org/abs/2302.04867 (as in diffusers' ``UniPCMultistepScheduler``: UniP-2 with
  ``rho = 1/2``, which with "bh2" is DPM-Solver++(2M); UniC-1 with ``rho = 1/2``; the first
  steps at the orders their history allows; the corrector skipped after the last step).

  Args:
    denoise: ``(x, t) -> (x0_hat, eps_hat)`` (:func:`~diffjax.samplers.fields.denoiser`).
    x_init: ``[batch, *event]`` state at ``times[0]``.
    times: ``[N + 1]`` model times from noise to data.
    coefficients_fn: the process's ``alpha``, ``sigma``.
    order: ``p`` of the predictor, 1, 2 or 3.
    variant: ``B(h)``: :func:`unipc_bh1` or :func:`unipc_bh2` (:func:`get_unipc_variant`).
    corrector: apply UniC (False: UniP alone).
    lower_order_final: cap the order of step ``i`` at ``N - i`` (diffusers' default).
    return_trajectory: also return the ``[N + 1, batch, ...]`` states (corrected).
  """
  check_times(times)
  _check_order(order, (1, 2, 3), "UniPC")
  times = jnp.asarray(times)
  coefficients = coefficients_fn(times)
  alphas, sigmas = coefficients.alpha, coefficients.sigma
  lambdas = _half_log_snr(alphas, sigmas)
  num_steps = times.shape[0] - 1
  orders = step_orders(lambdas, order=order, lower_order_final=lower_order_final)
  h_finite = jnp.isfinite(lambdas[1:] - lambdas[:-1])
  # The corrector of step i corrects x_i, the end of step i - 1, at that step's order: never at
  # i = 0, nor after a step of infinite h.
  corrector_orders = jnp.concatenate([jnp.ones((1,), jnp.int32), orders[:-1]])
  use_corrector = jnp.concatenate([jnp.zeros((1,), bool), h_finite[:-1]]) & bool(corrector)
  lam = _finite_stand_in(lambdas)
  predictors = [_unipc_predictor(p, variant) for p in range(1, order + 1)]
  correctors = [_unipc_corrector(p, variant) for p in range(1, order + 1)]

  def body(carry, inputs):
    x, x_last, history, lam_history = carry
    t, lam_last, lam_s, lam_t, sigma_last, alpha_s, sigma_s, alpha_t, sigma_t = inputs[:9]
    p_order, c_order, correct, finite = inputs[9:]
    m_s, eps_s = denoise(x, _full(t, x))

    def corrected(x):
      # UniC on the step last -> s, with m_s as the new evaluation.
      branches = [
        lambda _, c=c: c(
          x_last,
          history[0],
          m_s,
          history[1:],
          lam_history[1:],
          lam_last,
          lam_s,
          sigma_s / sigma_last,
          alpha_s,
        )
        for c in correctors
      ]
      return jax.lax.switch(c_order - 1, branches, x)

    def predicted(x):
      branches = [
        lambda x, p=p: p(x, m_s, history, lam_history, lam_s, lam_t, sigma_t / sigma_s, alpha_t)
        for p in predictors
      ]
      return jax.lax.switch(p_order - 1, branches, x)

    x = jax.lax.cond(correct, corrected, lambda x: x, x)
    x_next = jax.lax.cond(finite, predicted, lambda _: _ddim(m_s, eps_s, alpha_t, sigma_t), x)
    carry = (x_next, x, _shift_in(history, m_s), _shift_in(lam_history, lam_s))
    return carry, (x if return_trajectory else None)

  inputs = (
    times[:-1],
    jnp.concatenate([lam[:1], lam[:-2]]),
    lam[:-1],
    lam[1:],
    jnp.concatenate([sigmas[:1], sigmas[:-2]]),
    alphas[:-1],
    sigmas[:-1],
    alphas[1:],
    sigmas[1:],
    orders,
    corrector_orders,
    use_corrector,
    h_finite,
  )
  history = jnp.zeros((order, *x_init.shape), x_init.dtype)
  lam_history = jnp.zeros((order,), lam.dtype)
  carry = (x_init, x_init, history, lam_history)
  (samples, *_), path = jax.lax.scan(body, carry, inputs)
  if path is not None:
    # path[i] is x_i after its correction (path[0] = x_init); the last state is predicted only.
    path = jnp.concatenate([path[1:], samples[None]])
  return SamplerOutput(
    samples=samples, trajectory=prepend_initial(x_init, path), nfe=jnp.asarray(num_steps, jnp.int32)
  )


# ---- DEIS ------------------------------------------------------------------------------------

# Gauss-Legendre nodes and weights on [-1, 1]: exact for polynomials of degree 15, and the
# integrands below are a polynomial of degree <= 1 times the smooth rho(t).
_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(8)


def _lagrange(tau: Array, nodes: list[Array], j: int) -> Array:
  """``l_j(tau) = prod_{m != j} (tau - n_m) / (n_j - n_m)``."""
  out = jnp.ones_like(tau)
  for m, node in enumerate(nodes):
    if m != j:
      out = out * (tau - node) / (nodes[j] - node)
  return out


def deis_coefficients(times: Array, *, coefficients_fn: CoefficientsFn, order: int) -> Array:
  """tAB-DEIS's weights ``C_ij = int_{t_i}^{t_{i+1}} l_j(tau) rho'(tau) dtau``, ``rho = sigma /
  alpha``, for the Lagrange basis ``l_j`` in ``t`` through ``t_i, t_{i-1}, .., t_{i-order+1}``.

  By parts, ``C_ij = l_j(t_{i+1}) rho_{i+1} - int l_j' rho dtau`` for ``j >= 1`` (``l_j(t_i) =
  0``), the integral by 8-point Gauss-Legendre quadrature (Zhang & Chen 2022,
  https://arxiv.org/abs/2204.13902, who also integrate numerically). Where a step has fewer
  than ``order`` past times, or a node has ``rho = inf``, the weights are 0 (never used).

  Returns:
    ``[N, order - 1]`` weights of ``j = 1 .. order - 1`` for ``[N + 1]`` ``times``.
  """
  times = jnp.asarray(times)
  num_steps = times.shape[0] - 1
  t_s, t_t = times[:-1], times[1:]
  step = t_t - t_s
  # Past nodes t_{i-j}; before the grid's start a fictitious node j steps back keeps the basis
  # finite (those weights are zeroed below).
  nodes = [t_s]
  for j in range(1, order):
    past = jnp.concatenate([jnp.full((j,), jnp.nan, times.dtype), times[: num_steps - j]])
    nodes.append(jnp.where(jnp.isnan(past), t_s - j * step, past))
  rho_t = _rho(coefficients_fn, t_t)
  quad_t = t_s[:, None] + 0.5 * step[:, None] * (1.0 + jnp.asarray(_GAUSS_NODES, times.dtype))
  rho_q = _rho(coefficients_fn, quad_t)
  weights = 0.5 * step[:, None] * jnp.asarray(_GAUSS_WEIGHTS, times.dtype)
  columns = []
  for j in range(1, order):
    node_q = [n[:, None] for n in nodes]
    basis = lambda tau, j=j, node_q=node_q: _lagrange(tau, node_q, j)
    _, derivative = jax.jvp(basis, (quad_t,), (jnp.ones_like(quad_t),))
    end = _lagrange(t_t, nodes, j) * rho_t
    column = end - jnp.sum(weights * derivative * rho_q, axis=-1)
    has_past = jnp.arange(num_steps) >= order - 1
    columns.append(jnp.where(has_past & jnp.isfinite(column), column, 0.0))
  if not columns:
    return jnp.zeros((num_steps, 0), times.dtype)
  return jnp.stack(columns, axis=-1)


def _rho(coefficients_fn: CoefficientsFn, t: Array) -> Array:
  c = coefficients_fn(t)
  return c.sigma / c.alpha


def deis_sample(
  denoise: Denoiser,
  x_init: Array,
  *,
  times: Array,
  coefficients_fn: CoefficientsFn,
  order: int = 2,
  return_trajectory: bool = False,
) -> SamplerOutput:
  """tAB-DEIS: the exponential integrator with ``eps_hat`` extrapolated by a polynomial in ``t``.

  In ``x_hat = x / alpha`` and ``rho = sigma / alpha`` the probability-flow ODE is ``d x_hat /
  d rho = eps_hat`` (Song, Meng & Ermon 2021, eq. 14, https://arxiv.org/abs/2010.02502; Zhang &
  Chen 2022). With ``eps_hat``
  on ``[t_i, t_{i+1}]`` the Lagrange polynomial through ``(t_{i-j}, eps_{i-j})``, ``j < k``:

      x_{i+1} = alpha_{i+1} x0_i + sigma_{i+1} eps_i + alpha_{i+1} sum_{j=1}^{k-1} C_ij
                (eps_{i-j} - eps_i),

  ``C_ij`` from :func:`deis_coefficients`; ``k = 1`` is DDIM. Zhang & Chen (2022), "Fast
  Sampling of Diffusion Models with Exponential Integrator" (tAB-DEIS),
  https://arxiv.org/abs/2204.13902. The first steps use the orders their history allows.

  Args:
    denoise: ``(x, t) -> (x0_hat, eps_hat)`` (:func:`~diffjax.samplers.fields.denoiser`).
    x_init: ``[batch, *event]`` state at ``times[0]``.
    times: ``[N + 1]`` model times from noise to data.
    coefficients_fn: the process's ``alpha``, ``sigma``.
    order: ``k``, 1, 2 or 3.
    return_trajectory: also return the ``[N + 1, batch, ...]`` states.
  """
  check_times(times)
  _check_order(order, (1, 2, 3), "DEIS")
  times = jnp.asarray(times)
  coefficients = coefficients_fn(times)
  alphas, sigmas = coefficients.alpha, coefficients.sigma
  num_steps = times.shape[0] - 1
  orders = step_orders(_half_log_snr(alphas, sigmas), order=order)
  weights = [
    deis_coefficients(times, coefficients_fn=coefficients_fn, order=k) for k in range(2, order + 1)
  ]

  def body(carry, inputs):
    x, history = carry
    t, alpha_t, sigma_t, step_order, *step_weights = inputs
    x0, eps = denoise(x, _full(t, x))
    base = _ddim(x0, eps, alpha_t, sigma_t)

    def at_order(k):
      def update(_):
        if k == 1:
          return base
        terms = [w * (history[j - 1] - eps) for j, w in enumerate(step_weights[k - 2], start=1)]
        return base + alpha_t * sum(terms)

      return update

    x_next = jax.lax.switch(step_order - 1, [at_order(k) for k in range(1, order + 1)], x)
    return (x_next, _shift_in(history, eps)), (x_next if return_trajectory else None)

  history = jnp.zeros((max(order - 1, 1), *x_init.shape), x_init.dtype)
  inputs = (times[:-1], alphas[1:], sigmas[1:], orders, *weights)
  (samples, _), path = jax.lax.scan(body, (x_init, history), inputs)
  return SamplerOutput(
    samples=samples, trajectory=prepend_initial(x_init, path), nfe=jnp.asarray(num_steps, jnp.int32)
  )


# ---- DPM-Solver++(2M) SDE --------------------------------------------------------------------


def _midpoint_weight(c: Array) -> Array:
  """``(1 - e^-c) / 2``, the second-order weight of the "midpoint" form."""
  return -0.5 * jnp.expm1(-c)


def _heun_weight(c: Array) -> Array:
  """``1 - (1 - e^-c) / c``, the second-order weight of the "heun" form."""
  return 1.0 + jnp.expm1(-c) / c


DPMPP_SDE_SOLVER_TYPES: dict[str, Callable[[Array], Array]] = {
  "midpoint": _midpoint_weight,
  "heun": _heun_weight,
}


def get_dpmpp_sde_solver_type(name: str) -> Callable[[Array], Array]:
  """Resolves the second-order form of DPM-Solver++(2M) SDE, "midpoint" or "heun", once."""
  return lookup(DPMPP_SDE_SOLVER_TYPES, name, "DPM-Solver++ SDE solver type")


def dpmpp_2m_sde_sample(
  key: Array,
  denoise: Denoiser,
  x_init: Array,
  *,
  times: Array,
  coefficients_fn: CoefficientsFn,
  eta: float = 1.0,
  s_noise: float = 1.0,
  solver_type: Callable[[Array], Array] = _midpoint_weight,
  noises: Array | None = None,
  return_trajectory: bool = False,
) -> SamplerOutput:
  """DPM-Solver++(2M) SDE: the data-prediction multistep solver of the reverse SDE family.

  With ``h = lambda_t - lambda_s``, ``c = (1 + eta) h``, ``D = x0_hat(x_s)``, ``D'`` the previous
  evaluation and ``r = h_prev / h``:

      x_t = sigma_t / sigma_s e^{-eta h} x_s + alpha_t (1 - e^{-c}) D
            + alpha_t w(c) (D - D') / r + sigma_t sqrt(1 - e^{-2 eta h}) s_noise z,

  ``w(c) = (1 - e^{-c}) / 2`` ("midpoint") or ``1 - (1 - e^{-c}) / c`` ("heun"); no history on the
  first step; a step to ``sigma = 0`` returns ``alpha_t D``. ``eta = 0`` with "midpoint" is
  DPM-Solver++(2M) (:func:`~diffjax.samplers.diffusion.dpm_solver_pp_sample`), ``eta = 1`` the
  SDE-DPM-Solver++(2M) of Lu et al. (2022b), https://arxiv.org/abs/2211.01095, written as
  Crowson's k-diffusion ``sample_dpmpp_2m_sde`` (in ``x_ve = x / alpha``, ``sigma_ve = e^-lambda``
  there) for any ``alpha``, ``sigma``. A start at ``alpha = 0`` has ``h = inf``: with ``eta > 0``
  the state is fully renoised, ``x_t = alpha_t D + sigma_t z``.

  Args:
    key: PRNG key for the noise (unused with ``noises`` or ``eta = 0``).
    denoise: ``(x, t) -> (x0_hat, eps_hat)``.
    x_init: ``[batch, *event]`` state at ``times[0]``.
    times: ``[N + 1]`` model times from noise to data.
    coefficients_fn: the process's ``alpha``, ``sigma``.
    eta: the noise level of the SDE family (0: the probability-flow ODE).
    s_noise: scale of the added noise.
    solver_type: ``w(c)``, from :data:`DPMPP_SDE_SOLVER_TYPES`.
    noises: ``[N, batch, *event]`` the standard normal ``z`` of each step, or None (from ``key``).
    return_trajectory: also return the ``[N + 1, batch, ...]`` states.
  """
  check_times(times)
  if isinstance(eta, (int, float)) and not eta >= 0:
    raise ValueError(f"eta={eta!r}: must be >= 0 (0: probability-flow ODE, 1: reverse SDE)")
  if isinstance(s_noise, (int, float)) and not s_noise >= 0:
    raise ValueError(f"s_noise={s_noise!r}: must be >= 0")
  times = jnp.asarray(times)
  coefficients = coefficients_fn(times)
  alphas, sigmas = coefficients.alpha, coefficients.sigma
  lambdas = _half_log_snr(alphas, sigmas)
  num_steps = times.shape[0] - 1
  given = noises is not None
  if given and noises.shape != (num_steps, *x_init.shape):
    raise ValueError(
      f"noises of shape {noises.shape}: expected [num_steps, *x.shape] = "
      f"{(num_steps, *x_init.shape)}, one standard normal draw per step"
    )
  draws = noises if given else jax.random.split(key, num_steps)
  # A finite stand-in for an infinite past step: it weighs that history by ~0, as h = inf would.
  far = jnp.asarray(1e30, lambdas.dtype)

  def body(carry, inputs):
    x, d_prev, h_prev = carry
    i, t, lam_s, lam_t, sigma_s, sigma_t, alpha_t, draw = inputs
    d, _ = denoise(x, _full(t, x))
    h = lam_t - lam_s
    finite = jnp.isfinite(h)
    hs = jnp.where(finite, h, 1.0)
    eta_h = jnp.where(eta == 0, 0.0, eta * h)  # 0 * inf would be NaN
    c = h + eta_h
    x_next = (sigma_t / sigma_s) * jnp.exp(-eta_h) * x - alpha_t * jnp.expm1(-c) * d
    cs = jnp.where(finite, c, 1.0)
    second = alpha_t * solver_type(cs) * (hs / h_prev) * (d - d_prev)
    x_next = x_next + jnp.where(finite & (i > 0), 1.0, 0.0) * second
    z = draw.astype(x.dtype) if given else jax.random.normal(draw, x.shape, x.dtype)
    noise_std = sigma_t * jnp.sqrt(-jnp.expm1(-2.0 * eta_h)) * s_noise
    x_next = x_next + jnp.where(sigma_t > 0, noise_std, 0.0) * z
    x_next = jnp.where(sigma_t > 0, x_next, alpha_t * d)
    h_keep = jnp.where(finite, h, far)
    return (x_next, d, h_keep), (x_next if return_trajectory else None)

  inputs = (
    jnp.arange(num_steps),
    times[:-1],
    lambdas[:-1],
    lambdas[1:],
    sigmas[:-1],
    sigmas[1:],
    alphas[1:],
    draws,
  )
  carry = (x_init, jnp.zeros_like(x_init), jnp.ones((), lambdas.dtype))
  (samples, *_), path = jax.lax.scan(body, carry, inputs)
  return SamplerOutput(
    samples=samples, trajectory=prepend_initial(x_init, path), nfe=jnp.asarray(num_steps, jnp.int32)
  )
