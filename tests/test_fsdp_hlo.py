"""The collectives of the compiled FSDP train step, read from its HLO on 8 simulated devices.

ZeRO-3 / FSDP (Rajbhandari et al. 2019, https://arxiv.org/abs/1910.02054): each device holds
1/N of the parameters and optimizer state; the step all-gathers parameters where they are used,
reduce-scatters the gradients so each device receives the sum for its own shard, and updates the
optimizer state shard by shard without ever gathering it. Plain data parallelism instead
all-reduces whole gradients (the control: that program has all-reduce and no reduce-scatter).

Which argument an all-gather reads is found by data flow, not by shape (a parameter shard and its
Adam moments have the same shape): JAX names each entry parameter of the compiled module after
the argument path (``metadata={op_name="state.opt_state[0][0].mu[...]"}``), and every
instruction's transitive inputs within the entry computation are followed back to those
parameters.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from tiny import tiny_config

from diffjax.train import config as config_lib
from diffjax.train import sharding as sharding_lib
from diffjax.train.trainer import make_trainer

_NAME = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*")
# The result type is one token or a tuple "(f32[2]{0}, /*index=5*/s32[])"; then the opcode.
_OPCODE = re.compile(r"^(?:\((?:[^()]|\([^()]*\))*\)|\S+)\s+([a-z][\w\-]*)\(")
_OPERAND = re.compile(r"%([\w.\-]+)")
_ARG_NAME = re.compile(r'parameter\(\d+\).*op_name="([^"]*)"')


def entry_graph(hlo: str) -> dict[str, dict]:
  """``{name: {"op": opcode, "inputs": [names], "arg": argument path or None}}`` for the
  instructions of the ENTRY computation of a compiled module's text."""
  lines = hlo.split("\nENTRY ", 1)[1].split("\n}\n", 1)[0].splitlines()[1:]
  graph = {}
  for line in lines:
    name = _NAME.match(line)
    if not name:
      continue
    rest = line[name.end() :]
    opcode = _OPCODE.match(rest)
    arg = _ARG_NAME.search(rest)
    graph[name.group(1)] = dict(
      op=opcode.group(1) if opcode else "",
      inputs=[m for m in _OPERAND.findall(rest)],
      arg=arg.group(1) if arg else None,
    )
  return graph


def argument_sources(graph: dict[str, dict], name: str, memo: dict) -> frozenset[str]:
  """The argument paths the instruction ``name`` (transitively) reads."""
  if name in memo:
    return memo[name]
  node = graph[name]
  found = {node["arg"]} if node["arg"] else set()
  stack, seen = [i for i in node["inputs"] if i in graph], set()
  while stack:  # iterative: the graph of a train step is thousands of instructions deep
    current = stack.pop()
    if current in seen:
      continue
    seen.add(current)
    if current in memo:
      found |= memo[current]
      continue
    if graph[current]["arg"]:
      found.add(graph[current]["arg"])
    stack.extend(i for i in graph[current]["inputs"] if i in graph)
  memo[name] = frozenset(found)
  return memo[name]


def collectives(hlo: str) -> dict[str, list[frozenset[str]]]:
  """For each collective opcode in the entry computation, the argument sources of each
  instance."""
  graph = entry_graph(hlo)
  memo: dict = {}
  out: dict[str, list] = {}
  for name, node in graph.items():
    if node["op"] in ("all-gather", "all-gather-start", "reduce-scatter", "all-reduce"):
      op = node["op"].replace("-start", "")
      out.setdefault(op, []).append(argument_sources(graph, name, memo))
  return out


def scattered_reductions(hlo: str) -> int:
  """How many gradient reductions leave each device only its own shard: ``reduce-scatter``
  instructions, plus ``all-reduce`` instructions whose every consumer slices the result by
  ``partition-id`` (XLA's CPU pipeline, unlike its GPU and TPU ones, does not fuse that
  all-reduce + dynamic-slice pair into a reduce-scatter: the same collective, as the partitioner
  wrote it). A reduction counts as a gradient's when it reads the batch and the parameters."""
  graph = entry_graph(hlo)
  memo: dict = {}
  users: dict[str, list[str]] = {}
  for name, node in graph.items():
    for i in node["inputs"]:
      users.setdefault(i, []).append(name)

  def is_gradient(name):
    sources = argument_sources(graph, name, memo)
    return any(_is_param(s) for s in sources) and any(s.startswith("batch") for s in sources)

  def slices_by_device(name):
    consumers = []
    for user in users.get(name, []):
      if graph[user]["op"] == "get-tuple-element":
        consumers += users.get(user, [])
      else:
        consumers.append(user)
    return bool(consumers) and all(
      any(graph[i]["op"] == "partition-id" for i in graph[c]["inputs"] if i in graph)
      for c in consumers
    )

  count = 0
  for name, node in graph.items():
    if node["op"] in ("reduce-scatter", "reduce-scatter-start") and is_gradient(name):
      count += 1
    elif node["op"] in ("all-reduce", "all-reduce-start") and is_gradient(name):
      count += slices_by_device(name)
  return count


