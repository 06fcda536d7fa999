"""The guidance flags of `diffjax sample` and `diffjax evaluate`, checked and resolved at the edge.

``--guidance W`` alone is classifier-free guidance (CFG). Beside it:

* ``--guidance-interval LO,HI``: guide only for model times ``LO <= t <= HI`` (in the sampler's
  model time: flow time for flow models, diffusion time for diffusion models, the noise level
  for EDM), the conditional model elsewhere (Kynkaanniemi et al. 2024,
  https://arxiv.org/abs/2404.07724; :func:`diffjax.samplers.guidance.interval_scale` maps the
  paper's sigma interval onto model time);
* ``--guide-workdir PATH``: autoguidance, the reference is the conditional model of another
  workdir (smaller or trained shorter; Karras et al. 2024, https://arxiv.org/abs/2406.02507),
  read read-only like ``diffjax sample`` reads its own;
* ``--guidance-method apg`` with ``--apg-eta``, ``--apg-norm``, ``--apg-momentum``: adaptive
  projected guidance (Sadat et al. 2024, https://arxiv.org/abs/2410.02416).

:func:`check_guidance_flags` checks the values before anything is read; :func:`check_against_model`
checks them against the workdir's config (and the guide's) before anything is restored or
compiled; :func:`generate_options` restores the guide and returns the keyword arguments of the
generator. Every problem is one :class:`~diffjax.run.UsageError` line naming the flag and the fix.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, NamedTuple

__all__ = [
  "GuidanceFlags",
  "METHODS",
  "check_guidance_flags",
  "check_against_model",
  "generate_options",
  "describe",
]

METHODS = ("cfg", "apg")
"""``--guidance-method`` choices."""


class GuidanceFlags(NamedTuple):
  """The guidance flags as given (None: not given)."""

  interval: str | None = None
  guide_workdir: str | None = None
  method: str | None = None
  apg_eta: float | None = None
  apg_norm: float | None = None
  apg_momentum: float | None = None

  def any_given(self) -> bool:
    return any(value is not None for value in self)


def _usage_error(message: str) -> Exception:
  from diffjax.run import UsageError  # pylint: disable=import-outside-toplevel

  return UsageError(message)


def _parse_interval(text: str) -> tuple[float, float]:
  parts = text.split(",")
  fix = (
    "must be two numbers LO,HI with 0 <= LO < HI in the sampler's model time (flow time for "
    "flow models, diffusion time for diffusion models, sigma for EDM), e.g. 0.2,0.8"
  )
  try:
    lo, hi = (float(part) for part in parts)
  except ValueError:
    raise _usage_error(f"--guidance-interval {text}: {fix}") from None
  if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
    raise _usage_error(f"--guidance-interval {text}: {fix}")
  return lo, hi


def check_guidance_flags(flags: GuidanceFlags | None, *, guidance: float | None):
  """The :class:`~diffjax.samplers.guidance.Guidance` the flags ask for (None: plain CFG or
  none), after checking each value on its own; raises one UsageError line otherwise."""
  from diffjax.samplers.guidance import APG, Guidance  # pylint: disable=import-outside-toplevel

  if flags is None or not flags.any_given():
    return None
  if guidance is None:
    first = describe(flags).split(" --")[0]
    raise _usage_error(
      f"{first}: needs a guidance weight; add --guidance W (1 is the conditional model, e.g. 2)"
    )
  method = flags.method or "cfg"
  if method not in METHODS:
    raise _usage_error(f"--guidance-method {method!r}: choose one of {list(METHODS)}")
  apg_flags = {"--apg-eta": flags.apg_eta, "--apg-norm": flags.apg_norm}
  apg_flags["--apg-momentum"] = flags.apg_momentum
  if method != "apg":
    for flag, value in apg_flags.items():
      if value is not None:
        raise _usage_error(
          f"{flag} {value}: applies to --guidance-method apg only; add it, or drop {flag}"
        )
  apg = None
  if method == "apg":
    eta = 0.0 if flags.apg_eta is None else flags.apg_eta
    norm = math.inf if flags.apg_norm is None else flags.apg_norm
    momentum = 0.0 if flags.apg_momentum is None else flags.apg_momentum
    if not math.isfinite(eta):
      raise _usage_error(
        f"--apg-eta {eta}: must be a finite number (0 drops the parallel part, 1 keeps it)"
      )
    if math.isnan(norm) or not norm > 0:
      raise _usage_error(f"--apg-norm {norm}: must be > 0 (inf: no cap on the update's norm)")
    if not (math.isfinite(momentum) and -1 < momentum < 1):
      raise _usage_error(
        f"--apg-momentum {momentum}: must be in (-1, 1) so the running average stays bounded "
        "(the paper's reverse momentum is negative, e.g. -0.5; 0: none)"
      )
    apg = APG(eta=float(eta), norm_threshold=float(norm), momentum=float(momentum))
  interval = None if flags.interval is None else _parse_interval(flags.interval)
  if interval is None and apg is None:
    return None
  return Guidance(interval=interval, apg=apg)


def _has_x0(config) -> bool:
  """Whether the model's generator turns its output into an x0 estimate: exactly the models
  whose generator accepts the samplers of a Gaussian process (they need the same)."""
  from diffjax import objectives  # pylint: disable=import-outside-toplevel

  spec = objectives.OBJECTIVES[config.objective.name]
  choices = objectives.accepted_samplers(
    spec, dict(config.objective), source_is_normal=config.data.source == "normal"
  )
  return "dpmpp_2m" in choices


def _is_flow_ode(config) -> bool:
  from diffjax import objectives  # pylint: disable=import-outside-toplevel

  spec = objectives.OBJECTIVES[config.objective.name]
  return spec.output == "velocity" and spec.time_inputs == 1


def check_against_model(
  workdir, config, flags: GuidanceFlags | None, rule, *, samplers, default_sampler: str
) -> None:
  """The flags against the model in ``workdir`` (its ``config``) and the guide's config: APG
  needs an x0 estimate, its momentum the 'euler' sampler of a flow model; a guide must be a
  conditional model of the same data and objective (:func:`_check_guide`)."""
  if rule is not None and rule.apg is not None:
    if not _has_x0(config):
      raise _usage_error(
        f"--guidance-method apg: the {config.objective.name!r} model in {workdir} gives no "
        "denoised (x0) estimate, where APG works (it needs a Gaussian process: an N(0, I) "
        "source with independent pairs, or a diffusion model); use --guidance-method cfg"
      )
    if rule.apg.momentum != 0:
      names = [name or default_sampler for name in (samplers or (None,))]
      if not _is_flow_ode(config) or any(name != "euler" for name in names):
        raise _usage_error(
          f"--apg-momentum {rule.apg.momentum}: the running average is carried through the "
          f"steps of the 'euler' sampler of a flow model only (here: {config.objective.name!r}, "
          f"sampler {', '.join(names)}); pass --sampler euler on a flow model, or drop "
          "--apg-momentum"
        )
  if flags is not None and flags.guide_workdir is not None:
    _check_guide(flags.guide_workdir, config)


OBJECTIVE_FREE_KEYS = ("label_dropout",)
"""``config.objective`` keys a guide may set differently: they change the training only."""


def _check_guide(guide_workdir: str, config) -> None:
  """The guide of autoguidance: a trained conditional model of one seed, of the same data and
  objective settings (so its output means the same thing at the same times)."""
  from diffjax.run import UsageError, load_workdir_config  # pylint: disable=import-outside-toplevel
  from diffjax.train.teacher import data_differences  # pylint: disable=import-outside-toplevel

  flag = f"--guide-workdir {guide_workdir}"
  path = pathlib.Path(guide_workdir) / "config.json"
  if not path.is_file():
    raise _usage_error(
      f"{flag}: {path} not found; pass the workdir of a run of `diffjax train` (the guide)"
    )
  try:
    guide = load_workdir_config(guide_workdir)
  except UsageError as e:
    raise _usage_error(f"{flag}: {e}") from None
  if config.objective.name == "edm":
    raise _usage_error(
      f"{flag}: autoguidance of an 'edm' model is not available (its denoiser wraps the "
      "network with preconditioning that the guide would need too); use --guidance alone"
    )
  if not config.data.num_classes:
    raise _usage_error(
      f"{flag}: the main model is unconditional (data.num_classes=0); autoguidance here guides "
      "class-conditional models; drop --guide-workdir"
    )
  if not guide.data.num_classes:
    raise _usage_error(
      f"{flag}: the guide is unconditional (data.num_classes=0); it must be conditioned like "
      "the main model: train the guide with the main model's data.num_classes"
    )
  differences = data_differences(guide.data, config.data)
  if differences:
    raise _usage_error(
      f"{flag}: the guide was trained on other data ({'; '.join(differences)}, guide -> "
      "main); train the guide on the main model's data"
    )
  keys = sorted((set(guide.objective) | set(config.objective)) - set(OBJECTIVE_FREE_KEYS))
  changed = [
    f"objective.{key}: {guide.objective.get(key)!r} -> {config.objective.get(key)!r}"
    for key in keys
    if guide.objective.get(key) != config.objective.get(key)
  ]
  if changed:
    raise _usage_error(
      f"{flag}: the guide's objective differs ({'; '.join(changed)}, guide -> main), so its "
      "output means something else; train the guide with the main model's objective"
    )
  if guide.train.num_seeds != 1:
    raise _usage_error(
      f"{flag}: the guide trained train.num_seeds={guide.train.num_seeds} seeds; a guide is "
      "one model: pass a run of one seed"
    )


def generate_options(flags: GuidanceFlags | None, rule) -> dict[str, Any]:
  """The generator's keyword arguments for the flags: ``guidance_rule`` and, with a guide, its
  network ``guide_apply`` and EMA parameters ``guide_params`` (restored read-only)."""
  options: dict[str, Any] = {}
  if rule is not None:
    options["guidance_rule"] = rule
  if flags is not None and flags.guide_workdir is not None:
    from diffjax.run import restore_for_inference  # pylint: disable=import-outside-toplevel

    _, experiment, params, _ = restore_for_inference(flags.guide_workdir)
    options.update(guide_apply=experiment.model.apply, guide_params=params)
  return options


def describe(flags: GuidanceFlags | None) -> str:
  """The flags as given, for titles and messages ('' when none)."""
  if flags is None:
    return ""
  return " ".join(
    f"--{name.replace('_', '-')} {value}"
    for name, value in flags._asdict().items()
    if value is not None
  )
