"""Reference outputs of diffusers' UniPC and k-diffusion's DPM-Solver++(2M) SDE, for parity tests.

Runs the two reference implementations in float64 on an exact denoiser, the posterior mean of
Gaussian data ``x0 ~ N(MEAN, COV)`` under ``x = alpha x0 + sigma eps``:

    E[x0 | x] = MEAN + alpha COV C^{-1} (x - alpha MEAN),   E[eps | x] = sigma C^{-1} (x - alpha
    MEAN),   C = alpha^2 COV + sigma^2 I,

written here in torch (independently of diffjax), and stores the inputs, the outputs and the
package versions in ``tests/data/parity_unipc.npz`` and ``tests/data/parity_dpmpp_2m_sde.npz``;
``tests/test_fast_solvers.py`` runs diffjax on the same inputs and compares.

* UniPC: ``diffusers.UniPCMultistepScheduler`` (Zhao et al. 2023,
  https://arxiv.org/abs/2302.04867) with an epsilon-predicting model, for orders 1-3, variants
  bh1/bh2, with and without ``lower_order_final``, on its default DDPM schedule (linear betas,
  1000 steps, linspace spacing, final sigma 0, or the last sigma > 0 without
  ``lower_order_final``); and on flow sigmas (``use_flow_sigmas``,
  ``flow_shift=3``, a velocity model ``eps - x0`` of the linear path ``x = (1 - s) x0 + s eps``).
  Cases where diffusers itself returns NaN are dropped (listed in the file's ``dropped``).
  The scheduler's sigmas are cast to float64 after ``set_timesteps``, so every coefficient is
  computed in float64; the model maps each timestep to the scheduler's own sigma.
* DPM-Solver++(2M) SDE: ``k_diffusion.sampling.sample_dpmpp_2m_sde`` (Lu et al. 2022,
  https://arxiv.org/abs/2211.01095) on Karras sigmas with a final 0, a denoiser ``D(x; sigma)``
  in variance-exploding coordinates, ``eta`` in {0.5, 1}, both solver types. The Brownian noise
  is given: ``noise_sampler`` returns stored standard normal draws, one per step, in order.

This needs torch, diffusers and k-diffusion, which the project does not depend on: run it in a
separate environment, e.g.

    python -m venv /tmp/parity_venv
    /tmp/parity_venv/bin/pip install torch diffusers k-diffusion
    /tmp/parity_venv/bin/python scripts/make_parity_data.py
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import pathlib
import sys
import types

import numpy as np
import torch

MEAN = np.array([1.0, -0.5])
COV = np.array([[1.0, 0.6], [0.6, 0.5]])
BATCH = 6
SEED = 0
UNIPC_STEPS = 10
DPMPP_STEPS = 12


def _posterior(x, alpha, sigma):
  """``(E[x0 | x], E[eps | x])`` for ``x`` ``[batch, 2]`` and scalar ``alpha``, ``sigma``."""
  mean = torch.as_tensor(MEAN, dtype=torch.float64)
  cov = torch.as_tensor(COV, dtype=torch.float64)
  alpha = torch.as_tensor(alpha, dtype=torch.float64)
  sigma = torch.as_tensor(sigma, dtype=torch.float64)
  c = alpha**2 * cov + sigma**2 * torch.eye(2, dtype=torch.float64)
  z = torch.linalg.solve(c, (x - alpha * mean).T).T
  return mean + alpha * z @ cov, sigma * z


def _versions() -> str:
  names = ("torch", "diffusers", "k-diffusion", "numpy")
  return json.dumps({name: importlib.metadata.version(name) for name in names})


def _unipc_case(*, order, variant, lower_order_final, flow, x_init):
  from diffusers import UniPCMultistepScheduler  # pylint: disable=import-outside-toplevel

  # Without lower_order_final the last step keeps its order, which a step to sigma = 0 (h =
  # inf) cannot (diffusers' solve is singular there): those cases end at the last sigma > 0.
  options = dict(
    solver_order=order,
    solver_type=variant,
    lower_order_final=lower_order_final,
    final_sigmas_type="zero" if lower_order_final else "sigma_min",
    predict_x0=True,
  )
  if flow:
    options.update(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
  else:
    options.update(prediction_type="epsilon")
  scheduler = UniPCMultistepScheduler(**options)
  scheduler.set_timesteps(UNIPC_STEPS)
  scheduler.sigmas = scheduler.sigmas.to(torch.float64)
  sigmas = scheduler.sigmas.numpy().copy()
  sigma_of = {float(t): scheduler.sigmas[i] for i, t in enumerate(scheduler.timesteps)}

  def model(x, timestep):
    sigma = sigma_of[float(timestep)]
    alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(sigma)  # pylint: disable=protected-access
    x0, eps = _posterior(x, alpha_t, sigma_t)
    return eps - x0 if flow else eps

  x = torch.as_tensor(x_init, dtype=torch.float64)
  for timestep in scheduler.timesteps:
    x = scheduler.step(model(x, timestep), timestep, x).prev_sample
  return sigmas, x.numpy()


def unipc_data(rng) -> dict:
  """Every UniPC case on one start ``x_init`` (standard normal: ``sigma_VP(T) ~ 1`` and the
  flow's ``sigma = 1 - 1/T`` start at the same scale)."""
  x_init = rng.standard_normal((BATCH, 2))
  cases = [
    (order, variant, lower, flow)
    for flow in (False, True)
    for order in (1, 2, 3)
    for variant in ("bh1", "bh2")
    for lower in (True, False)
  ]
  kept, sigmas, outputs, dropped = [], [], [], []
  for order, variant, lower, flow in cases:
    grid, out = _unipc_case(
      order=order, variant=variant, lower_order_final=lower, flow=flow, x_init=x_init
    )
    if not np.all(np.isfinite(out)):
      # diffusers itself returns NaN here (e.g. bh1's B(h) = -inf times 0 on a step to sigma =
      # 0, or a zero-length final flow step): nothing to compare with.
      dropped.append(dict(order=order, variant=variant, lower_order_final=lower, flow=flow))
      continue
    kept.append((order, variant, lower, flow))
    sigmas.append(grid)
    outputs.append(out)
  cases = kept
  return dict(
    mean=MEAN,
    cov=COV,
    x_init=x_init,
    sigmas=np.stack(sigmas),
    order=np.array([c[0] for c in cases]),
    variant=np.array([c[1] for c in cases]),
    lower_order_final=np.array([c[2] for c in cases]),
    flow=np.array([c[3] for c in cases]),
    samples=np.stack(outputs),
    dropped=np.array(json.dumps(dropped)),
    versions=np.array(_versions()),
  )


def _k_diffusion_sampling() -> types.ModuleType:
  """``k_diffusion.sampling``. The package's ``__init__`` and ``utils`` import torchvision for
  image helpers the samplers never call; where torchvision cannot load (a CPU-only torch beside
  PyPI's CUDA torchvision), the module is loaded alone, with an empty torchvision in its place."""
  try:
    from k_diffusion import sampling  # pylint: disable=import-outside-toplevel

    return sampling
  except (ImportError, RuntimeError):
    for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "k_diffusion")]:
      del sys.modules[name]
  for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
    sys.modules[name] = types.ModuleType(name)
  sys.modules["torchvision.transforms"].functional = sys.modules[
    "torchvision.transforms.functional"
  ]
  package = types.ModuleType("k_diffusion")
  package.__path__ = list(importlib.util.find_spec("k_diffusion").submodule_search_locations)
  sys.modules["k_diffusion"] = package
  return importlib.import_module("k_diffusion.sampling")


