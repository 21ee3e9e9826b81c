"""Nouns of a caption, for GroupViT's multi-label contrastive prompts ("a photo of a {noun}.").

Two backends give the same kind of answer (lower-case singular nouns in order of appearance):

- ``"nltk"``: NLTK's averaged-perceptron ``pos_tag``; words tagged ``NN``/``NNS`` are nouns
  (as NVlabs GroupViT does, minus its verb and proper-noun tags). Needs the NLTK resource
  ``taggers/averaged_perceptron_tagger_eng`` (``averaged_perceptron_tagger`` before NLTK 3.9).
- ``"offline"``: no download. A small tagger shipped with groupseg: a WordNet 3.0 lexicon
  (``prompts/lexicon/nouns.tsv.gz``, made by ``training/build_noun_lexicon.py``) gives how often
  each word is a noun, verb, adjective or adverb; a closed list of function words and a
  first-order Viterbi pass over coarse tags (a determiner is followed by a noun or adjective,
  "to" by a verb, "is" by an -ing form, ...) pick one tag per word.
- ``"auto"`` (default): ``"nltk"`` when its tagger data can be found, else ``"offline"``.

Both backends share the tokenizer (runs of letters; digits and punctuation are kept as
separators) and the lemmatiser (WordNet's noun exception list, then morphy's suffix rules:
"dogs" -> "dog", "children" -> "child", "women" -> "woman", "boxes" -> "box"). Plural-only
words stay plural ("jeans", "pants", "stairs"). Pronouns ("someone", "everything"), determiners,
numbers and words shorter than two letters are never returned.

>>> extract_nouns("Two dogs are running through the grass .", backend="offline")
['dog', 'grass']
"""
from __future__ import annotations

import functools
import gzip
import math
import random
import re
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

Backend = Literal["auto", "nltk", "offline"]

# NLTK >= 3.9 loads JSON weights under the first name; older releases the pickle under the second.
NLTK_TAGGER_RESOURCES = ("taggers/averaged_perceptron_tagger_eng/", "taggers/averaged_perceptron_tagger/")
NLTK_NOUN_TAGS = ("NN", "NNS")

_TOKEN = re.compile(r"'s\b|[A-Za-z]+|\d+(?:[.,]\d+)*|[^\sA-Za-z\d]", re.IGNORECASE)


# ----------------------------------------------------------------------------- lexicon
class Lexicon(NamedTuple):
    counts: dict[str, tuple[int, int, int, int]]  # word -> SemCor counts (n, v, a, r); -1 = not a lemma
    noun_exc: dict[str, str]  # "children" -> "child"
    verb_exc: dict[str, str]  # "ran" -> "run"
    adj_exc: dict[str, str]  # "bigger" -> "big"


def lexicon_path() -> Path:
    """``prompts/lexicon/nouns.tsv.gz`` from the installed ``groupseg.prompts`` data folder."""
    try:
        from groupseg.prompting import prompts_dir

        path = prompts_dir() / "lexicon" / "nouns.tsv.gz"
        if path.is_file():
            return path
    except (ImportError, FileNotFoundError):
        pass
    # Source checkout without an installed data package: training/ sits beside prompts/.
    return Path(__file__).resolve().parents[1] / "prompts" / "lexicon" / "nouns.tsv.gz"


@functools.lru_cache(maxsize=1)
def load_lexicon(path: str | None = None) -> Lexicon:
    """Read the gzipped lexicon once (about 0.3 s, 80k words)."""
    p = Path(path) if path else lexicon_path()
    if not p.is_file():
        raise FileNotFoundError(
            f"noun lexicon {p} not found: reinstall groupseg, or run training/build_noun_lexicon.py"
        )
    counts: dict[str, tuple[int, int, int, int]] = {}
    exc: dict[str, dict[str, str]] = {"noun.exc": {}, "verb.exc": {}, "adj.exc": {}}
    section = None
    with gzip.open(p, "rt", encoding="utf-8") as f:
        for line in f:
            if line.startswith("## "):
                section = line[3:].strip()
                continue
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.rstrip("\n").split("\t")
            if section == "words":
                counts[parts[0]] = tuple(-1 if c == "-" else int(c) for c in parts[1:5])  # type: ignore[assignment]
            elif section in exc:
                exc[section][parts[0]] = parts[1]
    return Lexicon(counts, exc["noun.exc"], exc["verb.exc"], exc["adj.exc"])


