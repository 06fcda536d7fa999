# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 - Your first flow: own data, own model, a diffjax loss and sampler
#
# A first training loop written by hand, for readers who know TorchCFM or Meta's
# `flow_matching`: your own 2D data set, your own Flax NNX network, and from diffjax only the
# pieces that carry the mathematics (a probability path, the conditional flow-matching loss, an
# ODE sampler, the 2-Wasserstein distance). It runs in well under a minute on a CPU.
#
# What replaces what:
#
# * TorchCFM's `ConditionalFlowMatcher(sigma).sample_location_and_conditional_flow(x0, x1)`:
#   `losses.flow_matching_example(key, x0=x0, x1=x1, path=paths.get_path("icfm", sigma=sigma))`;
# * an `nn.Module` with `forward(x, t)`: an `nnx.Module` with `__call__(x, t, cond, *, rngs)`,
#   made a pair of pure functions by `models.functionalize`;
# * `optimizer.step()` in a Python loop: `optax` inside a jitted step, the steps fused with
#   `jax.lax.scan`;
# * `torchdyn.NeuralODE(...).trajectory(x0, t_span=torch.linspace(0, 1, n))`:
#   `samplers.get_sampler("euler", target="velocity", times=samplers.uniform_grid(num_steps=n))`;
# * the 2-Wasserstein distance of `torchcfm.utils` (POT): `evaluate.wasserstein2` (POT, exact).
#
# Time runs as in TorchCFM: $t = 0$ is the source (noise) $x_0 \sim \mathcal N(0, I)$, $t = 1$
# the data $x_1$ (Lipman et al. 2023, https://arxiv.org/abs/2210.02747; Tong et al. 2024,
# https://arxiv.org/abs/2302.00482). Randomness is an explicit JAX key everywhere: nothing here
# depends on a global seed.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import diffjax

print("diffjax", diffjax.__version__, "| JAX", jax.__version__, "on", jax.devices()[0].platform)

# %% [markdown]
# ## 1. Your data
#
# Any array of points will do; here two interleaved half rings made with NumPy. A quarter is
# held out: the samples are compared with points the model never saw.

# %%
rng = np.random.default_rng(0)
num_points = 4000
angle = np.pi * rng.uniform(size=num_points)
upper = rng.uniform(size=num_points) < 0.5
rings = np.where(
  upper[:, None],
  np.stack([np.cos(angle), np.sin(angle)], 1),
  np.stack([1.0 - np.cos(angle), 0.5 - np.sin(angle)], 1),
)
points = (3.0 * (rings - [0.5, 0.25]) + 0.2 * rng.normal(size=rings.shape)).astype(np.float32)
train_points, held_out = jnp.asarray(points[:3000]), points[3000:]
print("train", train_points.shape, "held out", held_out.shape)

# %% [markdown]
# ## 2. Your model
#
# A plain Flax NNX MLP on $[x, t]$. diffjax calls every network the same way,
# `module(x, t, cond, *, rngs)`: `cond` carries class labels (`None` here: unconditional) and
# `rngs` a dropout key (`None`: no dropout), so a model written for diffjax also works with its
# trainer and CLI. `models.functionalize` turns the module into two pure functions,
# `init(key) -> params` and `apply(params, x_t, t) -> velocity`, which is what `jax.jit`,
# `jax.grad` and `optax` want. A module with another signature (say TorchCFM's `forward(x, t)`)
# is refused right there, with the signature it needs.


# %%
class VelocityNet(nnx.Module):
  def __init__(self, *, width: int = 64, rngs: nnx.Rngs):
    self.first = nnx.Linear(3, width, rngs=rngs)
    self.second = nnx.Linear(width, width, rngs=rngs)
    self.out = nnx.Linear(width, 2, rngs=rngs)

  def __call__(self, x, t, cond=None, *, rngs=None):
    h = jnp.concatenate([x, t[:, None]], axis=-1)
    h = nnx.selu(self.second(nnx.selu(self.first(h))))
    return self.out(h)


model = diffjax.models.functionalize(VelocityNet, data_shape=(2,))
params = model.init(jax.random.key(0))
print("parameters:", diffjax.models.num_params(params))

# %% [markdown]
# ## 3. The path and the loss
#
# I-CFM's path $x_t = t\,x_1 + (1 - t)\,x_0 + \sigma z$ with the conditional target
# $u_t = x_1 - x_0$ (Tong et al. 2024). `losses.flow_matching_example` draws $t$ and $z$ and
# returns the regression pairs; `losses.regression_loss` is the mean squared error. Regressing
# on this *conditional* target has the gradient of the *marginal* flow-matching objective
# (notebook 02 checks it numerically).

# %%
path = diffjax.paths.get_path("icfm", sigma=0.1)


def loss_fn(params, key, x1):
  key_source, key_example = jax.random.split(key)
  x0 = jax.random.normal(key_source, x1.shape)  # the source: N(0, I)
  example = diffjax.losses.flow_matching_example(key_example, x0=x0, x1=x1, path=path)
  velocity = model.apply(params, example.model_input, example.model_time)
  return diffjax.losses.regression_loss(velocity, example)


