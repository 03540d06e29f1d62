"""Skip-gram / neural language model over People's Daily words: a large categorical.

    G(w, c) = ⟨u_w, h_c⟩ + b_w,    h_c = mean of the context words' embeddings v

A word w given its context c (its neighbour in skip-gram pairs, or the previous words in
language-model pairs). The full-softmax model p(w|c) = e^{G(w,c)} / Σ_{w'} e^{G(w',c)} costs
O(V) per datum; with ``normalised=False`` the model states only the score G(w, c)
(``pyro.factor``), which NCE fits at a cost that does not depend on V:

* binary NCE: G − γ → log p(w|c) (the context copies into the noise, so p(c) cancels);
* ranking NCE / sampled softmax: G → log p(w|c) + a per-context constant;
* negative sampling: G → log p(w|c) − log(ν q(w)) — PMI − log ν for unigram noise.

``normalised=True`` states the exact categorical likelihood (``pyro.sample(..., obs=w)`` of
the full softmax), fitted by maximum likelihood with SVI — the comparison NCE is held to.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints

from jointkl.errors import InputError
from jointkl.settings import check_all, one_of, positive_int
from jointkl.zoo import ZooModel, register_model

__all__ = ["SkipGram", "FullSoftmax", "WordPairs", "word_pairs", "build_vocabulary"]

UNK = "<unk>"
MODES = ("skipgram", "lm")


@dataclass
class WordPairs:
    """(target, context) id pairs and the vocabulary they index.

    :param target: word ids, ``(N,)`` long.
    :param context: context ids, ``(N,)`` (skip-gram) or ``(N, k)`` (the k previous words).
    :param vocab: the words by id; id 0 is ``"<unk>"`` (every word outside the vocabulary).
    """

    target: torch.Tensor
    context: torch.Tensor
    vocab: list[str]


def build_vocabulary(sentences: Sequence[Sequence[str]], size: int) -> list[str]:
    """``"<unk>"`` then the ``size − 1`` most frequent words (ties broken by first use)."""
    size = positive_int(size, "build_vocabulary: size")
    if size < 2:  # "<unk>" and at least one word
        raise InputError(f"build_vocabulary: size must be an int >= 2, got {size!r}")
    counts = Counter(w for s in sentences for w in s)
    return [UNK, *(w for w, _ in counts.most_common(size - 1))]


def word_pairs(
    sentences: Sequence[Sequence[str]],
    vocab: Sequence[str] | int = 5000,
    window: int = 1,
    mode: str = "skipgram",
) -> WordPairs:
    """Vectorised (target, context) pairs within sentences.

    :param sentences: lists of words (e.g. :func:`jointkl.data.peoples_daily`).
    :param vocab: a vocabulary (list of words, id 0 = ``"<unk>"``) or a size to build one
        from ``sentences``.
    :param int window: skip-gram: neighbours at offsets ±1..window; lm: the ``window``
        previous words are the context.
    :param mode: ``"skipgram"`` (context = the centre word, target = a neighbour) or
        ``"lm"`` (context = the previous words, target = the next word).
    """
    mode, window = check_all(
        [("mode", mode, one_of(*MODES)), ("window", window, positive_int)], "word_pairs"
    )
    if isinstance(vocab, int):
        vocab = build_vocabulary(sentences, vocab)
    vocab = list(vocab)
    index = {w: i for i, w in enumerate(vocab)}
    ids = np.fromiter((index.get(w, 0) for s in sentences for w in s), dtype=np.int64, count=-1)
    sid = np.repeat(np.arange(len(sentences)), [len(s) for s in sentences])
    n = len(ids)
    if mode == "skipgram":
        targets, contexts = [], []
        for o in range(1, window + 1):
            same = sid[: n - o] == sid[o:]  # both ends in one sentence
            left, right = ids[: n - o][same], ids[o:][same]
            targets += [right, left]
            contexts += [left, right]
        target = np.concatenate(targets) if targets else np.zeros(0, np.int64)
        context = np.concatenate(contexts) if contexts else np.zeros(0, np.int64)
    else:
        pos = np.arange(window, n)
        ok = sid[pos - window] == sid[pos]  # the whole context inside the sentence
        pos = pos[ok]
        target = ids[pos]
        context = np.stack([ids[pos - k] for k in range(window, 0, -1)], -1)
    if len(target) == 0:
        raise InputError("word_pairs: the sentences give no pairs (too short for the window)")
    return WordPairs(torch.from_numpy(target), torch.from_numpy(context), vocab)


class FullSoftmax(dist.TorchDistribution):
    """Categorical(logits = h Uᵀ + b) over V words, evaluated lazily and in row chunks.

    The (N, V) logits are never held at once: ``log_prob`` computes them ``chunk`` rows at a
    time, so tracing the model on a whole corpus (N ≈ 10⁶, V = 5·10⁴) costs no memory until a
    log-density is asked for, and then only ``chunk × V`` at a time without autograd.
    """

    arg_constraints: ClassVar[dict] = {}
    has_enumerate_support = False

    def __init__(self, hidden: torch.Tensor, out: torch.Tensor, bias: torch.Tensor, chunk=4096):
        self.hidden, self.out, self.bias, self.chunk = hidden, out, bias, chunk
        super().__init__(batch_shape=hidden.shape[:1], validate_args=False)

    @property
    def support(self):
        return constraints.integer_interval(0, self.out.shape[0] - 1)

    def _logits(self, lo: int, hi: int) -> torch.Tensor:
        return self.hidden[lo:hi] @ self.out.T + self.bias

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        rows = []
        for lo in range(0, len(self.hidden), self.chunk):
            logits = self._logits(lo, lo + self.chunk)
            v = value[lo : lo + self.chunk].unsqueeze(-1)
            rows.append(logits.gather(-1, v).squeeze(-1) - logits.logsumexp(-1))
        return torch.cat(rows) if rows else self.hidden.new_zeros(0)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        with torch.no_grad():
            n = int(torch.Size(sample_shape).numel())
            draws = [
                dist.Categorical(logits=self._logits(lo, lo + self.chunk)).sample((n,))
                for lo in range(0, len(self.hidden), self.chunk)
            ]
            return torch.cat(draws, -1).reshape(*sample_shape, len(self.hidden))


@register_model
class SkipGram(ZooModel):
    """p(word | context) over a vocabulary of V words, with embeddings of size ``dim``.

    :param int vocab_size: V (ids ``0 .. V−1``; 0 is ``"<unk>"``).
    :param int dim: embedding size.
    :param bool normalised: ``False``: the score G(w, c) as a ``pyro.factor`` (for NCE);
        ``True``: the full-softmax categorical (exact likelihood, for SVI/maximum likelihood).
    """

    name: ClassVar[str] = "skipgram"
    description: ClassVar[str] = "skip-gram word|context over People's Daily (NCE or softmax)"
    # `jointkl fit skipgram --engine nce` on the default data (27,140 pairs): mini-batches of
    # 1,024 with ν = 20 shared noise words, 400 steps (15 epochs, ~4 s on one CPU thread).
    # Of the settings measured on a 90/10 split of these pairs (lr 0.005–0.05, 100–800
    # steps), this gave the lowest held-out perplexity (1,237); longer or faster runs overfit
    # the 5,000 × 64 embeddings. A full batch would score all 27k pairs at every step.
    engine_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "nce": {"batch_size": 1024, "nu": 20, "lr": 0.005, "steps": 400}
    }

    def __init__(self, vocab_size: int = 5000, dim: int = 64, normalised: bool = False):
        self.vocab_size, self.dim = check_all(
            [("vocab_size", vocab_size, positive_int), ("dim", dim, positive_int)], "SkipGram"
        )
        self.normalised = bool(normalised)
        if self.vocab_size < 2:  # "<unk>" and at least one word
            raise InputError(f"SkipGram: vocab_size must be >= 2, got {vocab_size}")

    # -------------------------------------------------------------- zoo hooks
    def settings(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "dim": self.dim, "normalised": self.normalised}

    @staticmethod
    def default_data(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
        """Skip-gram pairs (window 1) from the first 300 lines of People's Daily (27,140
        pairs over 3,237 distinct ids, all inside the default vocabulary of 5,000)."""
        from jointkl.data.peoples_daily import peoples_daily

        pairs = word_pairs(peoples_daily()[:300], vocab=5000, window=1)
        return (pairs.target, pairs.context), {}

    # -------------------------------------------------------------- the model
    def _check(self, target: Any, context: Any) -> None:
        for key, t in (("target", target), ("context", context)):
            if (
                not isinstance(t, torch.Tensor)
                or t.dtype.is_floating_point
                or t.dtype == torch.bool
            ):
                raise InputError(f"SkipGram: {key} must be an integer id tensor")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.vocab_size):
                raise InputError(
                    f"SkipGram: {key} ids must lie in [0, {self.vocab_size}), found "
                    f"[{int(t.min())}, {int(t.max())}]; raise vocab_size"
                )
        if target.dim() != 1 or context.dim() not in (1, 2) or len(context) != len(target):
            raise InputError(
                f"SkipGram: target must be (N,) and context (N,) or (N, k), got "
                f"{tuple(target.shape)} and {tuple(context.shape)}"
            )

    def _params(self, device: torch.device):
        V, d = self.vocab_size, self.dim
        dtype = torch.get_default_dtype()
        # word2vec's initialisation: small uniform context vectors, zero output vectors.
        ctx = pyro.param(
            "context_embed", lambda: (torch.rand(V, d, dtype=dtype, device=device) - 0.5) / d
        )
        out = pyro.param("target_embed", lambda: torch.zeros(V, d, dtype=dtype, device=device))
        # (V, 1), not (V,): an embedding table of width one, so its lookup can be sparse.
        bias = pyro.param("target_bias", lambda: torch.zeros(V, 1, dtype=dtype, device=device))
        return ctx, out, bias

    def _hidden(
        self, ctx_embed: torch.Tensor, context: torch.Tensor, sparse: bool = False
    ) -> torch.Tensor:
        h = F.embedding(context, ctx_embed, sparse=sparse)
        return h.mean(-2) if context.dim() == 2 else h

    def model(self, target: torch.Tensor, context: torch.Tensor) -> None:
        self._check(target, context)
        ctx, out, bias = self._params(target.device)
        with pyro.plate("data", len(target)):
            if self.normalised:
                h = self._hidden(ctx, context)
                pyro.sample("target", FullSoftmax(h, out, bias[:, 0]), obs=target)
            else:
                # Only the datum's own word is scored: O(d) per datum, whatever V is; sparse
                # lookups give gradients on the touched rows alone (see the NCE engine).
                h = self._hidden(ctx, context, sparse=True)
                u = F.embedding(target, out, sparse=True)
                b = F.embedding(target, bias, sparse=True)[:, 0]
                pyro.factor("score", (h * u).sum(-1) + b)

    def candidate_scores(self, candidates: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """G(w_k, c_b) for every context b and every candidate word k, ``(B, K)``.

        One (B, d) @ (d, K) product that touches only the K candidates' output rows: the hook
        that lets the NCE engine share one noise sample across a mini-batch (its
        ``shared_noise``), so a step touches ν + B output rows instead of B(1 + ν).
        ``normalised=True`` subtracts each context's log Σ_w e^{G(w, c)} (O(V), as the model).
        """
        ctx, out, bias = self._params(candidates.device)
        h = self._hidden(ctx, context, sparse=not self.normalised)
        u = F.embedding(candidates, out, sparse=not self.normalised)
        b = F.embedding(candidates, bias, sparse=not self.normalised)[:, 0]
        g = h @ u.T + b
        if self.normalised:
            g = g - (h @ out.T + bias[:, 0]).logsumexp(-1, keepdim=True)
        return g

    # -------------------------------------------------------------- evaluation
    def scores(self, fit: Any, context: torch.Tensor) -> torch.Tensor:
        """G(w, c) for every word w: ``(N, V)`` at the fit's parameters."""
        from jointkl.engine import engine_class

        engine_class(fit.engine).activate(fit)
        store = pyro.get_param_store()
        with torch.no_grad():
            h = self._hidden(store["context_embed"], context)
            return h @ store["target_embed"].T + store["target_bias"][:, 0]

    def log_prob(
        self, fit: Any, target: torch.Tensor, context: torch.Tensor, chunk: int = 4096
    ) -> torch.Tensor:
        """log p(target | context) under the full softmax of the fitted scores, ``(N,)``.

        Exact for any training method: the scores are normalised over all V words here, so
        NCE, ranking and softmax fits are compared on the same footing.
        """
        self._check(target, context)
        from jointkl.engine import engine_class

        engine_class(fit.engine).activate(fit)
        store = pyro.get_param_store()
        with torch.no_grad():
            h = self._hidden(store["context_embed"], context)
            full = FullSoftmax(h, store["target_embed"], store["target_bias"][:, 0], chunk=chunk)
            return full.log_prob(target)

    def perplexity(self, fit: Any, target: torch.Tensor, context: torch.Tensor) -> float:
        """exp of the mean negative full-softmax log-likelihood of the pairs."""
        return math.exp(-float(self.log_prob(fit, target, context).mean()))
