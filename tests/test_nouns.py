"""Noun extraction for training prompts: the offline tagger always, NLTK when its data is present."""
import gzip
import random
from pathlib import Path

import pytest

import groupseg.training.nouns as nouns
from groupseg.training.build_noun_lexicon import build
from groupseg.training.nouns import build_prompts, extract_nouns, singular

WORDNET = Path("/usr/share/wordnet")
needs_nltk_data = pytest.mark.skipif(
    nouns.nltk_tagger_resource() is None,
    reason="NLTK tagger data (taggers/averaged_perceptron_tagger_eng) not installed; the offline path is tested",
)


def offline(caption, **kw):
    return extract_nouns(caption, backend="offline", **kw)


# ----------------------------------------------------------------------------- offline path
def test_offline_example_caption():
    assert offline("Two dogs are running through the grass .") == ["dog", "grass"]


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("A man and two women walk their dogs .", ["man", "woman", "dog"]),
        ("The children play with boxes near the benches .", ["child", "box", "bench"]),
        ("Three men with bare feet stand on the rocks .", ["man", "foot", "rock"]),
        ("A girl in jeans and sunglasses sits on the stairs .", ["girl", "jeans", "sunglasses", "stairs"]),
        ("A little girl climbing into a wooden playhouse .", ["girl", "playhouse"]),
        ("A dog runs and jumps over a log in the woods .", ["dog", "log", "woods"]),
        ("A boy is sitting in front of a building", ["boy", "front", "building"]),
    ],
)
def test_offline_nouns_singular_in_order(caption, expected):
    assert offline(caption) == expected


def test_offline_deduplicates_and_limits():
    caption = "A dog chases another dog and a cat while a bird watches the cats ."
    assert offline(caption) == ["dog", "cat", "bird"]
    assert offline(caption, max_nouns=2) == ["dog", "cat"]
    assert offline(caption, max_nouns=0) == []


def test_offline_no_noun_and_function_words():
    assert offline("He is running quickly .") == []
    assert offline("") == []
    assert offline("... !!") == []
    # pronouns, numbers and determiners never come back, even where a tagger might call them nouns
    assert offline("Someone holds something near everyone .") == []
    assert offline("One of the 3 dogs") == ["dog"]


def test_verbs_after_to_and_is_are_not_nouns():
    assert offline("A woman is going to walk her dog .") == ["woman", "dog"]
    assert offline("The children are swinging on the swings .") == ["child", "swing"]
    assert offline("A dog likes to run on the beach .") == ["dog", "beach"]


@pytest.mark.parametrize(
    "word, lemma",
    [("dogs", "dog"), ("children", "child"), ("women", "woman"), ("boxes", "box"), ("puppies", "puppy"),
     ("glasses", "glasses"), ("jeans", "jeans"), ("grass", "grass"), ("bus", "bus"), ("selfies", "selfie")],
)
def test_singular(word, lemma):
    assert singular(word) == lemma


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        extract_nouns("a dog", backend="spacy")


def test_auto_uses_offline_without_nltk_data(monkeypatch):
    monkeypatch.setattr(nouns, "nltk_tagger_resource", lambda: None)
    assert extract_nouns("Two dogs are running through the grass .") == ["dog", "grass"]


def test_nltk_backend_without_data_names_the_resource(monkeypatch, tmp_path):
    nltk = pytest.importorskip("nltk")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    nouns.nltk_tagger_resource.cache_clear()
    try:
        with pytest.raises(LookupError) as err:
            extract_nouns("a dog", backend="nltk")
    finally:
        nouns.nltk_tagger_resource.cache_clear()
    msg = str(err.value)
    assert "\n" not in msg
    assert "averaged_perceptron_tagger_eng" in msg and "backend='offline'" in msg


# ----------------------------------------------------------------------------- NLTK path
@needs_nltk_data
def test_nltk_backend_example_caption():
    assert extract_nouns("Two dogs are running through the grass .", backend="nltk") == ["dog", "grass"]
    assert extract_nouns("Two dogs are running through the grass .") == ["dog", "grass"]  # auto picks NLTK


@needs_nltk_data
def test_nltk_and_offline_agree_on_plain_captions():
    captions = [
        "A man and two women walk their dogs .",
        "A child in a pink dress is climbing up a set of stairs in an entry way .",
        "A black dog and a spotted dog are fighting",
    ]
    for c in captions:
        ref, off = set(extract_nouns(c, backend="nltk")), set(offline(c))
        assert len(ref & off) >= 0.7 * max(len(ref), len(off)), (c, ref, off)


# ----------------------------------------------------------------------------- prompts
def test_build_prompts_more_nouns_than_k():
    ns = ["dog", "cat", "bird", "tree", "car"]
    out = build_prompts("caption", ns, k=3, rng=random.Random(0))
    assert len(out) == 3
    chosen = [p.removeprefix("a photo of a ").removesuffix(".") for p in out]
    assert len(set(chosen)) == 3 and set(chosen) <= set(ns)


def test_build_prompts_pads_by_repeating_nouns():
    assert build_prompts("A dog .", ["dog"], k=3) == ["a photo of a dog."] * 3
    out = build_prompts("c", ["dog", "cat"], k=4, rng=random.Random(1))
    assert out[:2] == ["a photo of a dog.", "a photo of a cat."]
    assert set(out[2:]) <= {"a photo of a dog.", "a photo of a cat."}


def test_build_prompts_caption_padding_and_no_noun():
    assert build_prompts("A dog .", ["dog"], k=3, pad="caption") == ["a photo of a dog.", "A dog .", "A dog ."]
    assert build_prompts("Nothing here .", [], k=3) == ["Nothing here ."] * 3
    assert build_prompts("Nothing here .", [], k=2, pad="caption") == ["Nothing here ."] * 2


def test_build_prompts_is_deterministic_with_seeded_rng():
    templates = ("a photo of a {}.", "itap of a {}.", "a bad photo of the {}.")
    ns = ["dog", "cat", "bird", "tree", "car", "boat"]
    a = [build_prompts("c", ns, templates, k=3, rng=random.Random(7)) for _ in range(2)]
    assert a[0] == a[1]
    many = {tuple(build_prompts("c", ns, templates, k=3, rng=random.Random(s))) for s in range(20)}
    assert len(many) > 1  # the seed matters


def test_build_prompts_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        build_prompts("c", ["dog"], k=0)
    with pytest.raises(ValueError, match="templates"):
        build_prompts("c", ["dog"], templates=("no slot",))


# ----------------------------------------------------------------------------- lexicon
def test_shipped_lexicon_is_small_and_complete():
    path = nouns.lexicon_path()
    assert path.is_file() and path.stat().st_size < 1_000_000
    lex = nouns.load_lexicon()
    assert len(lex.counts) > 50_000
    assert lex.noun_exc["children"] == "child" and lex.verb_exc["ran"] == "run"
    n, v, a, r = lex.counts["dog"]
    assert n > v >= 0 and a == r == -1


@pytest.mark.skipif(not (WORDNET / "index.noun").is_file(), reason="WordNet not installed (apt-get install wordnet-base)")
def test_lexicon_rebuilds_identically(tmp_path):
    out = tmp_path / "nouns.tsv.gz"
    build(WORDNET, out)
    with gzip.open(out, "rt") as new, gzip.open(nouns.lexicon_path(), "rt") as shipped:
        assert new.read() == shipped.read()