# ----------------------------------------------------------------------------- lemmas
# WordNet morphy's detachment rules (inflected ending -> lemma ending).
_NOUN_RULES = (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
               ("men", "man"), ("ies", "y"))
_VERB_RULES = (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
               ("ing", ""))
_ADJ_RULES = (("er", ""), ("est", ""), ("er", "e"), ("est", "e"))
# Words that name one thing in the plural; kept as they are.
PLURALIA_TANTUM = frozenset(
    "jeans pants trousers shorts glasses sunglasses eyeglasses goggles clothes scissors binoculars stairs "
    "overalls leggings tights pajamas pyjamas headphones earphones earmuffs tongs pliers suspenders "
    "swimtrunks trunks bleachers cattle police people graffiti".split()
)
_POS_INDEX = {"n": 0, "v": 1, "a": 2, "r": 3}


def _count(lex: Lexicon, word: str, pos: str) -> int:
    c = lex.counts.get(word)
    return -1 if c is None else c[_POS_INDEX[pos]]


def _morphy(lex: Lexicon, word: str, pos: str) -> list[str]:
    """Lemmas of ``word`` for one part of speech, most likely first (exceptions, rules, itself)."""
    exc, rules = {"n": (lex.noun_exc, _NOUN_RULES), "v": (lex.verb_exc, _VERB_RULES),
                  "a": (lex.adj_exc, _ADJ_RULES)}.get(pos, ({}, ()))
    out = [exc[word]] if word in exc and _count(lex, exc[word], pos) >= 0 else []
    for old, new in rules:
        if word.endswith(old) and len(word) > len(old) + 1:
            lemma = word[: len(word) - len(old)] + new
            if _count(lex, lemma, pos) >= 0 and lemma not in out:
                out.append(lemma)
    if _count(lex, word, pos) >= 0 and word not in out:
        out.append(word)
    return out


def singular(word: str, lex: Lexicon | None = None) -> str:
    """The singular of a (lower-case) noun: ``"dogs"`` -> ``"dog"``, ``"women"`` -> ``"woman"``.

    Args:
        word: a lower-case word.
        lex: the lexicon (default: the shipped one).
    """
    lex = lex or load_lexicon()
    if word in PLURALIA_TANTUM:
        return word
    if word in lex.noun_exc:
        return lex.noun_exc[word]
    own = _count(lex, word, "n")
    for lemma in _morphy(lex, word, "n"):
        if lemma == word:
            break
        # "arms" -> "arm" (109 vs 11 SemCor tags) but "woods" stays "woods" (43 vs 24).
        if own < 0 or _count(lex, lemma, "n") >= own:
            return lemma
    if own <= 0 and word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        # Unknown or untagged plural whose singular WordNet lacks: "selfies" -> "selfie", "bikers" -> "biker".
        if own < 0 or (not word.endswith("ies") and word[:-1] not in lex.counts):
            return word[:-1]
    return word


# ----------------------------------------------------------------------------- offline tagger
# Coarse tags: N noun, V verb, G verb -ing form, J adjective, R adverb, D determiner/number/possessive,
# P preposition, C conjunction, X pronoun, A auxiliary/modal, T "to", M proper name, O punctuation/edge.
_CLOSED: dict[str, str] = {}
for _tag, _words in {
    "D": "a an the this that these those some any each every no another either neither all both several "
         "many much few more most other such what which whose my your his its our their "
         "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand",
    "X": "i me you he him she her it we us they them myself yourself himself herself itself ourselves "
         "themselves someone somebody something anyone anybody anything everyone everybody everything "
         "nobody nothing who whom whoever whatever 's",
    "P": "about above across after against along alongside amid amidst among amongst around as at atop "
         "before behind below beneath beside besides between beyond by during except for from in into "
         "like near of off on onto opposite over past per since than through throughout toward towards "
         "under underneath unlike until upon via with within without aboard up down out inside outside",
    "C": "and or but nor so yet while whilst because although though if whether then where when how why whereas",
    "A": "am is are was were be been being has have had do does did can could will would shall should may "
         "might must",
    "R": "not there here very too also just only again upside",
    "T": "to",
}.items():
    for _w in _words.split():
        _CLOSED[_w] = _tag