def _is_opt(source: str) -> bool:
  return ".opt_state" in source


def _is_param(source: str) -> bool:
  return ".params[" in source


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
  path = tmp_path_factory.mktemp("hlo") / "points.npz"
  np.savez(path, x=np.random.default_rng(0).standard_normal((512, 2)).astype(np.float32))
  return str(path)


def compiled_step_text(npz: str, *, data: int, fsdp: int) -> str:
  """The compiled HLO of the trainer's one-update program (host batch, as the CLI runs image
  data): a 2-layer MLP of width 64 on a batch of 512, so a layer's activations outweigh its
  weight (as in any real model) and XLA's partitioner moves the weight, not the activations
  (with weights larger than activations it gathers the activations instead, which is cheaper
  and also correct, but not FSDP's pattern)."""
  config = tiny_config(
    "--config.data.kind=npz",
    f"--config.data.path={npz}",
    "--config.data.device_resident=off",
    "--config.model.width=64",
    "--config.model.depth=2",
    "--config.train.batch_size=512",
    f"--config.mesh.data={data}",
    f"--config.mesh.fsdp={fsdp}",
  )
  config_lib.validate(config, num_devices=8)
  mesh = sharding_lib.make_mesh(data=data, fsdp=fsdp, devices=jax.devices()[:8])
  trainer = make_trainer(config, mesh)
  state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    trainer.abstract_state,
    trainer.shardings,
  )
  batch = {
    "x": jax.ShapeDtypeStruct((512, 2), np.float32, sharding=sharding_lib.batch_sharding(mesh))
  }
  step = jax.jit(lambda state, batch: trainer.advance(state, 1, batch), donate_argnums=0)
  return step.lower(state, batch).compile().as_text()


def test_fsdp_step_gathers_params_scatters_grads_never_gathers_opt_state(npz):
  hlo = compiled_step_text(npz, data=1, fsdp=8)
  found = collectives(hlo)
  gathers = found.get("all-gather", [])
  # Every all-gather of the module sits in the entry computation (none hidden in a loop body,
  # where the data flow above would not reach).
  assert hlo.count(" all-gather(") + hlo.count(" all-gather-start(") == len(gathers)
  assert any(any(_is_param(s) for s in sources) for sources in gathers), "no parameter gathered"
  assert not any(any(_is_opt(s) for s in sources) for sources in gathers), (
    "an all-gather reads optimizer state"
  )
  # Gradients are reduce-scattered: each device keeps the summed gradient of its shard only.
  assert scattered_reductions(hlo) >= 1, "no gradient is reduce-scattered"


def test_data_parallel_step_all_reduces_and_never_reduce_scatters(npz):
  """The control: replicated parameters need whole gradients, so the same checks see an
  all-reduce of gradients and no reduce-scatter (the FSDP assertions would fail here)."""
  hlo = compiled_step_text(npz, data=8, fsdp=1)
  found = collectives(hlo)
  assert "reduce-scatter" not in found
  assert scattered_reductions(hlo) == 0
  assert any(any(_is_param(s) for s in sources) for sources in found.get("all-reduce", []))
  assert not any(any(_is_param(s) for s in sources) for sources in found.get("all-gather", []))


def test_data_flow_reader_finds_an_optimizer_state_gather():
  """The reader itself can fail: a program that gathers an argument named like optimizer state
  is caught."""
  mesh = sharding_lib.make_mesh(data=1, fsdp=8, devices=jax.devices()[:8])
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  replicated = sharding_lib.replicated(mesh)
  arg = {"opt_state": jax.ShapeDtypeStruct((64,), np.float32, sharding=sharded)}
  gather = jax.jit(lambda state: state["opt_state"] * 2.0, out_shardings=replicated)
  found = collectives(gather.lower(arg).compile().as_text())
  assert any(any("opt_state" in s for s in sources) for sources in found["all-gather"])