# %% [markdown]
# ## 4. The optax loop
#
# One step draws a batch of data, computes the gradient and applies Adam. The steps of a chunk
# are fused into one compiled program with `jax.lax.scan` (a Python loop of jitted steps works
# too; the scan saves the per-step dispatch). Each step's key is `fold_in(key, step)`, so the
# run is reproducible from one seed.

# %%
optimizer = optax.adam(1e-3)
batch_size, steps_per_chunk, num_chunks = 256, 500, 6


@jax.jit
def train_chunk(params, opt_state, key, first_step):
  def step(carry, index):
    params, opt_state = carry
    key_batch, key_loss = jax.random.split(jax.random.fold_in(key, first_step + index))
    x1 = train_points[jax.random.randint(key_batch, (batch_size,), 0, train_points.shape[0])]
    loss, grads = jax.value_and_grad(loss_fn)(params, key_loss, x1)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jnp.arange(steps_per_chunk))
  return params, opt_state, losses.mean()


opt_state = optimizer.init(params)
key = jax.random.key(1)
start = time.perf_counter()
for chunk in range(num_chunks):
  params, opt_state, loss = train_chunk(params, opt_state, key, chunk * steps_per_chunk)
  print(f"step {(chunk + 1) * steps_per_chunk:5d}  loss {float(loss):.3f}")
print(f"{num_chunks * steps_per_chunk} steps in {time.perf_counter() - start:.1f} s")

# %% [markdown]
# ## 5. Sampling with a diffjax sampler
#
# `samplers.get_sampler` binds a solver and a time grid; every sampler then has one signature,
# `sample(key, predict, noise, *, return_trajectory=False)`. `target="velocity"` says that the
# network predicts $dx/dt$ (the flow velocity; not the "v" of v-prediction, Salimans & Ho 2022,
# which is a fixed mix of noise and data). `uniform_grid` takes its direction from what it
# samples: a velocity model without a diffusion process runs from the source at $t = 0$ to the
# data at $t = 1$, and a grid running the other way is refused instead of silently producing
# a wrong distribution.

# %%
euler = diffjax.samplers.get_sampler(
  "euler", target="velocity", times=diffjax.samplers.uniform_grid(num_steps=100)
)


def predict(x, t):
  return model.apply(params, x, t)


noise = jax.random.normal(jax.random.key(2), (1000, 2))
out = euler(jax.random.key(3), predict, noise, return_trajectory=True)
samples, trajectory = np.asarray(out.samples), np.asarray(out.trajectory)
print("samples", samples.shape, "trajectory", trajectory.shape, "network evaluations", int(out.nfe))

try:  # integrating the flow backwards (t from 1 to 0) is a mistake diffjax refuses
  diffjax.samplers.get_sampler(
    "euler",
    target="velocity",
    times=diffjax.samplers.uniform_grid(num_steps=100, t_start=1.0, t_end=0.0),
  )
  raise AssertionError("a backwards grid was accepted")
except ValueError as error:
  print("refused:", str(error)[:110], "...")

# %% [markdown]
# ## 6. How close is it? The 2-Wasserstein distance
#
# `evaluate.wasserstein2` is the exact distance between two point clouds (POT's network
# simplex). Two finite samples of the *same* distribution are not at distance 0, so the number
# that means something is the distance relative to that noise floor: here 1000 training points
# against the 1000 held-out ones. The untrained source is shown for scale.

# %%
w2 = diffjax.evaluate.wasserstein2(samples, held_out)
floor = diffjax.evaluate.wasserstein2(np.asarray(train_points[:1000]), held_out)
source = diffjax.evaluate.wasserstein2(np.asarray(noise), held_out)
print(f"W2(samples, held out) = {w2:.3f}   noise floor {floor:.3f}   source {source:.3f}")
assert w2 < 2.0 * floor < source, (w2, floor, source)

# %% [markdown]
# ## 7. The trajectories
#
# Each line is one particle carried by the learned velocity from the source (black) to a sample
# (blue), over the held-out data (grey).

# %%
fig, ax = plt.subplots(figsize=(6, 6))
ax.scatter(held_out[:, 0], held_out[:, 1], s=3, c="0.7", label="held-out data")
for particle in np.moveaxis(trajectory[:, :40], 1, 0):
  ax.plot(particle[:, 0], particle[:, 1], c="olive", lw=0.7, alpha=0.8)
ax.scatter(trajectory[0, :40, 0], trajectory[0, :40, 1], s=8, c="black", label="source")
ax.scatter(samples[:, 0], samples[:, 1], s=3, c="tab:blue", alpha=0.6, label="samples")
ax.set_aspect("equal")
ax.legend(loc="upper right", markerscale=3)
ax.set_title(f"I-CFM, {num_chunks * steps_per_chunk} steps: W2 {w2:.3f} (floor {floor:.3f})")
plt.show()

# %% [markdown]
# ## Next
#
# The same experiment without writing the loop: save the points with
# `np.savez("points.npz", x=points)` and train from a config (README, "Train on your own data"):
# `diffjax train --config configs/toy2d_icfm.py --workdir runs/mine --config.data.kind=npz
# --config.data.path=points.npz`, then `diffjax sample` and `diffjax evaluate`. The trainer adds
# checkpoints, resuming, several devices, EMA parameters, and every objective of the table
# (OT-CFM, diffusion, EDM, ...) behind `--config.objective.name`.
