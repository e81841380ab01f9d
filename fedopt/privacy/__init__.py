"""Client-level differential privacy: DP-FedAvg with the noise added on the coordinator (:mod:`.central`, over an
accountant from Google's ``dp_accounting``, :mod:`.accounting`) or by the clients inside SecAgg+ (:mod:`.distributed`,
Skellam noise). Optional: ``pip install 'fedopt[dp]'``; without it, asking for DP is one ConfigError naming the extra.
The README's "Differential privacy" section says what is guaranteed."""

from __future__ import annotations

import logging
import math

from ..errors import ConfigError
from .accounting import Accountant, calibrate, default_delta, require_dp_accounting
from .central import AdaptiveClip, CentralDP, clip_update, noise_seed, secure_normal
from .distributed import DistributedDP, SkellamAccountant

__all__ = ["Accountant", "calibrate", "default_delta", "require_dp_accounting", "AdaptiveClip", "CentralDP",
           "clip_update", "noise_seed", "secure_normal", "central_for_run", "INITIAL_ADAPTIVE_CLIP", "DistributedDP",
           "SkellamAccountant", "distributed_for_run", "privacy_for_run", "default_min_clients", "privacy_summary"]

log = logging.getLogger("fedopt.privacy")

#: C₀ of adaptive clipping when --dp-clip-norm is not given (Andrew et al.)
INITIAL_ADAPTIVE_CLIP = 0.1


def central_for_run(cfg, inner, device="cpu") -> CentralDP:
    """DP-FedAvg around ``inner`` for a RunConfig with ``--dp central``: the accountant follows
    ``--client-sampling`` over the run's ``--clients`` (buffered asynchronous rounds: one unsampled release per buffer,
    over the buffer's K), and without ``--noise-multiplier`` z is calibrated up front so that ε after the planned
    ``--rounds`` (buffers) is at most ``--target-epsilon``."""
    p, fed = cfg.privacy, cfg.federation
    setting = dict(kind=p.accountant, sampling=fed.client_sampling, population=fed.clients,
                   per_round=fed.per_round, delta=p.delta)
    denominator = None
    if cfg.buffered.buffer_size is not None:
        # FedBuff: each full buffer of K updates is one release (noised sum over K). Clients are dispatched as slots
        # free up, drawn among the idle ones: no sampling argument amplifies that, so each buffer is accounted as an
        # unsampled Gaussian mechanism (q = 1) of sensitivity C, whichever buffers a client's updates land in
        setting.update(sampling="poisson", per_round=1.0)
        denominator = float(cfg.buffered.buffer_size)
    z = p.noise_multiplier
    if z is None:
        z = calibrate(p.target_epsilon, fed.rounds, **setting)
        log.info("--noise-multiplier %.4g: epsilon <= %g after %d rounds", z, p.target_epsilon, fed.rounds)
    adaptive = AdaptiveClip(p.adaptive_clip) if p.adaptive_clip is not None else None
    clip = p.dp_clip_norm if p.dp_clip_norm is not None else INITIAL_ADAPTIVE_CLIP
    return CentralDP(inner, Accountant(noise_multiplier=z, **setting), clip=clip, seed=cfg.seed, adaptive=adaptive,
                     noise_source=p.noise_source, target_epsilon=p.target_epsilon, device=device,
                     denominator=denominator)


def privacy_summary(dp) -> str:
    """One line for a run's summary: ε at δ after the releases, the accountant, the sampling and the noise."""
    a = dp.accountant
    sampling = "no amplification by sampling (q = 1)" if a.q >= 1 else f"{a.sampling} sampling, q = {a.q:.3g}"
    return (f"epsilon {a.epsilon():.4g} at delta {a.delta:.3g} after {a.rounds} releases ({a.kind}, {sampling}, "
            f"noise multiplier {a.noise_multiplier:.4g})")


def default_min_clients(expected: float) -> int:
    """t of ``--dp distributed`` when ``--dp-min-clients`` is not given: two standard deviations of a Poisson cohort
    of mean D below D (at least 2), so about 2% of large rounds fall short and abort."""
    return max(2, math.floor(expected - 2 * math.sqrt(expected)))


