"""Rare-concept priority for balanced selections: the images whose captions name a rare concept
of a given list go into the selection first.

The recipe ranked English Wikipedia by PageRank, kept about 5M representable concepts, and
prioritised sampling images that reference the rare ones, so the model learns what a
Mamenchisaurus looks like and not only a cat. This module does that step for any concept list:

- **The list** (:func:`read_concepts`): a text file, one concept a line, optionally followed by a
  tab and its weight (its importance, e.g. its PageRank; 1 when absent); a line that starts with
  ``#`` is a comment.
  Concepts are matched as whole words, case and punctuation aside: "Mamenchisaurus" matches "a
  mamenchisaurus, grazing", and "cat" does not match "category".
- **Caption search** (:func:`match_captions`): every run of 1..``max_words`` words of each caption
  is looked up in a dictionary of the concepts (a CPU pass; ``krea2 bench data`` times it).
- **Priority** (:func:`prioritised_images`): a concept found in ``f`` images has priority
  ``weight / f`` (important and rare first). In that order, each concept gets up to
  ``images_per_concept`` images (those already picked for an earlier concept count), drawn at
  random among its images, until the priority share of the selection is full. A concept rarer
  than ``images_per_concept`` has all its images taken. The balanced sample fills the rest.
"""

from __future__ import annotations

import hashlib
import logging
import re
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from krea2_train.logs import Progress

logger = logging.getLogger(__name__)

WORD = re.compile(r"[^\W_]+")  # letters and digits of any script; punctuation and "_" separate words
MAX_CONCEPT_WORDS = 8  # longer names are refused: captions are searched for runs of at most this many words
LISTED = 5  # how many bad lines an error names


class ConceptListError(ValueError):
    """A concept list that cannot be used, naming its file and lines."""


def words(text: str) -> tuple[str, ...]:
    """The lowercase words of ``text``: what concepts and captions are compared as."""
    return tuple(WORD.findall(text.casefold()))


@dataclass(frozen=True)
class ConceptList:
    """Concepts by id (their order in the file): ``names`` (as first written), ``weights`` [C]
    float64, the dictionary from normalised words to id, and every word run that begins a concept
    (the search stops extending a run that begins none)."""

    names: tuple[str, ...]
    weights: np.ndarray
    index: dict[tuple[str, ...], int]
    max_words: int
    sha256: str  # of the file's bytes: a selection's key
    prefixes: frozenset[tuple[str, ...]] = frozenset()

    def __len__(self) -> int:
        return len(self.names)


def concept_list(names: Sequence[str], weights: Sequence[float], sha256: str) -> ConceptList:
    """A :class:`ConceptList` of distinct concepts (as normalised words) and their weights."""
    index = {words(name): concept for concept, name in enumerate(names)}
    if len(index) != len(names):
        raise ConceptListError("two concepts have the same words")
    prefixes = frozenset(key[:length] for key in index for length in range(1, len(key)))
    return ConceptList(tuple(names), np.asarray(weights, dtype=np.float64), index, max(map(len, index)), sha256, prefixes)


