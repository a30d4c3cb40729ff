"""Teacher-forced scoring of E at any θ, functional in the parameters.

For every sequence i of a (micro)batch this computes, at the θ given by a parameter mapping,

    S_i(θ) = Σ_k log q_θ(y_ik)              (sum over counted response tokens)
    f_i(θ) = Σ_k H(q_θ,ik)  ("rb")  or  −S_i(θ)  ("naive")

in float64, and their first (and second) derivatives in s along θ₀ + sΔθ by forward-mode AD
(Taylor-mode jets, ``taylor``: dual numbers at order 1); at θ₀ a derivative pass also
gives the score features of known mean 0 that serve as control variates (``score_controls``). Parameters are placed layer
by layer in the pass's compute dtype (``layerwise``); the model's own are never touched.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import jvp

from .attention import probe_attention
from .distribution import entropy, mass_outside, sampling_log_probs
from .forward_mode import forward_ad_ready, nested_jvp_ready
from .layerwise import parameters_at
from .model_guard import forward_kwargs, hf_model, left_padded_positions
from .params import StepPoint
from .sampling import ProbeBatch
from .taylor import Jet, coefficients, degree


@dataclass
class SequenceValues:
    """S_i and f_i at one θ, plus what a value pass can add (float64, one entry per sequence)."""

    log_prob: Tensor
    integrand: Tensor
    outside_mass: Tensor | None = None  # Σ_k mass of q_θ,ik outside θ₀'s support
    support: Tensor | None = None  # [n, M, V] support used (θ₀ passes only, for later scales)


@dataclass
class SequenceDerivatives:
    """S_i, f_i at θ₀ and their directional derivatives D S_i, D f_i (and D² when order 2)."""

    log_prob: Tensor
    integrand: Tensor
    d_log_prob: Tensor
    d_integrand: Tensor
    d2_log_prob: Tensor | None = None
    d2_integrand: Tensor | None = None
    controls: Tensor | None = None  # [n, J] score features of known mean 0 (``score_controls``)


def score_controls(token_log_prob: Tensor, token_integrand: Tensor, d_token_log_prob: Tensor,
                   d_token_integrand: Tensor, counted: Tensor, estimator: str) -> Tensor:
    r"""Per-sequence features u_i of known mean 0 under y ~ q_θ₀(·|x), for every prompt x
    (docs/method.md §5, Control variates), from per-position terms at θ₀ (zero where not counted).

    Each feature is Σ_t m_t e_t: an innovation e_t, a function of the sampled token y_t whose
    mean given the prefix y_<t is 0, times a multiplier m_t fixed by the prefix — so each term,
    and the sum, has mean 0. The innovations:

        s'_t = D log q_θ(y_t | y_<t)[Δθ]     (mean 0: D Σ_v q(v) = 0 on a fixed support)
        e_t  = log q(y_t | y_<t) + H_t        (mean 0: E[log q(y_t)] = −H_t)

    and the features, in two families (columns as ``estimators.CONTROL_FAMILIES``):

        score      Σ s'_t,  Σ P_t s'_t,  Σ n_t s'_t
        surprisal  Σ e_t,   Σ P_t e_t,   Σ n_t e_t,  Σ H_t e_t,  Σ H'_t e_t      ("rb" only: e_t needs H_t)

    with P_t the integrand over the positions y_t cannot influence (Σ_{τ≤t} H_τ for "rb",
    Σ_{τ<t} −log q(y_τ) for "naive"), n_t the counted positions up to t, H'_t = D H_t[Δθ].
    """
    counted = counted.to(torch.float64)
    score = d_token_log_prob.double() * counted
    h = token_integrand.double() * counted
    past = h.cumsum(-1) if estimator == "rb" else h.cumsum(-1) - h
    position = counted.cumsum(-1)
    features = [score.sum(-1), (past * score).sum(-1), (position * score).sum(-1)]
    if estimator == "rb":
        surprisal = (token_log_prob.double() + h) * counted
        slope = d_token_integrand.double() * counted
        features += [surprisal.sum(-1)] + [(m * surprisal).sum(-1) for m in (past, position, h, slope)]
    return torch.stack(features, -1)


@contextlib.contextmanager
def _response_logits(model: torch.nn.Module, batch: ProbeBatch, point: StepPoint
                     ) -> Iterator[Callable[[slice], Tensor]]:
    """Yields logits_for(cols): the logits predicting response columns ``cols`` (of P..L-1),
    [n, len(cols), V], with the model at θ = ``point``.

    Where the model's logits are its LM head applied to its decoder's last hidden state
    (``_separable_head``), the decoder runs once and the head runs per chunk of positions, with
    its parameters placed once: no [n, M, V] tensor exists, in any stream of a jet. Otherwise
    the model's own forward computes every position's logits at once."""
    steps = batch.input_ids.shape[1] - batch.prompt_length
    position_ids = left_padded_positions(batch.attention_mask)
    parts = _separable_head(model, batch)
    with parameters_at(model, point) as placement:
        if parts is None:
            kwargs = forward_kwargs(model, batch.input_ids, batch.attention_mask, position_ids, keep_last=steps + 1)
            # Either the last steps+1 positions (logits_to_keep) or all of them: align on the end.
            logits = model(**kwargs, use_cache=False).logits[:, -(steps + 1):-1]
            yield lambda cols: logits[:, cols]
            return
        decoder, head = parts
        hidden = decoder(**forward_kwargs(decoder, batch.input_ids, batch.attention_mask, position_ids),
                         use_cache=False).last_hidden_state[:, -(steps + 1):-1]
        with placement.held(head):
            # contiguous: a strided [n, cols, h] slice would run the head as n skinny products (bmm)
            # instead of one over n·cols rows (half the speed on an H200)
            yield lambda cols: head(hidden[:, cols].contiguous())


_separable: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (decoder, head, separable)


def _separable_head(model: torch.nn.Module, batch: ProbeBatch):
    """(decoder, LM head) when the model's logits are exactly head(decoder(x).last_hidden_state)
    — checked on the first sequence of E, bitwise, once per model and again whenever its decoder
    or head module is replaced (a LoRA injected into lm_head, resized embeddings) — else None (a
    model that scales or caps its logits after the head keeps its own forward)."""
    inner = hf_model(model)
    get_decoder = getattr(inner, "get_decoder", None)
    decoder, head = (get_decoder() if callable(get_decoder) else None), model.get_output_embeddings()
    cached = _separable.get(model)
    if cached is None or cached[0] is not decoder or cached[1] is not head:
        separable = False
        if decoder is not None and head is not None and decoder is not inner:
            ids, mask = batch.input_ids[:1], batch.attention_mask[:1]
            positions = left_padded_positions(mask)
            with torch.no_grad():
                try:
                    own = model(**forward_kwargs(model, ids, mask, positions), use_cache=False).logits
                    split = head(decoder(**forward_kwargs(decoder, ids, mask, positions),
                                         use_cache=False).last_hidden_state)
                    separable = own.shape == split.shape and torch.equal(own, split)
                except (TypeError, AttributeError, ValueError):  # a decoder with another interface
                    pass
        cached = _separable[model] = (decoder, head, separable)
    return (decoder, head) if cached[2] else None


def _position_terms(model, batch: ProbeBatch, point: StepPoint, estimator: str, *,
                    at_origin: bool, reference_support: Tensor | None = None, keep_support: bool = False,
                    vocab_float64: bool = False):
    """Per-position log q(y_t) and integrand (H_t or −log q(y_t)), zero where not counted, [n, M]
    (and the support/outside-mass extras of a value pass)."""
    targets = batch.input_ids[:, batch.prompt_length:]
    counted = batch.response_mask[:, batch.prompt_length:]
    # At θ₀ a token our sampler drew is in the support by construction; forcing it in guards
    # against a tie at the top-k/top-p boundary resolved differently by the sampler's numerics.
    # A proposal's token outside the support is not forced: its weight q_θ₀/p is then 0.
    force = targets if at_origin and batch.proposal_log_probs is None else None
    columns = []
    with _response_logits(model, batch, point) as logits_for:
        for cols in _position_chunks(len(batch), targets.shape[1], vocab_size(model), targets.device):
            chunk = logits_for(cols)
            if vocab_float64:
                chunk = chunk.to(torch.float64)
            log_q, support = sampling_log_probs(chunk, batch.config, force=None if force is None else force[:, cols])
            token_log_prob = log_q.gather(-1, targets[:, cols, None]).squeeze(-1)
            token_integrand = entropy(log_q, support) if estimator == "rb" else -token_log_prob
            outside = (None if reference_support is None
                       else mass_outside(log_q.detach(), reference_support[:, cols]))
            columns.append((token_log_prob, token_integrand, outside, support if keep_support else None))
    joined = [None if parts[0] is None else torch.cat(parts, 1) for parts in zip(*columns)]
    token_log_prob, token_integrand = (t.masked_fill(~counted, 0.0) for t in joined[:2])
    outside = None if joined[2] is None else joined[2].masked_fill(~counted, 0.0).double().sum(-1)
    return token_log_prob, token_integrand, outside, joined[3]


# The LM head and the vocabulary-side work run over response positions in chunks of at most
# this many [position, vocabulary] entries, so that the logits and their temporaries (the
# float64 copy, log q, q, q·log q, in every stream of a jet) stay near one chunk each instead of
# several copies of [n, M, V] (docs/method.md §9). On a GPU a chunk is 8× larger: at Qwen's
# vocabulary 2^24 entries are ~100 rows, too few for the head's product to run at speed.
VOCAB_CHUNK = 1 << 24
VOCAB_CHUNK_GPU = 1 << 27


def vocab_size(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(hf_model(model).config.vocab_size)


def _position_chunks(n: int, positions: int, vocab: int, device: torch.device = torch.device("cpu")) -> list[slice]:
    budget = VOCAB_CHUNK if device.type == "cpu" else VOCAB_CHUNK_GPU
    step = max(1, budget // max(1, n * vocab))
    return [slice(start, min(start + step, positions)) for start in range(0, positions, step)]


def _sums(*per_position: Tensor) -> list[Tensor]:
    return [t.double().sum(-1) for t in per_position]


@torch.no_grad()
def score_values(model, batch: ProbeBatch, point: StepPoint, estimator: str, *,
                 at_origin: bool, reference_support: Tensor | None = None,
                 keep_support: bool = False) -> SequenceValues:
    """A plain forward at θ = ``point``.

    Under a precision policy (``point.dtype`` set) the vocabulary side — log-softmax, entropy —
    runs in float64: in float32 its rounding was most of a float32 value pass's error (on Qwen2,
    f_i off by 2e-6 against 7e-9 from the network), at a small share of its cost. Derivative
    passes need no such care: they difference nothing.

    Attention: under a precision policy the pass keeps SDPA's fused kernel where that is exact
    (``attention.fused_sdpa_is_exact``: on a CPU), since nothing here is differentiated. In the
    model's own dtypes a derivative pass's θ₀ values may stand in for this pass
    (``engine.measurement_terms``), so it runs ``grouped_attention`` as they do: one function.
    """
    with probe_attention(model, differentiated=point.dtype is None):
        token_log_prob, token_integrand, outside, support = _position_terms(
            model, batch, point, estimator, at_origin=at_origin,
            reference_support=reference_support, keep_support=keep_support, vocab_float64=point.dtype is not None)
    return SequenceValues(*_sums(token_log_prob, token_integrand), outside, support)


def _taylor(terms, point: StepPoint, delta: Mapping[str, Tensor], tangent) -> list[Tensor]:
    """S, f, their first and their second derivatives (zero above ``taylor.degree``) in one
    Taylor-mode pass (``taylor``): each moving parameter enters as the jet (θ₀ + sΔθ, Δθ, 0)."""

    def jet(name: str, param: torch.nn.Parameter) -> Tensor:
        value = point(name, param)
        return Jet(value, tangent(name, value)) if name in delta else value

    log_prob, integrand = terms(jet)
    (s0, s1, s2), (f0, f1, f2) = coefficients(log_prob), coefficients(integrand)
    zero = torch.zeros_like(s0)
    return [s0, f0, zero if s1 is None else s1, zero if f1 is None else f1,
            zero if s2 is None else s2, zero if f2 is None else f2]


_warned_fallback: set[tuple[str, int]] = set()
_jets = True  # derivative passes on Taylor-mode jets (``torch_forward_ad`` turns them off)


@contextlib.contextmanager
def torch_forward_ad() -> Iterator[None]:
    """Inside, derivative passes run on torch's own forward AD (dual tensors at order 1, nested
    ``torch.func.jvp`` at order 2) instead of jets: the same numbers to rounding, at nested JVP's
    cost for order 2. For comparing the two (``benchmarks/engine.py --compare-engines``), and as
    an escape hatch should a model run into trouble on jets."""
    global _jets
    previous, _jets = _jets, False
    try:
        yield
    finally:
        _jets = previous


def _warn_fallback(reason: str, order: int) -> None:
    if (reason, order) not in _warned_fallback:
        _warned_fallback.add((reason, order))
        how = ("nested forward-mode JVPs for order 2 (same numbers, about twice the cost)" if order == 2
               else "torch's forward-mode dual tensors for order 1 (same numbers, a little slower on CPU)")
        warnings.warn(f"{reason}. Falling back to {how}.", RuntimeWarning, stacklevel=4)


def score_derivatives(model, batch: ProbeBatch, base: Mapping[str, Tensor], delta: Mapping[str, Tensor],
                      dtype: torch.dtype | None, estimator: str, order: int, at: float = 0.0) -> SequenceDerivatives:
    """S, f at θ = θ₀ + at·Δθ and their first (order 1) or first and second (order 2)
    directional derivatives along Δθ there, computed in ``dtype``.

    The tangent Δθ enters in the compute dtype (in a parameter's own only when ``dtype`` is None).
    Each moving parameter becomes a Taylor-mode jet (``taylor``; a dual number at order 1) when its
    layer runs (``layerwise``). A model with an operation that has no Taylor rule falls back, with
    a warning, to torch's dual tensors (order 1) or nested ``torch.func.jvp`` over the moving
    parameters (order 2), which then exist in the compute dtype all at once.
    """
    point = StepPoint(base, delta, float(at), dtype)
    params = dict(model.named_parameters())

    counted = batch.response_mask[:, batch.prompt_length:]

    def terms(value_of) -> tuple[Tensor, Tensor]:
        token_log_prob, token_integrand, _, _ = _position_terms(model, batch, value_of, estimator,
                                                                at_origin=at == 0.0)
        return token_log_prob, token_integrand

    def result(log_prob, integrand, d_log_prob, d_integrand, *second) -> SequenceDerivatives:
        # Controls are exact-mean-0 only where E was drawn: at θ₀.
        controls = (score_controls(log_prob, integrand, d_log_prob, d_integrand, counted, estimator)
                    if at == 0.0 else None)
        return SequenceDerivatives(*_sums(log_prob, integrand, d_log_prob, d_integrand, *second), controls=controls)

    def moving_or_point(moving: Mapping[str, Tensor]):
        return lambda name, param: moving[name] if name in moving else point(name, param)

    def tangent(name: str, like: Tensor) -> Tensor:
        return delta[name].detach().to(like.device, like.dtype)

    with forward_ad_ready(model):
        if _jets:
            try:
                with degree(order):
                    per_position = _taylor(terms, point, delta, tangent)
                return result(*per_position[:2 + 2 * order])
            except NotImplementedError as error:  # an operation without a Taylor rule: torch's forward AD
                _warn_fallback(str(error), order)
        if order == 1:
            def dual(name: str, param: torch.nn.Parameter) -> Tensor:
                value = point(name, param)
                return fwAD.make_dual(value, tangent(name, value)) if name in delta else value

            with fwAD.dual_level():
                log_prob, integrand = (fwAD.unpack_dual(t) for t in terms(dual))
            return result(log_prob.primal, integrand.primal, log_prob.tangent, integrand.tangent)

        primal = {n: point(n, params[n]) for n in delta}
        direction = {n: tangent(n, primal[n]) for n in delta}

        def with_first(moving: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            values, firsts = jvp(lambda inner: terms(moving_or_point(inner)), (moving,), (direction,))
            return (*values, *firsts)

        with nested_jvp_ready():
            values, tangents = jvp(with_first, (primal,), (direction,))
    return result(*(v.detach() for v in values), tangents[2].detach(), tangents[3].detach())