# Function words with more than one reading: probability of each tag.
_CLOSED_MULTI = {
    "her": {"D": 0.6, "X": 0.4},  # "her dog" / "hugs her"
    "that": {"D": 0.4, "C": 0.6},
    "as": {"P": 0.5, "C": 0.5},
    "up": {"P": 0.5, "R": 0.5},
    "down": {"P": 0.5, "R": 0.5},
    "out": {"P": 0.4, "R": 0.6},
    "inside": {"P": 0.6, "R": 0.4},
    "outside": {"P": 0.4, "R": 0.6},
    "off": {"P": 0.5, "R": 0.5},
    "around": {"P": 0.6, "R": 0.4},
    "over": {"P": 0.8, "R": 0.2},
}
_CLOSED.update({w: max(ts, key=ts.__getitem__) for w, ts in _CLOSED_MULTI.items()})
_NOT_NOUNS = frozenset(_CLOSED)  # never returned by either backend
# Suffixes of unknown words that make adjectives ("shirtless", "colourful").
_ADJ_SUFFIXES = ("less", "ful", "ous", "ive", "able", "ible", "ish", "ic", "al", "y")
_TAGS = "NVGJRDPCXATMO"

# Transition weights P(next | previous), hand-set from English caption grammar; unlisted pairs get
# a small floor. "O" is the sentence edge and punctuation.
_TRANS_RAW = {
    "O": "D:.35 N:.2 X:.08 J:.1 V:.04 G:.06 P:.06 R:.04 C:.03 A:.02 M:.05 O:.05",
    "D": "N:.6 J:.3 R:.02 G:.04 V:.01 D:.03 M:.03 O:.02",
    "J": "N:.7 J:.12 C:.05 P:.05 G:.02 V:.01 T:.03 O:.05",
    "N": "P:.27 V:.14 G:.13 N:.12 C:.09 A:.09 O:.08 R:.03 J:.01 X:.01 T:.02 D:.01",
    "M": "P:.2 V:.15 G:.12 N:.05 M:.2 C:.1 A:.1 O:.08",
    "V": "D:.35 P:.25 R:.1 N:.1 J:.06 T:.04 X:.05 C:.03 G:.01 O:.04",
    "G": "D:.33 P:.35 N:.1 R:.06 J:.05 T:.03 X:.04 C:.03 O:.06",
    "A": "G:.4 V:.17 J:.13 D:.1 R:.08 P:.05 N:.03 X:.02 A:.05",
    "P": "D:.55 N:.25 J:.1 X:.05 G:.03 M:.05",
    "C": "D:.25 N:.2 J:.1 V:.1 G:.1 X:.05 R:.05 P:.05 A:.04 M:.03",
    "X": "V:.3 A:.25 G:.1 P:.1 D:.05 N:.02 J:.03 R:.05 O:.1 C:.03",
    "T": "V:.8 D:.1 N:.04 J:.02 G:.01 M:.02",
    "R": "J:.15 G:.15 V:.15 P:.2 D:.1 N:.04 R:.05 O:.1 C:.06",
}
_FLOOR = 1e-3


def _log_trans() -> dict[str, dict[str, float]]:
    table = {}
    for prev in _TAGS:
        probs = {t: _FLOOR for t in _TAGS}
        for item in _TRANS_RAW.get(prev, "").split():
            t, p = item.split(":")
            probs[t] = float(p)
        total = sum(probs.values())
        table[prev] = {t: math.log(p / total) for t, p in probs.items()}
    return table