def read_concepts(path: str | Path) -> ConceptList:
    """The concept list of ``path`` (see the module docstring).

    A concept given twice (the same words, e.g. "AC/DC" and "AC DC") is kept once, with the larger
    weight; the log says how many were merged.

    Raises:
        ConceptListError: a missing or empty file, a weight that is not a positive number, a name
            of no word or of more than MAX_CONCEPT_WORDS words, or a list whose weights seem to
            follow the names after a space instead of a tab.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConceptListError(f"concept list {path}: {error.strerror or error}") from None
    names, weights, index, problems = [], [], {}, []
    merged = tabbed = spaced_number = 0
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name, tab, weight_text = text.partition("\t")
        tabbed += bool(tab)
        key = words(name)
        spaced_number += bool(key) and _is_decimal(name.split()[-1])
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            weight = float("nan")
        if not weight > 0 or weight == float("inf"):
            problems.append(f"line {number}: weight {weight_text.strip()!r} is not a positive number")
        elif not key:
            problems.append(f"line {number}: {name!r} has no word")
        elif len(key) > MAX_CONCEPT_WORDS:
            problems.append(f"line {number}: {name!r} has {len(key)} words, at most {MAX_CONCEPT_WORDS}")
        elif key in index:
            merged += 1
            weights[index[key]] = max(weights[index[key]], weight)
        else:
            index[key] = len(names)
            names.append(name.strip())
            weights.append(weight)
    if problems:
        shown = "; ".join(problems[:LISTED]) + ("; ..." if len(problems) > LISTED else "")
        raise ConceptListError(f"concept list {path}: {len(problems)} bad line(s): {shown}")
    if not names:
        raise ConceptListError(f"concept list {path} names no concept")
    if not tabbed and spaced_number > len(names) / 2:
        raise ConceptListError(
            f"concept list {path}: {spaced_number} of its {len(names)} concepts end in a decimal number and no line has a"
            " tab: a weight goes after a TAB (\"Mamenchisaurus<TAB>0.003\"), or it is read as a word of the name"
        )
    if merged:
        logger.info("concept list %s: %d concepts given again (the same words) were merged, keeping the larger weight", path, merged)
    return concept_list(names, weights, hashlib.sha256(data).hexdigest())


def _is_decimal(token: str) -> bool:
    """'0.003', '2e-3': a number written as a weight would be (not '11' or '3.1.2')."""
    try:
        float(token)
    except ValueError:
        return False
    return any(mark in token for mark in ".eE")


def match_captions(captions: Iterable[str], concepts: ConceptList, total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The concepts each caption names, as CSR arrays ``(offsets [n + 1], concept_ids)``: caption i
    names ``concept_ids[offsets[i]:offsets[i + 1]]`` (sorted, each once)."""
    index, prefixes, longest = concepts.index, concepts.prefixes, concepts.max_words
    offsets, found = array("q", [0]), array("q")
    progress = Progress("concept search:", total or 0, "captions", logger)
    for number, caption in enumerate(captions, start=1):
        caption_words = words(caption or "")
        named = set()
        for start in range(len(caption_words)):
            for end in range(start + 1, min(start + longest, len(caption_words)) + 1):
                run = caption_words[start:end]
                concept = index.get(run)
                if concept is not None:
                    named.add(concept)
                if run not in prefixes:  # no longer concept begins with this run
                    break
        found.extend(sorted(named))
        offsets.append(len(found))
        progress.update(number)
    return np.frombuffer(offsets, dtype=np.int64).copy(), np.frombuffer(found, dtype=np.int64).copy()


@dataclass(frozen=True)
class Priority:
    """What :func:`prioritised_images` chose: ``picked`` (sorted indices of images), the concepts
    found in any caption, those that got images, and those all of whose images were taken."""

    picked: np.ndarray
    concepts_found: int
    concepts_served: int
    concepts_whole: int


def prioritised_images(
    offsets: np.ndarray,
    concept_ids: np.ndarray,
    weights: Sequence[float],
    images_per_concept: int,
    budget: int,
    seed: int = 0,
) -> Priority:
    """Up to ``budget`` images chosen for their concepts (see the module docstring).

    Args:
        offsets, concept_ids: the images' concepts, as :func:`match_captions` returns them.
        weights: [C] each concept's weight.
        images_per_concept: the most images a concept is given (>= 1).
        budget: the most images chosen in all (>= 0).
    """
    if images_per_concept < 1:
        raise ValueError(f"images_per_concept must be >= 1, got {images_per_concept}")
    weights = np.asarray(weights, dtype=np.float64)
    num_images = len(offsets) - 1
    image_of_match = np.repeat(np.arange(num_images), np.diff(offsets))
    order = np.argsort(concept_ids, kind="stable")  # the matches grouped by concept: an inverted index
    images_by_concept = image_of_match[order]
    counts = np.bincount(concept_ids, minlength=len(weights))
    starts = np.concatenate([[0], np.cumsum(counts)])
    found = np.flatnonzero(counts)
    # important and rare first; ties: the list's order
    ranked = found[np.lexsort((found, -(weights[found] / counts[found])))]
    picked = np.zeros(num_images, dtype=bool)
    rng = np.random.default_rng(seed)
    taken = served = whole = 0
    for concept in ranked:
        if taken >= budget:
            break
        members = images_by_concept[starts[concept] : starts[concept + 1]]
        wanted = min(images_per_concept, len(members)) - int(picked[members].sum())
        candidates = members[~picked[members]]
        take = min(wanted, budget - taken, len(candidates))
        if take > 0:
            picked[rng.choice(candidates, size=take, replace=False)] = True
            taken += take
            served += 1
        if len(members) <= images_per_concept and picked[members].all():
            whole += 1
    return Priority(np.flatnonzero(picked), len(found), served, whole)