def distributed_for_run(cfg, size: int) -> DistributedDP:
    """DP-FedAvg with client-side Skellam noise inside SecAgg+ for a RunConfig with ``--dp distributed`` and a model of
    ``size`` parameters: the secagg aggregator (clip C = ``--dp-clip-norm``, unweighted, ``--bits``, the run's
    neighbours and threshold) with the run's public noise parameters, and the Skellam accountant; without
    ``--noise-multiplier`` z is calibrated up front for ``--target-epsilon`` after ``--rounds``."""
    from ..aggregators.secure import SecureAggregator
    from ..secagg import DistributedNoise
    from ..secagg.skellam import MAX_LAMBDA

    p, fed = cfg.privacy, cfg.federation
    opts = {k: v for k, v in cfg.aggregator_options.items() if k not in ("clip", "weighting", "inner", "max_weight")}
    given_bits = opts.pop("bits", None)

    def accountant(z: float, bits: int) -> SkellamAccountant:
        return SkellamAccountant(population=fed.clients, per_round=fed.per_round, noise_multiplier=z, bits=bits,
                                 dim=size, delta=p.delta)

    expected = accountant(1.0, 16).expected_cohort  # D: the sampling's, whatever z and the bits

    def noise_for(bits: int) -> tuple[float, DistributedNoise]:
        z = p.noise_multiplier
        if z is None:
            z = calibrate(p.target_epsilon, fed.rounds, make=lambda z: accountant(z, bits))
        t = p.dp_min_clients if p.dp_min_clients is not None else default_min_clients(expected)
        return z, DistributedNoise(float(z), int(t))

    if given_bits is not None:
        bits = int(given_bits)
        z, noise = noise_for(bits)
    else:
        bits, z, noise = _wire_bits(noise_for, expected, size)
    if p.noise_multiplier is None:
        log.info("--noise-multiplier %.4g: epsilon <= %g after %d rounds (Skellam, %d-bit quantisation)", z,
                 p.target_epsilon, fed.rounds, bits)
    if noise.min_clients > fed.clients:
        raise ConfigError(f"--dp-min-clients {noise.min_clients} is more than the {fed.clients} clients of the run: "
                          f"every round would abort")
    if noise.min_clients > expected:
        log.warning("--dp-min-clients %d is above the %.4g clients expected a round: most rounds will abort (each "
                    "still counts in the privacy ledger)", noise.min_clients, expected)

    if noise.client_lambda(bits, size) > MAX_LAMBDA:
        raise ConfigError(f"--dp distributed: {bits}-bit quantisation with noise multiplier {z:.4g} and "
                          f"{noise.min_clients} planned clients needs Skellam noise beyond what the sampler draws "
                          f"exactly (lambda {noise.client_lambda(bits, size):.3g} > 2^36): lower --bits (16 or less)")
    inner = SecureAggregator(**opts, clip=p.dp_clip_norm, bits=bits, weighting="uniform", seed=cfg.seed,
                             dp_noise=noise, noise_source=p.noise_source)
    return DistributedDP(inner, accountant(z, bits), target_epsilon=p.target_epsilon)


#: the widest masked word distributed DP aims for by default, and the share of the integer sensitivity Δ₂ = T + √d that
#: stochastic rounding (√d) may add on top of the clip's T: beyond it, wider words buy a finer quantisation instead
WIRE_BITS, ROUNDING_SHARE = 20, 0.05


def _wire_bits(noise_for, expected: float, dim: int):
    """(bits, z, noise) of ``--dp distributed`` without ``--bits``: the finest quantisation whose rounds of up to
    D + 4√D clients (D expected; larger Poisson cohorts are rarer than 1 in 15,000 rounds) fit masked words of
    :data:`WIRE_BITS` bits with the noise's tail bound, so a value costs at most 20 bits on the wire; where rounding
    would then add more than :data:`ROUNDING_SHARE` to the sensitivity (large models), the next width (24, 28, 32
    bits). z depends a little on the bits (the Skellam bound's Δ₁ term): the search runs with the 16-bit z plus 10%,
    and the bits found are checked again with their own calibrated z (``noise_for(bits) -> (z, noise)``)."""
    from ..errors import SecAggError
    from ..secagg.quantize import QuantConfig, check_capacity

    cohort = max(2, math.ceil(expected + 4 * math.sqrt(expected)))

    def fits(bits: int, word: int, noise) -> bool:
        try:
            check_capacity(QuantConfig(1.0, bits, word, noise_bound=noise.tail_bound(cohort, bits, dim)), cohort)
            return True
        except SecAggError:
            return False

    z16, noise16 = noise_for(16)
    rough = type(noise16)(z16 * 1.1, noise16.min_clients)
    for word in (WIRE_BITS, 24, 28, 32):
        for bits in range(min(16, word - 1), 1, -1):
            if math.sqrt(dim) > ROUNDING_SHARE * ((1 << (bits - 1)) - 1):
                break  # coarser still only adds rounding
            if fits(bits, word, rough):
                z, noise = noise_for(bits) if bits != 16 else (z16, noise16)
                if fits(bits, word, noise):
                    return bits, z, noise
    return 16, z16, noise16


def privacy_for_run(cfg, inner, device="cpu", size: int = 0):
    """The DP wrapper a RunConfig asks for (``--dp central`` or ``distributed``) around the run's aggregator."""
    if cfg.privacy.dp == "distributed":
        return distributed_for_run(cfg, size)
    return central_for_run(cfg, inner, device)