_LOG_TRANS = _log_trans()


def _emissions(lex: Lexicon, token: str, first: bool) -> dict[str, float]:
    """Log-weights of the coarse tags a token can take (its lexicon counts, smoothed)."""
    if not token[0].isalpha():
        return {"D": 0.0} if token[0].isdigit() else {"O": 0.0}
    word = token.lower()
    if word in _CLOSED_MULTI:
        return {t: math.log(p) for t, p in _CLOSED_MULTI[word].items()}
    if word in _CLOSED:
        return {_CLOSED[word]: 0.0}
    weights: dict[str, float] = {}
    noun = max([_count(lex, m, "n") for m in _morphy(lex, word, "n")], default=-1)
    if noun >= 0:
        weights["N"] = noun + 1.0
    verb = max([_count(lex, m, "v") for m in _morphy(lex, word, "v")], default=-1)
    if verb >= 0:
        weights["G" if word.endswith("ing") else "V"] = verb + 1.0
    adj = max([_count(lex, m, "a") for m in _morphy(lex, word, "a")], default=-1)
    if adj >= 0:
        weights["J"] = adj + 1.0
    adv = _count(lex, word, "r")
    if adv >= 0:
        weights["R"] = adv + 1.0
    if not weights:  # unknown word: guess from its shape
        if token[0].isupper() and not first:
            weights = {"M": 1.0}
        elif word.endswith("ing"):
            weights = {"G": 0.7, "N": 0.3}
        elif word.endswith("ed"):
            weights = {"V": 0.7, "J": 0.3}
        elif word.endswith("ly"):
            weights = {"R": 0.8, "J": 0.2}
        elif word.endswith(_ADJ_SUFFIXES):
            weights = {"J": 0.7, "N": 0.3}
        else:
            weights = {"N": 0.8, "J": 0.2}
    total = sum(weights.values())
    return {t: math.log(w / total) for t, w in weights.items()}


def tag_offline(tokens: Sequence[str], lex: Lexicon | None = None) -> list[str]:
    """Coarse tags (see ``_TAGS``) for ``tokens`` by a Viterbi pass over the lexicon's weights.

    Args:
        tokens: tokens from ``tokenize`` (case kept).
        lex: the lexicon (default: the shipped one).
    """
    lex = lex or load_lexicon()
    if not tokens:
        return []
    # best[t] = (log-score, path) of the best tag sequence ending in tag t.
    best: dict[str, tuple[float, list[str]]] = {"O": (0.0, [])}
    for i, tok in enumerate(tokens):
        emit = _emissions(lex, tok, first=i == 0)
        step = {}
        for t, e in emit.items():
            score, path = max(((s + _LOG_TRANS[p][t], pth) for p, (s, pth) in best.items()), key=lambda x: x[0])
            step[t] = (score + e, path + [t])
        best = step
    return max(((s + _LOG_TRANS[t]["O"], pth) for t, (s, pth) in best.items()), key=lambda x: x[0])[1]


# ----------------------------------------------------------------------------- NLTK backend
@functools.lru_cache(maxsize=1)
def nltk_tagger_resource() -> str | None:
    """The NLTK tagger resource found on ``nltk.data.path``, or None (cached; ``.cache_clear()``)."""
    try:
        import nltk
    except ImportError:
        return None
    for name in NLTK_TAGGER_RESOURCES:
        try:
            nltk.data.find(name)
            return name
        except LookupError:
            continue
    return None


def _nltk_tags(tokens: Sequence[str]) -> list[str]:
    try:
        import nltk
    except ImportError:
        raise RuntimeError("nltk is not installed: pip install 'groupseg[train]', or use backend='offline'") from None
    if nltk_tagger_resource() is None:
        raise LookupError(
            f"NLTK resource '{NLTK_TAGGER_RESOURCES[0]}' not found on nltk.data.path: run "
            "`python -m nltk.downloader averaged_perceptron_tagger_eng`, or use backend='offline'"
        )
    return [tag for _, tag in nltk.pos_tag(list(tokens))]


