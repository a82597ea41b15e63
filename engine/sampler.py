"""Next-token sampling for a batch of rows with per-row parameters (torch, any device).

Filtering is vectorised over the batch: temperature, top-k, top-p and min-p are per-row
tensors. Top-k/top-p look at the best few hundred tokens (``topk``) instead of sorting the
whole vocabulary, and sort only the rows whose nucleus is larger; rows using neither
skip it. The draw is an inverse-CDF lookup with one uniform number per row: a seeded row
takes its number from its own generator and its CDF depends on its own logits only, so
its tokens do not depend on the batch it runs in or on the other rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams
from engine.sequence import TokenLogprobs

# Top-p first looks at this many best tokens (a cheap topk); a row whose nucleus is larger
# is sorted in full. Both paths keep exactly the same tokens.
_TOP_P_CANDIDATES = 256
_NEG_INF = float("-inf")


@dataclass
class SamplerOutput:
    """One sampled token per row and, for rows that asked, its logprobs."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed``; None when there is no seed."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def skip_draws(gen: torch.Generator, num_tokens: int) -> None:
    """Advances ``gen`` past the draws of ``num_tokens`` sampled tokens (one U[0, 1)
    number each, as ``Sampler._uniforms`` takes them), one by one: a batched draw need
    not consume the generator the same way."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    for _ in range(num_tokens):
        torch.rand(1, generator=gen, device=gen.device)


class Sampler:
    """Picks the next token of each row of a ``[B, V]`` float logits tensor.

    Greedy rows (temperature 0) take the argmax. Other rows divide by their temperature,
    keep the top-k tokens, then the smallest set whose probability reaches top-p (after
    top-k, renormalised), then drop tokens under ``min_p`` times the top probability, and
    sample from the rest. Rows without a generator share the sampler's own generator
    (``seed`` seeds it). Logprobs are ``log_softmax`` of the raw logits, before
    temperature and filters.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._default: torch.Generator | None = None

    def _default_generator(self, device: torch.device) -> torch.Generator:
        if self._default is None or self._default.device != device:
            self._default = torch.Generator(device=device)
            if self._seed is None:
                self._default.seed()
            else:
                self._default.manual_seed(self._seed)
        return self._default

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> SamplerOutput:
        """Sample one token per row; ValueError when shapes or lengths disagree."""
        _validate(logits, params, generators)
        logits = logits.float()
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if len(sampled) < len(params) / 2:
            tokens = logits.argmax(dim=-1)  # cheaper than indexing the greedy rows
        else:
            tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
            greedy = [i for i, p in enumerate(params) if p.greedy]
            if greedy:
                rows = _index(greedy, logits.device)
                tokens[rows] = logits[rows].argmax(dim=-1)
        if sampled:
            index = _index(sampled, logits.device)
            sub = [params[i] for i in sampled]
            x = logits if len(sampled) == len(params) else logits[index]
            x = _filter(x / _column([p.temperature for p in sub], x), sub)
            # Unnormalised probabilities are enough for an inverse-CDF draw (saves a pass).
            weights = x.sub_(x.amax(dim=-1, keepdim=True)).exp_()
            u = self._uniforms([generators[i] for i in sampled], logits.device)
            tokens[index] = _inverse_cdf(weights, u)
        token_list = [int(t) for t in tokens.tolist()]
        return SamplerOutput(token_list, _logprobs(logits, tokens, token_list, params))

    def _uniforms(
        self, generators: Sequence[torch.Generator | None], device: torch.device
    ) -> torch.Tensor:
        """One U[0, 1) number per row, from the row's own generator when it has one."""
        u = torch.empty(len(generators), device=device)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            shared = self._default_generator(device)
            u[_index(unseeded, device)] = torch.rand(len(unseeded), generator=shared, device=device)
        seeded = [(i, g) for i, g in enumerate(generators) if g is not None]
        if seeded:
            own = [torch.rand(1, generator=g, device=device) for _, g in seeded]
            u[_index([i for i, _ in seeded], device)] = torch.cat(own)
        return u


