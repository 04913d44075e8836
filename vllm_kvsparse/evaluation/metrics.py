"""Answer scoring and EffiVLM-Bench's overall metrics (arXiv 2506.00479 §3.1, App. A.4;
../shared/notes/policies.md §10), for one model served by several endpoints, the first being
the reference (uncompressed) one. A "benchmark" b is a task of the dataset.

  EM_b^c   accuracy (relaxed match by default) of endpoint c on task b
  OP^c     sqrt( mean_b (EM_b^c / EM_b^ref)^2 )                  overall performance
  OG^c     std_b(EM_b^c / EM_b^ref) / mean_b(EM_b^c / EM_b^ref)   overall generalization
           (population std; the paper prints it x100; lower is better)
  OL^c     mean over samples of [normalized answer of c == normalized answer of ref]
           (loyalty; samples where either request failed count as disagreement)
  OE^c     mean_b (T_b^ref / T_b^c), T_b = mean request time (send to last token) of the
           answered requests of task b: the time of a fixed number of samples, up to a factor

Tasks whose reference accuracy (or time) is 0 have no ratio: they are left out of OP/OG (OE)
and listed in "skipped_tasks".
"""

from __future__ import annotations

import math
import re
import string

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, number words as digits, spaces collapsed."""
    words = _PUNCT.sub(" ", (text or "").lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def exact_match(prediction: str, answers: list[str]) -> bool:
    """The prediction, stripped of surrounding whitespace, is one of the answers verbatim."""
    p = (prediction or "").strip()
    return any(p == a.strip() for a in answers)


def relaxed_match(prediction: str, answers: list[str]) -> bool:
    """After normalize(): equal to an answer, or starting with it as whole words
    ("Red." and "red square" match "red"; "reddish" does not)."""
    p = normalize(prediction)
    for a in answers:
        n = normalize(a)
        if n and (p == n or p.startswith(n + " ")):
            return True
    return False


def overall(accuracy: dict[str, dict[str, float | None]], ref: str) -> dict[str, dict]:
    """OP and OG per endpoint from {endpoint: {task: accuracy}}; the reference gets 1, 0."""
    out = {}
    ref_acc = accuracy.get(ref) or {}
    for name, acc in accuracy.items():
        ratios, skipped = [], []
        for task, r in ref_acc.items():
            a = acc.get(task)
            if r is None or r == 0 or a is None:
                skipped.append(task)
            else:
                ratios.append(a / r)
        if not ratios:
            out[name] = {"OP": None, "OG": None, "ratios": {}, "skipped_tasks": skipped}
            continue
        m = sum(ratios) / len(ratios)
        std = math.sqrt(sum((x - m) ** 2 for x in ratios) / len(ratios))
        out[name] = {"OP": math.sqrt(sum(x * x for x in ratios) / len(ratios)),
                     "OG": std / m if m else None,
                     "ratios": {t: acc[t] / ref_acc[t] for t in ref_acc if t not in skipped},
                     "skipped_tasks": skipped}
    return out


def loyalty(predictions: list[str | None], reference: list[str | None]) -> float | None:
    """OL: share of samples whose normalized prediction equals the reference's (None: failed
    request, never agrees)."""
    if not reference:
        return None
    agree = sum(1 for p, r in zip(predictions, reference)
                if p is not None and r is not None and normalize(p) == normalize(r))
    return agree / len(reference)


def efficiency(times: dict[str, float | None], ref_times: dict[str, float | None]) -> float | None:
    """OE: mean over tasks of reference time / endpoint time."""
    ratios = [ref_times[t] / times[t] for t in ref_times
              if ref_times.get(t) and times.get(t)]
    return sum(ratios) / len(ratios) if ratios else None
