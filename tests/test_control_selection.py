"""Choosing the control-variate features must not bias the controlled estimate
(estimators.control_corrections, docs/method.md §5).

A policy small enough to enumerate: every prompt has its own next-token logits at each prefix
(vocabulary 3, token 2 is EOS, at most 3 tokens), so its entropy is known exactly. At 8 groups
of 4 responses, where whether the features help is a close call in many draws, the controlled Ĥ
must agree with the plain one on average. With group g's own residual in the choice of its
features, as first built, the controlled Ĥ ran 6 Monte Carlo standard errors below the plain one.
"""

from __future__ import annotations

import itertools

import torch

from entropy_callbacks.estimators import entropy_at_origin, normaliser

VOCAB, LENGTH, EOS = 3, 3, 2
PREFIXES = [()] + [p for n in range(1, LENGTH) for p in itertools.product(range(VOCAB), repeat=n) if EOS not in p]


def responses() -> list[tuple[int, ...]]:
    out = []

    def grow(prefix):
        for token in range(VOCAB):
            y = prefix + (token,)
            out.append(y) if token == EOS or len(y) == LENGTH else grow(y)

    grow(())
    return out


def sequence_terms(logits: torch.Tensor):
    """Per prompt (rows of ``logits`` [P, prefixes, V]) and response: log q(y), the naive
    integrand −log q(y), the token count, and the step-free control features of
    scoring.score_controls (columns 3–6; the step-dependent ones are 0 here)."""
    ys = responses()
    index = {p: i for i, p in enumerate(PREFIXES)}
    at = torch.tensor([[index[y[:k]] for k in range(len(y))] + [0] * (LENGTH - len(y)) for y in ys])
    token = torch.tensor([list(y) + [0] * (LENGTH - len(y)) for y in ys])
    mask = torch.tensor([[1.0] * len(y) + [0.0] * (LENGTH - len(y)) for y in ys], dtype=torch.float64)
    log_q = logits.log_softmax(-1)
    entropy = -(log_q.exp() * log_q).sum(-1)  # [P, prefixes]
    lq, h = log_q[:, at, token] * mask, entropy[:, at] * mask  # [P, responses, LENGTH]
    e = (lq + h) * mask  # mean 0 given the prefix
    past = torch.cat([torch.zeros_like(lq[..., :1]), (-lq).cumsum(-1)[..., :-1]], -1)
    n = torch.arange(1, LENGTH + 1, dtype=torch.float64) * mask
    zero = torch.zeros_like(e.sum(-1))
    features = torch.stack([zero, zero, zero, e.sum(-1), (past * e).sum(-1), (n * e).sum(-1), (h * e).sum(-1), zero], -1)
    return lq.sum(-1), -lq.sum(-1), mask.sum(-1), features


def test_choosing_the_features_adds_no_bias():
    gen = torch.Generator().manual_seed(3)
    pool, groups, per_group, draws = 40, 8, 4, 3000
    logits = 1.5 * torch.randn(pool, len(PREFIXES), VOCAB, generator=gen, dtype=torch.float64)
    log_prob, integrand, tokens, features = sequence_terms(logits)
    group = torch.arange(groups).repeat_interleave(per_group)
    difference, used = [], 0
    for _ in range(draws):
        prompt = torch.randint(0, pool, (groups,), generator=gen).repeat_interleave(per_group)
        y = torch.multinomial(log_prob[prompt].exp(), 1, generator=gen)[:, 0]
        f, c = integrand[prompt, y], normaliser(tokens[y], "sequence")
        controlled = entropy_at_origin(f, c, group, controls=features[prompt, y])
        difference.append(controlled.value - entropy_at_origin(f, c, group).value)
        used += controlled.controlled
    d = torch.tensor(difference)
    z = float(d.mean() / (d.std() / draws ** 0.5))
    assert used > draws // 2  # the controls are in play
    assert abs(z) < 3.5, z
