r"""The estimators of docs/method.md §2–§5, computed once, from per-sequence terms.

Notation (one entry per sequence i of E, N in all, grouped by prompt g):

    S_i(θ) = Σ_k log q_θ(y_ik)     f_i(θ) = Σ_k H(q_θ,ik) ("rb") or −S_i(θ) ("naive")
    c_i    = T_i ("token") or 1 ("sequence")
    w_i(θ) = exp(S_i(θ) − S_i(θ₀))      (log space, shifted by the max before exp)

    Ĥ(θ) = Σ_i w_i f_i / Σ_i w_i c_i ,   g(s) = Ĥ(θ₀ + sΔθ).

At s = 0 all w_i = 1. With S'_i, f'_i, S''_i, f''_i the directional derivatives along Δθ,
F = Σ f, C = Σ c, and g = g(0):

    g′(0) = Σ_i [f'_i + (f_i − g c_i) S'_i] / C
    g″(0) = Σ_i [(f_i − g c_i)(S''_i + S'_i²) + f''_i + 2 S'_i f'_i − 2 g′ c_i S'_i] / C

(from g·D = N with N = Σ w f, D = Σ w c, w' = w S', w'' = w (S'' + S'²)).

E drawn from another proposal p (the user's rollout engine: other kernels, precision or
sampling settings; docs/method.md §3, Proposal) carries log p(y_i) per sequence. Every
estimator then weights sequence i by b_i = q_θ₀(y_i)/p(y_i) (``proposal_weights``; all 1 when
p = q_θ₀): every per-sequence column below is multiplied by b_i, and w_i(θ) becomes
q_θ(y_i)/p(y_i) = b_i·exp(S_i(θ) − S_i(θ₀)). The formulas keep their form with
Σ over i read as Σ_i b_i (·): e.g. g′(0) = Σ_i b_i [f'_i + (f_i − g c_i) S'_i] / Σ_i b_i c_i.

Every statistic is a smooth function of column sums Σ_i x_i. Its standard error is the
grouped (leave-one-prompt-out) jackknife, computed in O(N) from per-group sums:

    θ̂_(−g) = stat(total − sum_g),   se² = (G−1)/G · Σ_g (θ̂_(−g) − mean_g θ̂_(−g))².

Such an SE has G − 1 degrees of freedom: 95 % bands are ± t_{0.975, G−1}·se (``t_quantile``),
which is 3.18·se at G = 4 and tends to 1.96·se as G grows.

All arithmetic here is float64 on the CPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

Statistic = Callable[[Tensor], Tensor]  # column sums [..., K] -> value [...]


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(device="cpu", dtype=torch.float64)


def normaliser(token_counts: Tensor, normalize: str) -> Tensor:
    """c_i: T_i for "token" (nats per token), 1 for "sequence" (nats per sequence)."""
    counts = _f64(token_counts)
    return counts if normalize == "token" else torch.ones_like(counts)


def group_index(group: Tensor) -> tuple[Tensor, int]:
    """Dense group ids 0..G-1 from arbitrary prompt indices."""
    _, dense = torch.unique(group.detach().cpu(), return_inverse=True)
    return dense, int(dense.max()) + 1


def degrees_of_freedom(group: Tensor) -> int:
    """G − 1: the degrees of freedom of a grouped-jackknife SE over G prompt groups."""
    return group_index(group)[1] - 1


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) (continued fraction, Lentz's method)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d, f = 1.0, 0.0, 1.0
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / (c if abs(c) > tiny else tiny)
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0)


@functools.lru_cache(maxsize=None)
def t_quantile(dof: int, level: float = 0.95) -> float:
    """The two-sided Student-t multiplier t_{(1+level)/2, dof}: a level band is ± t·se.

    NaN without degrees of freedom (one prompt group)."""
    if dof < 1:
        return math.nan
    target = (1.0 - level) / 2  # upper-tail probability: P(T > t) = ½ I_{ν/(ν+t²)}(ν/2, ½)
    tail = lambda t: 0.5 * _incomplete_beta(dof / 2, 0.5, dof / (dof + t * t))  # noqa: E731
    low, high = 0.0, 1.0
    while tail(high) > target:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if tail(mid) > target else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class Jackknifed:
    """A statistic's value and its values with each prompt group left out (the grouped jackknife).

    Sums and differences of Jackknifed statistics of the same E are paired: their leave-outs
    combine group by group, so e.g. ``a - b`` carries the SE of the paired difference.
    """

    value: float
    leave_out: Tensor  # [G]
    controlled: bool = False  # control variates were applied (``jackknifed``)
    # The per-sequence control corrections β_(−g(i))·u_i subtracted (not carried through arithmetic).
    correction: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def se(self) -> float:
        """se² = (G−1)/G · Σ_g (θ̂_(−g) − mean_g θ̂_(−g))²; NaN with fewer than two groups."""
        num_groups = self.leave_out.numel()
        if num_groups < 2:
            return math.nan
        spread = ((self.leave_out - self.leave_out.mean()) ** 2).sum()
        return float(torch.sqrt((num_groups - 1) / num_groups * spread))

    def __add__(self, other: Jackknifed) -> Jackknifed:
        return Jackknifed(self.value + other.value, self.leave_out + other.leave_out,
                          self.controlled or other.controlled)

    def __sub__(self, other: Jackknifed) -> Jackknifed:
        return self + other.scaled(-1.0)

    def scaled(self, factor: float) -> Jackknifed:
        return Jackknifed(factor * self.value, factor * self.leave_out, self.controlled)


def jackknifed(columns: Tensor, group: Tensor, statistic: Statistic, controls: Tensor | None = None,
               families: Sequence[Sequence[int]] | None = None) -> Jackknifed:
    """``statistic`` of the column sums of ``columns`` [N, K], with its grouped jackknife;
    minus the cross-fitted control-variate correction when ``controls`` [N, J] are given and
    there is enough data to fit it (``control_corrections``)."""
    dense, num_groups = group_index(group)
    per_group = torch.zeros(num_groups, columns.shape[1], dtype=torch.float64).index_add_(0, dense, columns)
    value, leave_out = float(statistic(columns.sum(0))), statistic(_other_groups(per_group))
    correction = None if controls is None else control_corrections(columns, per_group, dense, statistic, controls,
                                                                   families or CONTROL_FAMILIES)
    if correction is None:
        return Jackknifed(value, leave_out)
    per_group_correction = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, dense, correction)
    return Jackknifed(value - float(per_group_correction.sum()),
                      leave_out - _other_groups(per_group_correction[:, None])[:, 0], controlled=True,
                      correction=correction)


def _other_groups(per_group: Tensor) -> Tensor:
    """Row g: the sum of every row but g, of ``per_group`` [G, K], added up from the others
    (exclusive prefix + suffix sums), not as total − row g: where one group holds nearly all the
    weight, that difference would cancel to rounding noise (a leave-out SE off by half at a
    log-weight gap of 36, NaN at 40)."""
    zero = torch.zeros_like(per_group[:1])
    before = torch.cat([zero, per_group[:-1].cumsum(0)])
    after = torch.cat([per_group[1:].flip(0).cumsum(0).flip(0), zero])
    return before + after


def jackknife_se(columns: Tensor, group: Tensor, statistic: Statistic) -> float:
    """Grouped-jackknife standard error of ``statistic`` of the column sums of ``columns`` [N, K]."""
    return jackknifed(columns, group, statistic).se


MIN_CONTROL_GROUPS = 4  # each group's coefficients come from at least 3 others
MIN_FIT_PER_COEFFICIENT = 4  # sequences per fitted coefficient in every leave-one-group-out fit
# Ridge on the standardised features, per fitted sequence: a feature that is ~0 outside group g
# (a rare token's surprisal, all in one group) gets a coefficient near 0 there, not a wild one.
CONTROL_RIDGE = 0.02
# A feature set must cut the out-of-group spread by this fraction to be used (no chance picks).
CONTROL_MARGIN = 0.02
# Groups g mod K form K folds; a group's feature set is chosen on the other folds alone.
CONTROL_CHOICE_FOLDS = 8
# Columns of the control features (scoring.score_controls): the score family, the surprisal family.
CONTROL_FAMILIES = ((0, 1, 2), (3, 4, 5, 6, 7))
# The features that do not depend on Δθ: Ĥ(θ₀) uses only these, so that it is the same number
# whatever step is probed on the same E.
STEP_FREE_CONTROLS = (3, 4, 5, 6)


def control_corrections(columns: Tensor, per_group: Tensor, dense: Tensor, statistic: Statistic,
                        controls: Tensor, families: Sequence[Sequence[int]] = CONTROL_FAMILIES) -> Tensor | None:
    r"""Per-sequence corrections β_(−g(i))·u_i of a cross-fitted control variate (docs/method.md §5).

    The statistic T(Σ_i x_i) moves, to first order, by ψ_i = ∇T · x_i per sequence. Its noise is
    reduced by subtracting Σ_i β·u_i, where the features u_i have mean 0 (``controls``, already
    times b_i under a proposal), with β the least-squares fit of ψ_i on [1, u_i]. Cross-fitting:
    group g's β_(−g) is fitted on the other groups only, so it is independent of u_i for i in g
    and E[β_(−g)·u_i] = E[β_(−g)]·E[u_i] = 0 — the correction adds no bias, whatever the fit.

    Which features help depends on the model and the step, and a feature that does not help
    costs variance through its fitted coefficient. So group g's feature set — one of the
    ``families`` (columns of ``controls``), all of them, or none — is the one whose residuals
    ψ_h − Σ β·u spread least over the groups h outside g's fold (``CONTROL_CHOICE_FOLDS``), each
    fitted without h and without g's fold, and only if it beats none there by
    ``CONTROL_MARGIN``: nothing in the choice comes from group g. β is a ridge fit on standardised features
    (``CONTROL_RIDGE``), which keeps a heavy-tailed feature seen in one group only from a wild
    coefficient there.

    None (no correction) when no feature set beats none, with fewer than ``MIN_CONTROL_GROUPS``
    groups or too few sequences per coefficient, or with non-finite terms (e.g. all SNIS weights 0).
    """
    num_groups = per_group.shape[0]  # ``per_group``: the column sums of each group [G, K]
    u = _f64(controls)
    scale = u.square().mean(0).sqrt()
    usable = torch.isfinite(scale) & (scale > 0)
    if num_groups < MIN_CONTROL_GROUPS or not bool(usable.any()):
        return None
    u = torch.where(usable, u / torch.where(usable, scale, 1.0), 0.0)
    # ψ for group g's fit is linearised at the sums without g, so β_(−g) owes nothing to group g.
    with torch.enable_grad():
        leave_out = _other_groups(per_group).requires_grad_(True)
        (gradients,) = torch.autograd.grad(statistic(leave_out).sum(), leave_out)
    influence = gradients @ columns.T  # [G, N]: ψ_i linearised without group g
    if not bool(torch.isfinite(influence).all() & torch.isfinite(u).all()):
        return None
    smallest_fit = int(dense.numel() - torch.bincount(dense, minlength=num_groups).max())
    families = [[j for j in family if j < u.shape[1] and bool(usable[j])] for family in families]
    candidates = {tuple(c) for c in (*families, [j for f in families for j in f])
                  if c and smallest_fit >= MIN_FIT_PER_COEFFICIENT * (len(c) + 1)}

    # Group g's feature set is chosen without group g: its fold (g mod K) is left out of the
    # residuals compared and of every fit behind them. With group g's own residual in the choice,
    # a set that happened to fit group g's noise was picked for it (at 8 groups of 4 the
    # controlled Ĥ ran 7.8 Monte Carlo standard errors from the plain one).
    folds = min(num_groups, CONTROL_CHOICE_FOLDS)
    fold = torch.arange(num_groups) % folds
    outside = fold[None, :] != torch.arange(folds)[:, None]  # [K, G]: the groups fold k's choice sees

    def spread_outside(sums: Tensor) -> Tensor:  # [K, G] (row k: group sums as fold k sees them) -> [K]
        mean = torch.where(outside, sums, 0.0).sum(1) / outside.sum(1)
        return torch.where(outside, (sums - mean[:, None]).square(), 0.0).sum(1)

    own = torch.zeros(num_groups, dtype=torch.float64).index_add_(
        0, dense, influence[dense, torch.arange(dense.numel())])  # Σ_{i∈h} ψ_i as h's fit sees it
    best_spread = (1 - CONTROL_MARGIN) * spread_outside(own.expand(folds, -1))
    best_set = torch.full((folds,), -1)  # per fold, the index of its feature set (−1: none)
    sets = sorted(candidates)
    for index, residual in enumerate(_residuals_fitted_without(u, influence, dense, fold, sets)):
        residual_spread = spread_outside(residual)
        better = residual_spread < best_spread
        best_spread = torch.where(better, residual_spread, best_spread)
        best_set = torch.where(better, index, best_set)
    if not bool((best_set >= 0).any()):
        return None
    correction = torch.zeros(dense.numel(), dtype=torch.float64)
    for index in best_set.unique().tolist():
        if index >= 0:
            fitted = _cross_fitted(u[:, list(sets[index])], influence, dense, num_groups)
            correction = torch.where(best_set[fold[dense]] == index, fitted, correction)
    return correction


def _cross_fitted(u: Tensor, targets: Tensor, dense: Tensor, num_groups: int) -> Tensor:
    """u_i·β_(−g(i)), with β_(−g) the ridge fit (``_ridge_coefficients``) of ``targets[g]`` [N]
    on [1, u] over the sequences outside group g."""
    x = torch.cat([torch.ones_like(u[:, :1]), u], 1)
    outside = (dense[None, :] != torch.arange(num_groups)[:, None]).to(torch.float64)  # [G, N]
    gram = torch.einsum("gn,ni,nj->gij", outside, x, x)
    moment = torch.einsum("gn,ni,gn->gi", outside, x, targets)
    beta = _ridge_coefficients(gram, moment, outside.sum(1))  # [G, J]
    return (u * beta[dense]).sum(1)


def _ridge_coefficients(gram: Tensor, moment: Tensor, fitted: Tensor) -> Tensor:
    """β of the fits (X'X + CONTROL_RIDGE·n_fit·I)⁻¹ X'y on [1, u], batched over the leading
    dims of ``gram`` [..., p, p] and ``moment`` [..., p] (``fitted``: n_fit), the intercept
    unshrunk and dropped from β. The ridge makes each system positive definite when n_fit > 0:
    Cholesky, several times faster than pinv over many small systems; pinv where a
    factorisation fails anyway."""
    size = gram.shape[-1]
    ridge = torch.diag(torch.cat([torch.zeros(1, dtype=torch.float64), torch.ones(size - 1, dtype=torch.float64)]))
    gram = gram + CONTROL_RIDGE * fitted[..., None, None] * ridge
    factor, info = torch.linalg.cholesky_ex(gram)
    beta = torch.cholesky_solve(moment[..., None], factor)
    failed = info != 0
    if bool(failed.any()):
        beta[failed] = torch.linalg.pinv(gram[failed], hermitian=True) @ moment[..., None][failed]
    return beta[..., 1:, 0]


def _residuals_fitted_without(u: Tensor, targets: Tensor, dense: Tensor, fold: Tensor,
                              subsets: Sequence[Sequence[int]]) -> list[Tensor]:
    """Per subset of u's columns, [K, G]: entry (k, h), for h outside fold k (``fold``: each
    group's fold), is group h's residual Σ_{i∈h} (targets[h, i] − β_(−k,−h)·u_i), with
    β_(−k,−h) the ridge fit (as ``_cross_fitted``) of targets[h] on [1, u] over the groups in
    neither fold k nor h: what the choice of features for fold k's groups may look at, none of
    it fitted on them. Entries with h in fold k are not used."""
    x = torch.cat([torch.ones_like(u[:, :1]), u], 1)  # [N, p]: every subset's X'X is a block of these
    (n, size), num_groups, folds = x.shape, targets.shape[0], int(fold.max()) + 1
    gram_of = torch.zeros(num_groups, size, size, dtype=torch.float64).index_add_(
        0, dense, x[:, :, None] * x[:, None, :])  # each group's X'X; row 0 holds (n_h, Σ_{i∈h} u_i)
    gram_fold = torch.zeros(folds, size, size, dtype=torch.float64).index_add_(0, fold, gram_of)
    own_moment = torch.zeros(num_groups, size, dtype=torch.float64).index_add_(
        0, dense, targets[dense, torch.arange(n)][:, None] * x)  # Σ_{i∈h} x_i targets[h, i]
    by_fold = torch.zeros(n, folds, size, dtype=torch.float64)
    by_fold[torch.arange(n), fold[dense]] = x  # x_i in its fold's block, 0 in the others
    moment_fold = (targets @ by_fold.view(n, -1)).view(num_groups, folds, size)  # [h, k]: Σ_{i∈k} x_i targets[h, i]
    outside_moment = moment_fold.sum(1) - own_moment  # [h]: over the groups other than h
    gram = gram_fold.sum(0) - gram_fold[:, None] - gram_of[None]  # [k, h, p, p]: without fold k and h
    moment = outside_moment[None] - moment_fold.transpose(0, 1)  # [k, h, p]
    fitted = n - gram_fold[:, None, 0, 0] - gram_of[None, :, 0, 0]
    inside = fold[None, :] == torch.arange(folds)[:, None]
    fitted[inside] = 0.0  # h in fold k: unused, kept solvable as the identity below
    residuals = []
    for subset in subsets:
        pick = torch.tensor([0, *(1 + j for j in subset)])
        chosen = gram[..., pick[:, None], pick]
        chosen[inside] = torch.eye(len(pick), dtype=torch.float64)
        beta = _ridge_coefficients(chosen, moment[..., pick], fitted)
        residuals.append(own_moment[None, :, 0] - (beta * gram_of[None, :, 0, pick[1:]]).sum(-1))
    return residuals


def _ratio(sums: Tensor) -> Tensor:
    return sums[..., 0] / sums[..., 1]


def proposal_weights(log_prob_origin: Tensor, proposal_log_prob: Tensor | None) -> Tensor | None:
    """b_i = q_θ₀(y_i) / p(y_i), divided by max_i b_i (ratios are scale-free): the SNIS weights
    at θ₀ of sequences drawn from the proposal p. None (every b_i = 1) when E came from q_θ₀.

    A sequence outside q_θ₀'s support (S_i(θ₀) = −inf) gets weight 0.
    """
    if proposal_log_prob is None:
        return None
    log_b = _f64(log_prob_origin) - _f64(proposal_log_prob)
    if not bool(torch.isfinite(log_b.max())):
        raise ValueError("no sequence of E has positive probability under the policy (every q_θ₀(y_i)/p(y_i) is 0 "
                         "or undefined): E was not drawn with the probe's sampling settings or tokens")
    return torch.exp(log_b - log_b.max())


def weighted(columns: Tensor, base: Tensor | None) -> Tensor:
    """Per-sequence columns [N, K] times b_i (0 where b_i = 0, even against an infinite term)."""
    if base is None:
        return columns
    b = _f64(base)[:, None]
    return torch.where(b > 0, b * columns, 0.0)


def ess_fraction(weights: Tensor | None) -> float:
    """(Σ w)² / Σ w² / N: 1 when all weights are equal (and when ``weights`` is None)."""
    if weights is None:
        return 1.0
    w = _f64(weights)
    return float(w.sum() ** 2 / (w.square().sum() * w.numel()))


def entropy_at_origin(integrand: Tensor, norm: Tensor, group: Tensor, base: Tensor | None = None,
                      controls: Tensor | None = None) -> Jackknifed:
    """Ĥ(θ₀) = Σ b_i f_i / Σ b_i c_i (b_i = 1 when E came from q_θ₀), with the step-free controls
    (``STEP_FREE_CONTROLS``) when ``controls`` are given."""
    columns = weighted(torch.stack([_f64(integrand), _f64(norm)], 1), base)
    step_free = [] if controls is None else [j for j in STEP_FREE_CONTROLS if j < controls.shape[1]]
    if not step_free:
        return jackknifed(columns, group, _ratio)
    return jackknifed(columns, group, _ratio, _controls(controls[:, step_free], base),
                      families=(range(len(step_free)),))


def _controls(controls: Tensor | None, base: Tensor | None) -> Tensor | None:
    """The features u_i times b_i: mean 0 under the proposal when u_i has mean 0 under q_θ₀."""
    return None if controls is None else weighted(_f64(controls), base)


def snis_weights(log_prob: Tensor, log_prob_reference: Tensor) -> Tensor:
    """w_i = exp(S_i(θ) − log r(y_i)), divided by max_i w_i (the SNIS ratio is scale-free), with
    r the distribution E was drawn from: q_θ₀ (``log_prob_reference`` = S_i(θ₀)) or a proposal p.

    A sequence whose sampled token left the support (S_i(θ) = −inf) gets weight 0.
    """
    log_w = _f64(log_prob) - _f64(log_prob_reference)
    return torch.exp(log_w - log_w.max())


@dataclass(frozen=True)
class ShiftTerms:
    """Ĥ(θ₀ + sΔθ), the measured ΔH (with its leave-outs, for paired differences), and the ESS fraction."""

    after: float
    shift: Jackknifed
    ess_fraction: float

    @property
    def delta(self) -> float:
        return self.shift.value

    @property
    def delta_se(self) -> float:
        return self.shift.se


def _delta(sums: Tensor) -> Tensor:
    # columns of shift_columns: 0 w·f(θ_s), 1 w·c, 2 f(θ₀), 3 c
    return sums[..., 0] / sums[..., 1] - sums[..., 2] / sums[..., 3]


def shift_columns(weights: Tensor, integrand: Tensor, integrand_origin: Tensor, norm: Tensor,
                  base: Tensor | None = None) -> Tensor:
    """Per-sequence columns [w f(θ_s), w c, b f(θ₀), b c] whose sums give ΔH(s) (``_delta``);
    w_i the SNIS weights at θ_s, b_i those at θ₀ (``proposal_weights``; 1 without a proposal)."""
    w = _f64(weights)
    # 0·∞ guard: a sequence with weight 0 contributes nothing even if f_i(θ) is infinite.
    weighted_f = torch.where(w > 0, w * _f64(integrand), 0.0)
    at_origin = weighted(torch.stack([_f64(integrand_origin), _f64(norm)], 1), base)
    return torch.cat([torch.stack([weighted_f, w * _f64(norm)], 1), at_origin], 1)


def measured_shift(weights: Tensor, integrand: Tensor, integrand_origin: Tensor, norm: Tensor,
                   group: Tensor, base: Tensor | None = None, controls: Tensor | None = None,
                   entropy_before: float | None = None) -> ShiftTerms:
    """ΔH(s) = Σ w f(θ_s) / Σ w c − Σ b f(θ₀) / Σ b c, with ESS = (Σw)² / Σw² / N.

    With ``controls`` ΔH(s) is corrected by its control variates where they help, and
    Ĥ(θ₀ + sΔθ) is ``entropy_before`` (Ĥ(θ₀) as reported, corrected by its own where they help)
    plus ΔH(s), so that after − before = ΔH holds whichever of the two took controls.
    """
    columns = shift_columns(weights, integrand, integrand_origin, norm, base)
    shift = jackknifed(columns, group, _delta, _controls(controls, base))
    after = float(_ratio(columns.sum(0)))
    if controls is not None:  # Ĥ(θ₀) and ΔH(s) each take controls or not on their own evidence
        if entropy_before is None:
            entropy_before = entropy_at_origin(integrand_origin, norm, group, base, controls).value
        after = entropy_before + shift.value
    return ShiftTerms(after, shift, ess_fraction(weights))


def rounding_floor(integrand: Tensor, norm: Tensor, log_prob_error: Tensor, integrand_error: Tensor,
                   base: Tensor | None = None) -> float:
    """Estimated rounding error of a measured ΔH, from the rounding errors e_S,i and e_f,i of
    S_i and f_i at one point (estimated by re-running that pass in another precision).

    To first order an error at one point moves Ĥ by Σ_i r_i with
    r_i = [e_f,i + (f_i − Ĥ c_i) e_S,i] / C. ΔH differences two points whose roundings are not
    the same, so the floor bounds each point's error by Σ_i |r_i| and adds the two:

        floor = 2 Σ_i |r_i| .

    With a proposal, r_i = b_i [e_f,i + (f_i − Ĥ c_i) e_S,i] / Σ b c (S_i(θ₀) then enters b_i).

    Errors known for n of the N sequences only (NaN elsewhere: the partner pass re-ran a
    subset) estimate the sum as (N / n) Σ_{i known} |r_i|. A sequence outside q_θ₀'s support
    (b_i = 0, its errors −inf − (−inf) = NaN) has r_i = 0 exactly, re-run or not, so N and n
    count the sequences with b_i > 0 only; NaN (unknown) when none of those was re-run.
    """
    f, c = _f64(integrand), _f64(norm)
    b = torch.ones_like(f) if base is None else _f64(base)
    sums = weighted(torch.stack([f, c], 1), base).sum(0)  # b_i f_i is 0, not 0·inf, where b_i = 0
    total, value = sums[1], sums[0] / sums[1]
    error_s, error_f = _f64(log_prob_error), _f64(integrand_error)
    inside = b > 0
    known = inside & ~torch.isnan(error_s)
    if not bool(known.any()):
        return math.nan
    r = b[known] * (error_f[known] + (f[known] - value * c[known]) * error_s[known]) / total
    return float(2 * r.abs().sum() * (int(inside.sum()) / int(known.sum())))


def arithmetic_floor(entropies: Sequence[float], num_tokens: int, vocab_size: int) -> float:
    """The rounding of forming each Ĥ itself in float64, which no partner pass sees (both take
    the vocabulary side in float64), summed over the points a ΔH differences.

    Ĥ sums T token entropies, each a sum of V terms −q log q ≥ 0; cascade summation rounds a
    sum of n terms of one sign by at most u log₂ n of it, so each Ĥ is off by at most
    u₆₄ (log₂(V T) + 4) |Ĥ| (the 4: exp, log, the ratio, the difference):

        floor_arith = u₆₄ (log₂(V T) + 4) Σ_points |Ĥ| .

    Measured: two float64 evaluations of one ΔH on different attention kernels differed by
    9e-16 (1 ulp of Ĥ ≈ 4.2), where the partner-pass floor alone claimed 5e-19.
    """
    depth = math.log2(max(2, vocab_size) * max(1, num_tokens)) + 4
    return float(torch.finfo(torch.float64).eps / 2 * depth * sum(abs(h) for h in entropies))


@dataclass(frozen=True)
class TaylorTerms:
    """g(0), g′(0), g″(0) and g′ + ½ g″ along Δθ, each with its leave-outs, and per-sequence
    contributions to g′(0)."""

    entropy: Jackknifed
    linear: Jackknifed
    per_sequence_linear: Tensor  # a_i, Σ a_i = g′(0) as reported (control corrections included)
    curvature: Jackknifed | None = None
    quadratic: Jackknifed | None = None

    @property
    def best(self) -> Jackknifed:
        """The best prediction of ΔH(1): quadratic when there are second derivatives, else linear."""
        return self.linear if self.quadratic is None else self.quadratic


def _linear(sums: Tensor) -> Tensor:
    # columns: 0 f, 1 c, 2 f', 3 f·S', 4 c·S'
    g = sums[..., 0] / sums[..., 1]
    return (sums[..., 2] + sums[..., 3] - g * sums[..., 4]) / sums[..., 1]


def _curvature(sums: Tensor) -> Tensor:
    # columns 0-4 as in _linear; 5 f·S'', 6 c·S'', 7 f'', 8 f·S'², 9 c·S'², 10 S'·f'
    g = sums[..., 0] / sums[..., 1]
    slope = _linear(sums)
    numerator = (sums[..., 5] - g * sums[..., 6] + sums[..., 7] + sums[..., 8] - g * sums[..., 9]
                 + 2 * sums[..., 10] - 2 * slope * sums[..., 4])
    return numerator / sums[..., 1]


def taylor_terms(integrand: Tensor, norm: Tensor, d_log_prob: Tensor, d_integrand: Tensor, group: Tensor,
                 d2_log_prob: Tensor | None = None, d2_integrand: Tensor | None = None,
                 base: Tensor | None = None, controls: Tensor | None = None) -> TaylorTerms:
    """g(0), g′(0) (and g″(0) when second derivatives are given), per the module formulas; each
    corrected by its control variates when ``controls`` are given.

    Per-sequence linear contributions: a_i = b_i [f'_i + (f_i − g c_i) S'_i] / Σ b c, minus
    sequence i's control correction β_(−g(i))·u_i when controls apply.
    """
    f, c, ds, df = _f64(integrand), _f64(norm), _f64(d_log_prob), _f64(d_integrand)
    u = _controls(controls, base)
    first = weighted(torch.stack([f, c, df, f * ds, c * ds], 1), base)
    sums = first.sum(0)
    g = float(_ratio(sums))
    per_sequence = weighted(((df + (f - g * c) * ds) / sums[1])[:, None], base)[:, 0]
    linear = jackknifed(first, group, _linear, u)
    if linear.correction is not None:
        per_sequence = per_sequence - linear.correction
    terms = dict(entropy=entropy_at_origin(f, c, group, base, controls), linear=linear,
                 per_sequence_linear=per_sequence)
    if d2_log_prob is None:
        return TaylorTerms(**terms)
    d2s, d2f = _f64(d2_log_prob), _f64(d2_integrand)
    extra = weighted(torch.stack([f * d2s, c * d2s, d2f, f * ds**2, c * ds**2, ds * df], 1), base)
    curvature = jackknifed(torch.cat([first, extra], 1), group, _curvature, u)
    return TaylorTerms(**terms, curvature=curvature, quadratic=linear + curvature.scaled(0.5))
