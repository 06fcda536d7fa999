"""docs/benchmarks.md from the benchmark scripts' JSON in docs/: every measured figure in one page.

It also renders the exact-OT table into docs/scaling.md, between the markers of its "Exact OT on
the device" section (the memory and image sections there are rendered by their own scripts).

Each benchmark writes its JSON with the command and date that produced it
(``python scripts/bench_forward.py > docs/forward_bench.json``, ...); this script renders the page
from those files only, so a figure in docs/benchmarks.md is always one a script printed.
tests/test_docs.py checks the page is current.

Usage::

  python scripts/render_benchmarks.py            # rewrites docs/benchmarks.md (and scaling's OT)
  python scripts/render_benchmarks.py --check    # exit 1 if either is stale
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

__all__ = ["render", "main"]

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGE = DOCS / "benchmarks.md"
SCALING = DOCS / "scaling.md"
OT_BEGIN = "<!-- exact OT: generated from docs/ot_bench.json by scripts/render_benchmarks.py -->"
OT_END = "<!-- /exact OT -->"


def _load(name: str) -> dict | None:
  path = DOCS / name
  return json.loads(path.read_text()) if path.exists() else None


def _provenance(data: dict, default_command: str) -> str:
  command = data.get("command", default_command)
  return f"`{command}`, {data.get('date', 'date not recorded')}"


def _forward(data: dict) -> list[str]:
  lines = [
    "## Forward process (`scripts/bench_forward.py`, `docs/forward_bench.json`)",
    "",
    f"{_provenance(data, 'python scripts/bench_forward.py')}; batch "
    f"{'x'.join(map(str, data['shape']))} {data['dtype']}, jax {data['jax_version']} "
    f"({data['backend']}), median of {data['reps']} runs after compilation.",
    "",
    "| T | closed form ms | `lax.scan` chain ms | Python loop ms | chain / closed "
    "| loop / closed |",
    "|---:|---:|---:|---:|---:|---:|",
  ]
  for p in data["processes"]:
    lines.append(
      f"| {p['T']} | {p['closed_ms']:.3g} | {p['sequential_ms']:.4g} | {p['loop_ms']:.4g} "
      f"| {p['sequential_over_closed']:g} | {p['loop_over_closed']:g} |"
    )
  lines += ["", "| part of the closed form | median ms | min ms |", "|---|---:|---:|"]
  for name, t in data["closed_form_variants"].items():
    lines.append(f"| {name} | {t['median_ms']:.3g} | {t['min_ms']:.3g} |")
  share = data.get("noise_share_of_training")
  if share:
    lines += [
      "",
      f"Noise in training: one step of `{share['config']}` (batch "
      f"{'x'.join(map(str, share['batch_shape']))}) takes {share['train_step']['median_ms']:.4g} "
      f"ms, the draw of its noise {share['noise_draw']['median_ms']:.3g} ms "
      f"({100 * share['noise_share_of_step']:.3g}% of the step).",
    ]
  peer = data.get("peer")
  if peer:
    h2h = peer["head_to_head"]
    lines += [
      "",
      f"Peer, head to head ({h2h['rounds']} alternating segments): {peer['what']} "
      f"{h2h['peer_median_ms']:.3g} ms against the closed form {h2h['closed_median_ms']:.3g} ms, "
      f"ratio {h2h['closed_over_peer']:g} (torch {peer['torch_version']}).",
    ]
  else:
    lines += ["", f"Peer: not measured in this run ({data.get('peer_note', 'torch missing')})."]
  return lines


def _noise_decision(data: dict) -> list[str]:
  rows = data["results"]
  lines = [
    "## Decision: no noise generator of our own (`docs/noise_generator_decision.json`)",
    "",
    data["question"],
    "",
    f"{_provenance(data, '')}; {data['setup']}",
    "",
    "| config, batch | train step ms | `jax.random.normal` ms | hand-written threefry ms "
    "| saving, % of a step |",
    "|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    saving = (r["jax_random_normal_ms"] - r["hand_written_ms"]) / r["train_step_ms"]
    lines.append(
      f"| {r['config']}, {'x'.join(map(str, r['batch_shape']))} | {r['train_step_ms']:.0f} "
      f"| {r['jax_random_normal_ms']:.3g} | {r['hand_written_ms']:.3g} | {100 * saving:.2g} |"
    )
  lines += ["", data["decision"]]
  return lines


def _seeds(data: dict) -> list[str]:
  s = data["seconds"]
  median = lambda xs: sorted(xs)[len(xs) // 2]
  return [
    "## Several seeds in one run (`scripts/bench_seeds.py`, `docs/seeds_bench.json`)",
    "",
    f"{_provenance(data, 'python scripts/bench_seeds.py')}; `{data['protocol']['config']}`, "
    f"{data['protocol']['seeds']} seeds, {data['protocol']['steps']} steps. Details: "
    "docs/seeds.md.",
    "",
    "| run | seconds |",
    "|---|---:|",
    f"| {data['protocol']['seeds']} seeds together | {median(s['seeds_together']):.3g} |",
    f"| the same seeds one after another | {median(s['seeds_sequential']):.3g} |",
    f"| one seed | {median(s['one_seed']):.3g} |",
    "",
    f"Together / one seed: {data['ratio_together_over_one_seed']:g} (target: {data['target']}; "
    f"{'met' if data['target_met'] else 'not met'}).",
  ]


def _marginal_fm(data: dict) -> list[str]:
  lines = [
    "## Marginal against conditional flow matching (`scripts/bench_marginal_fm.py`, "
    "`docs/marginal_fm_bench.json`)",
    "",
    f"{_provenance(data, 'python scripts/bench_marginal_fm.py > docs/marginal_fm_bench.json')}; "
    f"{data['protocol']['steps']} steps per objective and N. Details: docs/marginal_fm.md.",
    "",
    "| N | marginal_fm us/step | icfm us/step | ratio |",
    "|---:|---:|---:|---:|",
  ]
  for r in data["results"]:
    m, c = r["marginal_fm"]["us_per_step_median"], r["icfm"]["us_per_step_median"]
    lines.append(f"| {r['num_points']} | {m:.0f} | {c:.0f} | {m / c:.1f} |")
  return lines


def _own_data(data: dict) -> list[str]:
  rates, protocol = data["steps_per_second"], data["protocol"]
  median = data["median_steps_per_second"]
  runs = lambda name: ", ".join(f"{x:g}" for x in rates[name])
  return [
    "## Your own small npz: held on the devices against grain (`scripts/bench_own_data.py`, "
    "`docs/own_data_bench.json`)",
    "",
    f"{_provenance(data, 'python scripts/bench_own_data.py > docs/own_data_bench.json')}; "
    f"{protocol['what']}, `{protocol['config']}` (batch {protocol['batch_size']}, fused chunks of "
    f"{protocol['fused_steps']} steps), through `loop.train` on one device; steps/s after the "
    f"first logging interval, median of {protocol['reps']} runs after a warm-up run, the modes "
    f"alternating (load average {data['environment']['loadavg'][0]:g} at the end).",
    "",
    "| data | steps per run | median steps/s | runs |",
    "|---|---:|---:|---|",
    f"| `data.device_resident=on` | {protocol['steps']['device_resident_on']} "
    f"| {median['device_resident_on']:g} | {runs('device_resident_on')} |",
    f"| `data.device_resident=off` (grain) | {protocol['steps']['device_resident_off']} "
    f"| {median['device_resident_off']:g} | {runs('device_resident_off')} |",
    f"| generated 2D toy (reference) | {protocol['steps']['device_resident_on']} "
    f"| {median['toy2d_reference']:g} | {runs('toy2d_reference')} |",
    "",
    f"On / off: {data['speedup_on_over_off']:g}x; on / toy: {data['on_over_toy2d']:g}.",
  ]


def _ot(data: dict) -> list[str]:
  def timing(t: dict | None) -> str:
    if t is None:
      return "skipped (a smaller B ran past the cap) | |"
    capped = f" (one run, over the {data['cap_s']:g} s cap)" if t["capped"] else ""
    return f"{t['median_s']:.3g}{capped} | {t['cpu_median_s']:.3g}"

  lines = [
    "## Exact OT assignment in the graph (`scripts/bench_ot.py`, `docs/ot_bench.json`)",
    "",
    f"{_provenance(data, 'python scripts/bench_ot.py > docs/ot_bench.json')}; {data['problem']}; "
    f"jax {data['jax_version']} ({data['backend']}, {data['cpu_count']} cores), median of "
    f"{data['reps']} runs after a warm-up (load average {data['loadavg_at_end'][0]:.3g} at the "
    "end). The auction (`objective.ot_solver=jax`, `diffjax.assignment`) runs jitted; POT's "
    "`ot.emd` solves the same matrix on the host in float64.",
    "",
    "| B | auction s | auction CPU s | rounds | emd s | emd CPU s | cost rel. diff "
    "| same pairs | certificate / bound |",
    "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
  ]
  for r in data["sizes"]:
    jax_t, emd_t = r.get("jax"), r.get("emd")
    rounds = jax_t["rounds"] if jax_t else ""
    certificate = f"{jax_t['certificate'] / jax_t['certificate_bound']:.2g}" if jax_t else ""
    same = r.get("same_permutation", "")
    lines.append(
      f"| {r['B']} | {timing(jax_t)} | {rounds} | {timing(emd_t)} "
      f"| {r.get('cost_rel_diff', float('nan')):.1g} | {same} | {certificate} |"
    )
  chunk = data.get("chunk")
  if chunk:
    lines += [
      "",
      f"A training chunk's pairing, {chunk['problems']} problems of B = {chunk['B']}: the auction "
      f"vmapped in one program {chunk['jax']['median_s']:.3g} s ({chunk['jax']['cpu_median_s']:.3g}"
      f" s CPU), emd on the host's threads {chunk['emd_threads']['median_s']:.3g} s "
      f"({chunk['emd_threads']['cpu_median_s']:.3g} s CPU); largest cost difference "
      f"{chunk['max_cost_rel_diff']:.1g} (relative).",
    ]
  return lines


def _sampler_bench(data: dict) -> list[str]:
  env, settings = data["environment"], data["settings"]
  lines = [
    "## Samplers on trained 2D models (`scripts/bench_sample.py`, `docs/sampler_bench.json`)",
    "",
    f"{_provenance(data, 'python scripts/bench_sample.py --out docs/sampler_bench.json')}; "
    f"W2 of {settings['num']} samples (mean of {settings['seeds']} seeds) against NFE for every "
    "sampler each model accepts, samples/s at a batch of "
    f"{settings['timing_batch']}, TorchCFM's MLP with the same weights integrated by "
    f"torchdiffeq (load average {env['loadavg_start'][0]:g} at the start). Tables: "
    "docs/sampler_bench.md. The goal (best solver below Euler and below TorchCFM's best, same "
    "NFE, same run):",
    "",
    "| model | NFE | samples x seeds | best solver | W2 | Euler W2 | TorchCFM's best | W2 | goal |",
    "|---|---:|---|---|---:|---:|---|---:|---|",
  ]
  verdict = {True: "met", False: "not met", None: "undecided"}
  w2 = lambda side: f"{side['w2_mean']:.4f}" if side else ""
  for run in (data, data.get("goal_run")):
    if not run:
      continue
    size = f"{run['settings']['num']} x {run['settings']['seeds']}"
    for model in run["models"].values():
      for nfe, g in model["goal"].items():
        best, euler, peer = g["best"] or {}, g["euler"] or {}, g["peer_best"] or {}
        lines.append(
          f"| {model['title']} | {nfe} | {size} | {best.get('sampler', '')} | {w2(best)} "
          f"| {w2(euler)} | {peer.get('sampler', '')} | {w2(peer)} | {verdict[g['met']]} |"
        )
  return lines


SECTIONS = (
  ("forward_bench.json", _forward),
  ("ot_bench.json", _ot),
  ("noise_generator_decision.json", _noise_decision),
  ("seeds_bench.json", _seeds),
  ("marginal_fm_bench.json", _marginal_fm),
  ("own_data_bench.json", _own_data),
  ("sampler_bench.json", _sampler_bench),
)


def render() -> str:
  lines = [
    "# Benchmarks",
    "",
    "Generated by `python scripts/render_benchmarks.py` from the JSON the benchmark scripts "
    "wrote; each section names the command and date of its figures. All figures are from the "
    "2-core CPU these scripts were developed on unless a section says otherwise; medians after "
    "compilation.",
  ]
  for name, section in SECTIONS:
    data = _load(name)
    if data is not None:
      lines += [""] + section(data)
  return "\n".join(lines) + "\n"


def render_scaling(page: str) -> str:
  """``page`` (docs/scaling.md) with the text between the OT markers replaced by the table of
  docs/ot_bench.json (its heading demoted to a subsection of the page's OT section)."""
  data = _load("ot_bench.json")
  if data is None or OT_BEGIN not in page or OT_END not in page:
    return page
  table = _ot(data)
  table[0] = "###" + table[0].removeprefix("##")
  head, rest = page.split(OT_BEGIN, 1)
  _, tail = rest.split(OT_END, 1)
  return head + OT_BEGIN + "\n" + "\n".join(table) + "\n" + OT_END + tail


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="exit 1 if a page is stale")
  args = parser.parse_args(argv)
  pages = {PAGE: render()}
  if SCALING.exists():
    pages[SCALING] = render_scaling(SCALING.read_text())
  if args.check:
    stale = [path for path, text in pages.items() if not path.exists() or path.read_text() != text]
    for path in stale:
      print(f"{path} is stale: run python scripts/render_benchmarks.py", file=sys.stderr)
    return 1 if stale else 0
  for path, text in pages.items():
    path.write_text(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
