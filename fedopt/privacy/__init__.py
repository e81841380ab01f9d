"""Client-level differential privacy: DP-FedAvg on the coordinator (:mod:`.central`) over an accountant from Google's
``dp_accounting`` (:mod:`.accounting`). Optional: ``pip install 'fedopt[dp]'``; without it, asking for DP is one
ConfigError naming the extra. The README's "Differential privacy" section says what is guaranteed."""

from __future__ import annotations

import logging

from .accounting import Accountant, calibrate, default_delta, require_dp_accounting
from .central import AdaptiveClip, CentralDP, clip_update, noise_seed, secure_normal

__all__ = ["Accountant", "calibrate", "default_delta", "require_dp_accounting", "AdaptiveClip", "CentralDP",
           "clip_update", "noise_seed", "secure_normal", "central_for_run", "INITIAL_ADAPTIVE_CLIP"]

log = logging.getLogger("fedopt.privacy")

#: C₀ of adaptive clipping when --dp-clip-norm is not given (Andrew et al.)
INITIAL_ADAPTIVE_CLIP = 0.1


def central_for_run(cfg, inner, device="cpu") -> CentralDP:
    """DP-FedAvg around ``inner`` for a RunConfig with ``--dp central``: the accountant follows
    ``--client-sampling`` over the run's ``--clients``, and without ``--noise-multiplier`` z is calibrated up front so
    that ε after the planned ``--rounds`` is at most ``--target-epsilon``."""
    p, fed = cfg.privacy, cfg.federation
    setting = dict(kind=p.accountant, sampling=fed.client_sampling, population=fed.clients,
                   per_round=fed.per_round, delta=p.delta)
    z = p.noise_multiplier
    if z is None:
        z = calibrate(p.target_epsilon, fed.rounds, **setting)
        log.info("--noise-multiplier %.4g: epsilon <= %g after %d rounds", z, p.target_epsilon, fed.rounds)
    adaptive = AdaptiveClip(p.adaptive_clip) if p.adaptive_clip is not None else None
    clip = p.dp_clip_norm if p.dp_clip_norm is not None else INITIAL_ADAPTIVE_CLIP
    return CentralDP(inner, Accountant(noise_multiplier=z, **setting), clip=clip, seed=cfg.seed, adaptive=adaptive,
                     noise_source=p.noise_source, target_epsilon=p.target_epsilon, device=device)
