"""Sequence tagger: embedding + encoder + emission layer + linear-chain CRF.

    h = Linear(Encoder(Embedding(chars)))            emission scores (N, T, C)
    tags ~ LinearChainCRF(h, g, start, end, lengths, allowed)     inside pyro.plate("data")

or, with ``loss="softmax"`` (the baseline the CRF is compared with: the same network, each
position's tag independent), ``tags_t ~ Categorical(softmax(h_t))`` for ``t < length``,
decoded by a per-position argmax.

Every weight (network and CRF transitions ``g``) is a ``pyro.module`` parameter and the tags
are observed, so the model has no latent sites: the SVI engine fits it by maximum likelihood
(its loss is the negative log-likelihood, ``log Z − score(gold path)`` summed over rows).
With ``tag_scheme="bmes"`` the CRF forbids illegal BMES transitions, starts and ends, so
decoding always yields well-formed words. :meth:`CRFTagger.segment` turns raw text into words.

Encoders: ``"conv"`` — the reference network, ``num_layers`` 1-D convolutions (width
``kernel_size``, ReLU) over ``embedding_dim``-dimensional embeddings; ``"bilstm"`` — a
bidirectional LSTM over packed sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from jointkl.data.cws import PAD, CharVocab, bigram_ids, encode_texts, words_from_tags
from jointkl.device import follow
from jointkl.distributions import LinearChainCRF, bmes_constraints
from jointkl.errors import InputError
from jointkl.settings import check_all, nonnegative_int, number, one_of, positive_int
from jointkl.zoo import ZooModel, register_model

__all__ = ["CRFTagger", "TaggerNet", "WindowLinear"]

ENCODERS = ("conv", "bilstm")
LOSSES = ("crf", "softmax")
MODULE = "crf_tagger"  # the pyro.module name: params are "crf_tagger$$$<name>"


class WindowLinear(nn.Module):
    """A 1-D "same" convolution over ``(N, T, D)`` written as one Linear layer on the
    concatenated window ``[x_{t-k//2}, ..., x_{t+k//2}]`` (zero outside the sequence).

    Same function as ``nn.Conv1d(D, H, k, padding=k // 2)``, but one large matrix product in
    each direction: on CPU, forward + backward ran about 2x faster than Conv1d's at tagging
    sizes (64 rows x 100 characters x 128 channels).
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.linear = nn.Linear(kernel_size * in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, T = self.kernel_size, x.shape[1]
        z = nn.functional.pad(x, (0, 0, k // 2, k // 2))
        return self.linear(torch.cat([z[:, i : i + T] for i in range(k)], dim=-1))


class TaggerNet(nn.Module):
    """Token ids ``(N, T)`` -> emission scores ``(N, T, C)``, plus the CRF's own scores."""

    def __init__(
        self,
        vocab_size: int,
        num_tags: int,
        encoder: str,
        embedding_dim: int,
        hidden_dim: int,
        num_layers: int,
        kernel_size: int,
        dropout: float,
        bigram_keys: Sequence[int] = (),
        bigram_dim: int = 0,
    ):
        super().__init__()
        self.encoder = encoder
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embedding_dim, padding_idx=PAD)
        # Bigram (c_t, c_{t+1}) embeddings, looked up by sorted id-pair keys (a buffer, not a
        # parameter: it is part of the settings, not of the fit).
        self.register_buffer(
            "bigram_keys", torch.tensor(list(bigram_keys), dtype=torch.long), persistent=False
        )
        self.bigram_embed = (
            nn.Embedding(len(bigram_keys) + 2, bigram_dim, padding_idx=PAD) if bigram_dim else None
        )
        self.drop = nn.Dropout(dropout)
        in_dim = embedding_dim + bigram_dim
        if encoder == "conv":
            dims = [in_dim] + [hidden_dim] * num_layers
            self.convs = nn.ModuleList(
                WindowLinear(a, b, kernel_size) for a, b in zip(dims, dims[1:], strict=False)
            )
            out = hidden_dim
        else:
            self.lstm = nn.LSTM(
                in_dim,
                hidden_dim // 2,
                num_layers=num_layers,
                bidirectional=True,
                batch_first=True,
                dropout=dropout if num_layers > 1 else 0.0,
            )
            out = 2 * (hidden_dim // 2)
        self.emit = nn.Linear(out, num_tags)
        # transitions[i, j] scores tag i followed by tag j (LinearChainCRF's convention).
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))
        self.start = nn.Parameter(torch.zeros(num_tags))
        self.end = nn.Parameter(torch.zeros(num_tags))

    def forward(self, chars: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(chars.shape[1], device=chars.device) < lengths[:, None]).unsqueeze(-1)
        x = self.embed(chars)  # (N, T, E)
        if self.bigram_embed is not None:
            bigrams = bigram_ids(chars * mask.squeeze(-1), self.bigram_keys, self.vocab_size)
            x = torch.cat([x, self.bigram_embed(bigrams)], dim=-1)
        x = self.drop(x) * mask  # whatever ids pad the rows
        if self.encoder == "conv":
            for conv in self.convs:
                # Zero the padding after every layer, so a row's scores do not depend on how
                # much padding its batch happens to have (same as zero "same"-padding alone).
                x = torch.relu(conv(x)) * mask
            x = self.drop(x)
        else:
            packed = nn.utils.rnn.pack_padded_sequence(
                x, lengths.cpu(), batch_first=True, enforce_sorted=False
            )
            out, _ = self.lstm(packed)
            x, _ = nn.utils.rnn.pad_packed_sequence(
                out, batch_first=True, total_length=chars.shape[1]
            )
            x = self.drop(x)
        return self.emit(x)


# Rows a pass without gradients runs through the network at once (see CRFTagger._emissions).
EVAL_ROWS = 256
BIGRAM_MIN_COUNT = 3  # bigrams rarer than this in the training split share the UNK embedding
DEFAULT_BIGRAM_DIM = 64


@lru_cache(maxsize=1)
def _default_dataset():
    from jointkl.data.cws import cws_dataset

    return cws_dataset()


@lru_cache(maxsize=1)
def _default_bigram_keys() -> tuple[int, ...]:
    from jointkl.data.cws import bigram_keys

    d = _default_dataset()
    return tuple(bigram_keys(d.train_sentences, d.vocab, BIGRAM_MIN_COUNT))


@register_model
class CRFTagger(ZooModel):
    """Neural linear-chain CRF tagger, as a Pyro model.

    :param vocab_size: number of token ids (padding 0 and unknown 1 included). ``None``: the
        size of ``vocab``; with neither, the People's Daily character vocabulary.
    :param int num_tags: number of tags C.
    :param str encoder: ``"conv"`` or ``"bilstm"``.
    :param int embedding_dim: character embedding size.
    :param int hidden_dim: encoder width (conv channels, or both LSTM directions together).
    :param int num_layers: conv layers or LSTM layers.
    :param int kernel_size: conv width (odd).
    :param float dropout: dropout on embeddings and encoder outputs while fitting.
    :param tag_scheme: ``"bmes"`` (needs ``num_tags=4``, tags in :data:`jointkl.data.cws.TAGS`
        order; constrains the CRF) or ``None`` (any tag may follow any other).
    :param vocab: the characters in id order (:class:`jointkl.data.cws.CharVocab` ``.chars``);
        needed by :meth:`segment` and recorded in :meth:`settings`.
    :param bigram_dim: size of an extra embedding of the pair ``(c_t, c_{t+1})`` at each
        position, concatenated to the character embedding (0: none; ``None``: 64 with the
        default People's Daily vocabulary, else 0).
    :param bigram_keys: the known pairs (:func:`jointkl.data.cws.bigram_keys`); with neither
        ``vocab`` nor ``bigram_keys``, those of the People's Daily training split.
    :param str loss: ``"crf"`` (the tags' joint distribution is the CRF; Viterbi decoding) or
        ``"softmax"`` (each position's tag independent given the network's scores, a
        per-position categorical; argmax decoding, which may give ill-formed BMES
        sequences; the CRF's transition, start and end scores are then unused). The network
        is the same either way.
    """

    name: ClassVar[str] = "crf-seg"
    description: ClassVar[str] = (
        "neural CRF tagger: Chinese word segmentation, People's Daily (BMES, max. likelihood)"
    )
    # The engine settings of the measured run (scripts/cws.py, docs/models/crf.md): 6 epochs
    # of 64-row mini-batches. A full-batch step would cost a whole epoch.
    engine_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "svi": {"batch_size": 64, "lr": 0.005, "lr_schedule": "cosine", "steps": 1576}
    }

    def __init__(
        self,
        vocab_size: int | None = None,
        num_tags: int = 4,
        encoder: str = "conv",
        embedding_dim: int = 128,
        hidden_dim: int = 128,
        num_layers: int = 3,
        kernel_size: int = 3,
        dropout: float = 0.1,
        tag_scheme: str | None = "bmes",
        vocab: str | None = None,
        bigram_dim: int | None = None,
        bigram_keys: Sequence[int] | None = None,
        loss: str = "crf",
    ):
        default_corpus = vocab is None and vocab_size is None
        if default_corpus:
            vocab = _default_dataset().vocab.chars
        if bigram_dim is None:  # the measured People's Daily set-up; plain otherwise
            bigram_dim = DEFAULT_BIGRAM_DIM if default_corpus else 0
        bigram_dim = nonnegative_int(bigram_dim, "CRFTagger: bigram_dim")
        if bigram_dim and bigram_keys is None:
            if not default_corpus:
                raise InputError(
                    "CRFTagger: bigram_dim > 0 needs bigram_keys (jointkl.data.cws.bigram_keys "
                    "of the training sentences; CRFTagger.for_dataset builds them)"
                )
            bigram_keys = _default_bigram_keys()
        self.bigram_dim = bigram_dim
        self.bigram_keys = [int(k) for k in bigram_keys] if bigram_dim else []
        self.vocab = CharVocab(vocab) if vocab is not None else None
        if vocab_size is None:
            vocab_size = len(self.vocab)
        elif self.vocab is not None and vocab_size != len(self.vocab):
            raise InputError(
                f"CRFTagger: vocab_size={vocab_size} but the vocab has {len(self.vocab)} ids "
                f"({len(self.vocab.chars)} characters + padding + unknown)"
            )
        (
            self.vocab_size,
            self.num_tags,
            self.embedding_dim,
            self.hidden_dim,
            self.num_layers,
            self.kernel_size,
            self.encoder,
            self.dropout,
            self.tag_scheme,
            self.loss,
        ) = check_all(
            [
                ("vocab_size", vocab_size, positive_int),
                ("num_tags", num_tags, positive_int),
                ("embedding_dim", embedding_dim, positive_int),
                ("hidden_dim", hidden_dim, positive_int),
                ("num_layers", num_layers, positive_int),
                ("kernel_size", kernel_size, positive_int),
                ("encoder", encoder, one_of(*ENCODERS)),
                ("dropout", dropout, number),
                ("tag_scheme", tag_scheme, one_of("bmes", None)),
                ("loss", loss, one_of(*LOSSES)),
            ],
            "CRFTagger",
        )
        # Rules beyond positivity: ids 0 and 1 are padding and unknown, so a vocabulary
        # holds at least one character at id 2; the BiLSTM splits hidden_dim between its
        # two directions; a "same" convolution needs a centre.
        if self.vocab_size < 3:
            raise InputError(f"CRFTagger: vocab_size must be an int >= 3, got {vocab_size!r}")
        if self.hidden_dim < 2:
            raise InputError(f"CRFTagger: hidden_dim must be an int >= 2, got {hidden_dim!r}")
        if self.kernel_size % 2 == 0:
            raise InputError(f"CRFTagger: kernel_size must be odd, got {kernel_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"CRFTagger: dropout must be in [0, 1), got {dropout!r}")
        if self.tag_scheme == "bmes" and self.num_tags != 4:
            raise InputError(f"CRFTagger: tag_scheme='bmes' needs num_tags=4, got {num_tags}")
        self.allowed = bmes_constraints() if tag_scheme == "bmes" else None
        keys = self.bigram_keys
        if any(b <= a for a, b in zip(keys, keys[1:], strict=False)) or (
            keys and not 0 <= keys[0] <= keys[-1] < self.vocab_size**2
        ):
            raise InputError(
                "CRFTagger: bigram_keys must be strictly increasing ints in 0..vocab_size^2-1"
            )
        self.net = self._build()

    @classmethod
    def for_dataset(
        cls, data: Any, bigram_min_count: int = BIGRAM_MIN_COUNT, **settings: Any
    ) -> CRFTagger:
        """A segmenter for a :class:`jointkl.data.cws.CWSDataset`: its character vocabulary and,
        when ``bigram_dim > 0``, the bigrams seen ``bigram_min_count`` times in its training
        sentences."""
        from jointkl.data.cws import bigram_keys

        if settings.get("bigram_dim"):
            settings.setdefault(
                "bigram_keys", bigram_keys(data.train_sentences, data.vocab, bigram_min_count)
            )
        return cls(vocab=data.vocab.chars, **settings)

    def _build(self) -> TaggerNet:
        return TaggerNet(
            self.vocab_size,
            self.num_tags,
            self.encoder,
            self.embedding_dim,
            self.hidden_dim,
            self.num_layers,
            self.kernel_size,
            self.dropout,
            self.bigram_keys,
            self.bigram_dim,
        )

    # -------------------------------------------------------------- zoo hooks
    def settings(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "num_tags": self.num_tags,
            "encoder": self.encoder,
            "embedding_dim": self.embedding_dim,
            "hidden_dim": self.hidden_dim,
            "num_layers": self.num_layers,
            "kernel_size": self.kernel_size,
            "dropout": self.dropout,
            "tag_scheme": self.tag_scheme,
            "vocab": self.vocab.chars if self.vocab is not None else None,
            "bigram_dim": self.bigram_dim,
            "bigram_keys": self.bigram_keys if self.bigram_dim else None,
            "loss": self.loss,
        }

    @staticmethod
    def default_data(seed: int = 0) -> tuple[tuple[torch.Tensor, ...], dict]:
        """People's Daily training split packed into rows of <= 100 characters:
        ``(chars (N, T), lengths (N,), tags (N, T))`` (:func:`jointkl.data.cws.cws_dataset`;
        the split is fixed, ``seed`` unused)."""
        d = _default_dataset()
        return (d.train_chars, d.train_lengths, d.train_tags), {}

    # -------------------------------------------------------------- the model
    def _check(self, chars, lengths, tags) -> None:
        if not isinstance(chars, torch.Tensor) or chars.dim() != 2 or chars.dtype != torch.long:
            raise InputError("CRFTagger: chars must be an int64 tensor of shape (N, T)")
        if not isinstance(lengths, torch.Tensor) or lengths.shape != chars.shape[:1]:
            raise InputError(f"CRFTagger: lengths must have shape ({chars.shape[0]},)")
        if tags is not None and (not isinstance(tags, torch.Tensor) or tags.shape != chars.shape):
            raise InputError(f"CRFTagger: tags must have the shape of chars {tuple(chars.shape)}")
        if bool((chars < 0).any()) or bool((chars >= self.vocab_size).any()):
            raise InputError(f"CRFTagger: chars must be token ids in 0..{self.vocab_size - 1}")

    def _module(self, chars: torch.Tensor) -> TaggerNet:
        # A fresh param store means a new fit: start from a new network drawn from the global
        # RNG, which the engine has seeded, so the seed fixes the initial weights. It is built
        # on the CPU and follows the data to their device once, before it is registered.
        if not any(k.startswith(f"{MODULE}$$$") for k in pyro.get_param_store().keys()):
            self.net = self._build()
        return pyro.module(MODULE, follow(self.net, chars))

    def crf(self, emissions: torch.Tensor, lengths: torch.Tensor) -> LinearChainCRF:
        """The CRF over tag sequences given emission scores ``(N, T, C)``."""
        net = self.net
        return LinearChainCRF(
            emissions, net.transitions, net.start, net.end, lengths=lengths, allowed=self.allowed
        )

    def tag_distribution(self, emissions: torch.Tensor, lengths: torch.Tensor):
        """The distribution of the tags ``(N, T)`` given emission scores ``(N, T, C)``: the
        CRF, or (``loss="softmax"``) independent categoricals, positions past each length
        masked out; batch shape ``(N,)``, event shape ``(T,)`` either way."""
        if self.loss == "crf":
            return self.crf(emissions, lengths)
        valid = torch.arange(emissions.shape[1], device=emissions.device) < lengths[:, None]
        return dist.Categorical(logits=emissions).mask(valid).to_event(1)

    def model(
        self, chars: torch.Tensor, lengths: torch.Tensor, tags: torch.Tensor | None = None
    ) -> None:
        self._check(chars, lengths, tags)
        net = self._module(chars)
        # Dropout while fitting only: the model runs with gradients exactly when it is being
        # fitted. Run without them (the pointwise log-likelihood and predictive of
        # ``to_arviz``, any evaluation), it is the fitted model itself, the same on every
        # pass; dropout there made each pass a different random network, so the predictive's
        # vectorised pass never matched its one-draw check and the converter re-ran the
        # whole network on the corpus once per draw.
        net.train(torch.is_grad_enabled())
        # The plate first: what needs only N (an engine sizing its mini-batches) stops at the
        # plate's creation, before the network runs over the whole corpus.
        with pyro.plate("data", chars.shape[0]):
            # Crop to this batch's longest row: a mini-batch rarely needs the global padding.
            T = int(lengths.max())
            chars = chars[:, :T]
            tags = tags[:, :T] if tags is not None else None
            emissions = self._emissions(net, chars, lengths)
            pyro.sample("tags", self.tag_distribution(emissions, lengths), obs=tags)

    @staticmethod
    def _emissions(net: TaggerNet, chars: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``net(chars, lengths)``; without gradients (evaluation), :data:`EVAL_ROWS` rows at a
        time. Rows are independent given the weights, so the scores are the same; only the
        network's activations (the width-3 window of 192 features at each of a corpus's
        16,804 x 100 characters is 3.9 GB) are bounded to one chunk's."""
        n = chars.shape[0]
        if torch.is_grad_enabled() or n <= EVAL_ROWS:
            return net(chars, lengths)
        return torch.cat(
            [
                net(chars[i : i + EVAL_ROWS], lengths[i : i + EVAL_ROWS])
                for i in range(0, n, EVAL_ROWS)
            ]
        )

    # -------------------------------------------------------------- prediction
    def load_params(self, params: dict[str, torch.Tensor]) -> None:
        """Load fitted weights (a Fit's ``params``, i.e. param-store names) into the network."""
        prefix = f"{MODULE}$$$"
        state = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
        if not state:
            raise InputError(f"CRFTagger: no '{prefix}*' parameters in the given fit")
        try:
            self.net.load_state_dict(state)
        except RuntimeError as e:
            raise InputError(f"CRFTagger: fitted weights do not match the settings: {e}") from e

    def decode(self, chars: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Tags ``(N, T)`` (padding 0) for token ids, with the current weights: the Viterbi path
        (``loss="crf"``) or each position's most probable tag (``loss="softmax"``)."""
        self._check(chars, lengths, None)
        # the data to the network's device (a fit loaded with Fit.load(dir, device=...))
        device = next(self.net.parameters()).device
        chars, lengths = chars.to(device), lengths.to(device)
        self.net.eval()
        with torch.no_grad():
            emissions = self._emissions(self.net, chars, lengths)
            if self.loss == "crf":
                return self.crf(emissions, lengths).mode
            valid = torch.arange(chars.shape[1], device=chars.device) < lengths[:, None]
            return emissions.argmax(-1).masked_fill(~valid, 0)

    def segment(
        self, texts: str | Sequence[str], fit: Any = None, batch_size: int = 128
    ) -> list[list[str]]:
        """Segment raw texts into words (one list per text; a ``str`` counts as one text).

        ``fit``: a :class:`jointkl.Fit` of this model whose weights to use (else the current
        ones). Texts are decoded in batches of similar length.
        """
        if self.vocab is None or self.tag_scheme != "bmes":
            raise InputError("CRFTagger.segment needs a vocab and tag_scheme='bmes'")
        if isinstance(texts, str):
            texts = [texts]
        tags = self.tag_texts(texts, fit=fit, batch_size=batch_size)
        return [words_from_tags(text, t) for text, t in zip(texts, tags, strict=True)]

    def tag_texts(
        self, texts: Sequence[str], fit: Any = None, batch_size: int = 128
    ) -> list[list[int]]:
        """The decoded tag of every character of each text (:meth:`decode`), as lists; texts
        are decoded in batches of similar length. ``fit`` as in :meth:`segment`."""
        if self.vocab is None:
            raise InputError("CRFTagger.tag_texts needs a vocab")
        if fit is not None:
            self.load_params(fit.params)
        out: list[list[int]] = [[] for _ in texts]
        order = sorted((i for i, t in enumerate(texts) if t), key=lambda i: len(texts[i]))
        for k in range(0, len(order), batch_size):
            idx = order[k : k + batch_size]
            chars, lengths = encode_texts([texts[i] for i in idx], self.vocab)
            tags = self.decode(chars, lengths)
            for row, i in enumerate(idx):
                out[i] = tags[row, : len(texts[i])].tolist()
        return out