# ----------------------------------------------------------------------------- public API
def tokenize(caption: str) -> list[str]:
    """Words (case kept), numbers, ``'s`` and single punctuation marks of a caption."""
    return _TOKEN.findall(caption)


def extract_nouns(caption: str, max_nouns: int | None = None, backend: Backend = "auto") -> list[str]:
    """The nouns of a caption, lower-case and singular, in order of appearance, without repeats.

    Args:
        caption: one English sentence.
        max_nouns: keep at most this many (the first ones); None keeps all.
        backend: ``"nltk"`` (NLTK ``pos_tag``, tags NN/NNS), ``"offline"`` (shipped WordNet
            lexicon + rules), or ``"auto"``: NLTK when its tagger data is installed, else offline.

    Raises:
        LookupError: ``backend="nltk"`` and NLTK's tagger data is not installed.

    >>> extract_nouns("A man and two women walk their dogs .", backend="offline")
    ['man', 'woman', 'dog']
    """
    if backend not in ("auto", "nltk", "offline"):
        raise ValueError(f"unknown backend {backend!r}: use 'auto', 'nltk' or 'offline'")
    tokens = tokenize(caption)
    if not tokens or (max_nouns is not None and max_nouns <= 0):
        return []
    lex = load_lexicon()
    if backend == "nltk" or (backend == "auto" and nltk_tagger_resource() is not None):
        keep = [tag in NLTK_NOUN_TAGS for tag in _nltk_tags(tokens)]
    else:
        keep = [tag == "N" for tag in tag_offline(tokens, lex)]
    nouns: list[str] = []
    for tok, is_noun in zip(tokens, keep):
        word = tok.lower()
        if not is_noun or len(word) < 2 or not word.isalpha() or word in _NOT_NOUNS:
            continue
        lemma = singular(word, lex)
        if lemma not in nouns:
            nouns.append(lemma)
            if max_nouns is not None and len(nouns) >= max_nouns:
                break
    return nouns


def build_prompts(
    caption: str,
    nouns: Sequence[str],
    templates: Sequence[str] = ("a photo of a {}.",),
    k: int = 3,
    rng: random.Random | None = None,
    pad: Literal["repeat", "caption"] = "repeat",
) -> list[str]:
    """Exactly ``k`` prompt texts for one caption, for the multi-label contrastive loss.

    The rule:
    1. Nouns: when there are more than ``k``, ``k`` distinct ones drawn without replacement
       (``rng.sample``), in the order drawn; otherwise all of them, in order.
    2. Each chosen noun gets a template drawn with ``rng.choice(templates)``.
    3. Fewer than ``k`` prompts: with ``pad="repeat"`` (default) the missing ones are more
       prompts made from nouns drawn with replacement (``rng.choice(nouns)``, fresh template);
       with ``pad="caption"`` they are the caption itself, as NVlabs GroupViT does.
    4. No noun at all: every prompt is the caption itself (both ``pad`` modes).

    Args:
        caption: the caption the nouns came from.
        nouns: its nouns (e.g. from ``extract_nouns``).
        templates: strings with one ``{}``.
        k: number of prompts returned.
        rng: source of randomness (default: a fresh unseeded ``random.Random``).
        pad: how to fill up when there are fewer than ``k`` nouns.

    >>> build_prompts("A dog .", ["dog"], k=2)
    ['a photo of a dog.', 'a photo of a dog.']
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("templates must be a non-empty list of strings with '{}'")
    rng = rng or random.Random()
    nouns = list(nouns)
    if not nouns:
        return [caption] * k
    chosen = rng.sample(nouns, k) if len(nouns) > k else nouns
    prompts = [rng.choice(templates).format(n) for n in chosen]
    while len(prompts) < k:
        if pad == "caption":
            prompts.append(caption)
        else:
            prompts.append(rng.choice(templates).format(rng.choice(nouns)))
    return prompts