def _validate(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    batch = logits.shape[0]
    if len(params) != batch or len(generators) != batch:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} has {batch} rows but got "
            f"{len(params)} params and {len(generators)} generators"
        )
    if logits.shape[1] == 0:
        raise ValueError(f"logits has an empty vocab dimension: shape {tuple(logits.shape)}")


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index of the first token whose cumulative weight exceeds ``u`` times the row total.

    Tokens of weight 0 are never chosen: the CDF is flat over them (adding 0 is exact)
    and the target stays strictly below the total.
    """
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(u.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return tokens.clamp_(max=weights.shape[1] - 1)


def _filter(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Set to -inf the logits that top-k, top-p and min-p drop (x is modified in place)."""
    vocab = x.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]  # 0: off
    rows = [i for i, p in enumerate(params) if top_k[i] or p.top_p < 1.0]
    if len(rows) == len(params):
        x = _top_k_top_p(x, top_k, [p.top_p for p in params])
    elif rows:
        index = _index(rows, x.device)
        x[index] = _top_k_top_p(x[index], [top_k[i] for i in rows], [params[i].top_p for i in rows])
    if any(p.min_p > 0.0 for p in params):
        # p < min_p * p_max  <=>  logit < max_logit + log(min_p); log(0) = -inf keeps all.
        log_min_p = [math.log(p.min_p) if p.min_p > 0.0 else _NEG_INF for p in params]
        threshold = x.amax(dim=-1, keepdim=True) + _column(log_min_p, x)
        x = x.masked_fill_(x < threshold, _NEG_INF)
    return x


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """x with -inf where top-k (0: off) and then top-p drop tokens.

    Looks at the best ``width`` tokens (``topk``), then 16 times more for the rows whose
    nucleus goes past them, then sorts what is left in full. Each stage keeps its prefix
    with the same ops on the same values, so a row's result does not depend on the stage
    that finished it (nor on the other rows).
    """
    vocab = x.shape[1]
    first = max(max(top_k), _TOP_P_CANDIDATES if any(p < 1.0 for p in top_p) else 1)
    out = torch.full_like(x, _NEG_INF)
    rows = list(range(x.shape[0]))
    for width in sorted({min(vocab, first), min(vocab, 16 * first), vocab}):
        index = _index(rows, x.device)
        sub = x if len(rows) == x.shape[0] else x[index]
        if width < vocab:
            values, order = sub.topk(width, dim=-1)  # sorted, descending
        else:
            values, order = sub.sort(dim=-1, descending=True)
        keep, more = _keep_mask(sub, values, [top_k[i] for i in rows], [top_p[i] for i in rows])
        values = values.masked_fill_(~keep, _NEG_INF)
        out[index] = torch.full_like(sub, _NEG_INF).scatter_(1, order, values)
        rows = [rows[j] for j in more]
        if not rows:
            break
    return out


def _keep_mask(
    x: torch.Tensor, values: torch.Tensor, top_k: list[int], top_p: list[float]
) -> tuple[torch.Tensor, list[int]]:
    """Which of the sorted ``values`` survive; also the rows whose nucleus may continue."""
    width = values.shape[1]
    ranks = torch.arange(width, device=x.device).unsqueeze(0)
    k = torch.tensor([kk if kk else width for kk in top_k], device=x.device).unsqueeze(1)
    keep = ranks < k
    if all(p >= 1.0 for p in top_p):
        return keep, []
    probs = (values - x.logsumexp(dim=-1, keepdim=True)).exp_().masked_fill_(~keep, 0.0)
    cum = probs.cumsum(dim=-1)
    # Top-p applies to the top-k set renormalised; without top-k the row's mass is 1.
    has_k = torch.tensor([kk > 0 for kk in top_k], device=x.device).unsqueeze(1)
    mass = torch.where(has_k, cum.gather(1, k - 1), torch.ones_like(cum[:, :1]))
    # Drop a token once the tokens before it reach top_p (the first is always kept);
    # top_p == 1 drops nothing even where rounding lets the sum reach 1.
    limit = _column([p if p < 1.0 else math.inf for p in top_p], cum)
    keep &= (cum - probs) / mass < limit
    more = (~has_k) & (limit < math.inf) & (cum[:, -1:] / mass < limit)
    return keep, [int(i) for i in more.squeeze(1).nonzero().flatten().tolist()]


def _logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    token_list: list[int],
    params: Sequence[SamplingParams],
) -> list[TokenLogprobs | None]:
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    result: list[TokenLogprobs | None] = [None] * len(params)
    if not wanted:
        return result
    rows = _index(wanted, logits.device)
    logp = torch.log_softmax(logits[rows], dim=-1)
    chosen = logp.gather(1, tokens[rows].unsqueeze(1)).squeeze(1).tolist()
    n_top = min(max(params[i].logprobs or 0 for i in wanted), logp.shape[1])
    top_vals: list[list[float]] = [[] for _ in wanted]
    top_ids: list[list[int]] = [[] for _ in wanted]
    if n_top:
        values, ids = logp.topk(n_top, dim=-1)
        top_vals, top_ids = values.tolist(), ids.tolist()
    for j, i in enumerate(wanted):
        n = params[i].logprobs or 0
        top = list(zip(top_ids[j][:n], top_vals[j][:n], strict=True))
        result[i] = TokenLogprobs(token_list[i], float(chosen[j]), top)
    return result