def dpmpp_2m_sde_data(rng) -> dict:
  """k-diffusion's sampler on stored noise: ``noises[i]`` is the draw of step ``i``."""
  sampling = _k_diffusion_sampling()

  sigmas = sampling.get_sigmas_karras(DPMPP_STEPS, 0.002, 80.0, rho=7.0).to(torch.float64)
  x_init = rng.standard_normal((BATCH, 2)) * float(sigmas[0])
  noises = rng.standard_normal((DPMPP_STEPS, BATCH, 2))
  cases = [(eta, solver_type) for eta in (1.0, 0.5) for solver_type in ("midpoint", "heun")]

  def model(x, sigma):
    return _posterior(x, 1.0, sigma[0])[0]

  outputs = []
  for eta, solver_type in cases:
    draws = iter(torch.as_tensor(noises, dtype=torch.float64))
    out = sampling.sample_dpmpp_2m_sde(
      model,
      torch.as_tensor(x_init, dtype=torch.float64),
      sigmas,
      eta=eta,
      solver_type=solver_type,
      noise_sampler=lambda sigma, sigma_next, draws=draws: next(draws),
      disable=True,
    )
    outputs.append(out.numpy())
  return dict(
    mean=MEAN,
    cov=COV,
    x_init=x_init,
    sigmas=sigmas.numpy(),
    noises=noises,
    eta=np.array([c[0] for c in cases]),
    solver_type=np.array([c[1] for c in cases]),
    samples=np.stack(outputs),
    versions=np.array(_versions()),
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data"
  parser.add_argument("--out", type=pathlib.Path, default=default)
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(SEED)
  np.savez(args.out / "parity_unipc.npz", **unipc_data(rng))
  np.savez(args.out / "parity_dpmpp_2m_sde.npz", **dpmpp_2m_sde_data(rng))
  print(f"wrote {args.out}/parity_unipc.npz and parity_dpmpp_2m_sde.npz with {_versions()}")


if __name__ == "__main__":
  main()
