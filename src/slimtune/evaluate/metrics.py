"""Pure metric functions: GSM8K exact match, corpus chrF / BLEU, token-weighted loss and perplexity."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

# A minus counts only when it does not follow a word or a digit, so the range "3-4" ends in 4, not -4;
# thousands separators must group by three, so the list "1,2,3" is three numbers, not 123.
_NUMBER = re.compile(r"(?<![\w.])(-\s?\$?|\$\s?-?)?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")


def _canonical(sign: str | None, digits: str) -> str | None:
    try:
        value = Decimal(digits.replace(",", ""))
    except InvalidOperation:
        return None
    if sign and "-" in sign:
        value = -value
    # normalize() turns 5.0 into 5 but 100 into 1E+2; the fixed-point format undoes the exponent.
    return f"{value.normalize():f}" if value else "0"


def extract_number(text: str) -> str | None:
    """The answer number in a model's text, canonical (no ``,`` or ``$``, ``5.0`` -> ``5``), or None.

    A number after the last ``####`` wins (the GSM8K solution format); otherwise the last number in the text.
    """
    marker = text.rfind("####")
    if marker >= 0:
        after = _NUMBER.search(text, marker)
        if after:
            return _canonical(*after.groups())
    found = _NUMBER.findall(text)
    return _canonical(*found[-1]) if found else None


def exact_match(prediction: str, answer: str) -> bool:
    """Whether the number extracted from ``prediction`` equals the reference ``answer`` (also normalised)."""
    predicted = extract_number(prediction)
    return predicted is not None and predicted == extract_number(answer)


def first_line(text: str) -> str:
    """The first non-empty line, stripped: translations are scored on it so trailing chatter is ignored."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu, 0-100)."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing; 0-100)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def token_weighted_loss(losses: Sequence[float], tokens: Sequence[int]) -> float:
    """Mean loss per response token over a set, from each row's mean loss and token count (NaN rows skipped).

    Weighting by tokens makes this the loss of the set as one text, so perplexity = exp(it) is the usual one.
    """
    pairs = [(loss, n) for loss, n in zip(losses, tokens) if n > 0 and not math.isnan(loss)]
    total = sum(n for _, n in pairs)
    return sum(loss * n for loss, n in pairs) / total if total else math.nan


def perplexity(loss: float) -> float:
    return math.exp(loss) if not math.isnan(loss) else math.nan
