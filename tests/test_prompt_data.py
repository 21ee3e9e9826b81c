"""The shipped prompt data: templates have one slot, vocabularies have the right classes in order."""
import pytest

from groupseg.prompting import (
    list_templates,
    load_templates,
    normalize_vocab,
    parse_class,
    prompts_dir,
    read_vocab_file,
    shipped_vocab,
)

VOCAB_SIZES = {
    "camvid": 11,
    "voc": 20,
    "context59": 59,
    "coco_object": 80,
    "coco_stuff": 171,
    "ade20k": 150,
    "cityscapes": 19,
}


@pytest.mark.parametrize("name", ["simple", "short", "imagenet80"])
def test_templates_have_exactly_one_slot(name):
    templates = load_templates(name)
    assert all(t.count("{}") == 1 for t in templates)
    assert all("{" not in t.replace("{}", "") and "}" not in t.replace("{}", "") for t in templates)
    assert len(set(templates)) == len(templates)


def test_template_sets():
    assert {"simple", "short", "imagenet80"} <= set(list_templates())
    assert len(load_templates("imagenet80")) == 80
    assert 7 <= len(load_templates("short")) <= 10
    assert load_templates("short")[0] == "a photo of a {}."
    assert set(load_templates("short")) <= set(load_templates("imagenet80")) | {"a close-up photo of a {}."}


@pytest.mark.parametrize("name, size", sorted(VOCAB_SIZES.items()))
def test_vocab_size_and_unique_names(name, size):
    entries = shipped_vocab(name)
    assert len(entries) == size
    normalize_vocab(entries)  # raises on a duplicated label
    names = [n.lower() for e in entries for n in parse_class(e)]
    assert len(names) == len(set(names)), "a synonym names two classes"


@pytest.mark.parametrize(
    "name, index, label",
    [
        ("camvid", 0, "sky"), ("camvid", 4, "pavement"), ("camvid", 10, "bicyclist"),
        ("voc", 0, "aeroplane"), ("voc", 10, "dining table"), ("voc", 19, "tv monitor"),
        ("context59", 0, "aeroplane"), ("context59", 3, "bedclothes"), ("context59", 36, "person"),
        ("context59", 58, "wood"),
        ("coco_object", 0, "person"), ("coco_object", 62, "tv"), ("coco_object", 79, "toothbrush"),
        ("coco_stuff", 80, "banner"), ("coco_stuff", 84, "building"), ("coco_stuff", 161, "wall"),
        ("coco_stuff", 170, "wood"),
        ("ade20k", 0, "wall"), ("ade20k", 7, "bed"), ("ade20k", 12, "person"), ("ade20k", 149, "flag"),
        ("cityscapes", 0, "road"), ("cityscapes", 11, "person"), ("cityscapes", 18, "bicycle"),
    ],
)
def test_vocab_label_order(name, index, label):
    assert parse_class(shipped_vocab(name)[index])[0] == label


def test_coco_object_matches_coco_stuff_things():
    things = [parse_class(e)[0] for e in shipped_vocab("coco_object")]
    stuff = [parse_class(e)[0] for e in shipped_vocab("coco_stuff")]
    assert stuff[:80] == things


def test_nouns_large():
    words = shipped_vocab("nouns_large")
    assert 1000 <= len(words) <= 3000
    assert len(set(words)) == len(words)
    assert all(";" not in w and w == w.strip().lower() for w in words)
    assert {"dog", "person", "car", "tree", "building", "beach"} <= set(words)
    header = (prompts_dir() / "vocab" / "nouns_large.txt").read_text().splitlines()[0]
    assert header.startswith("#")


def test_vocab_files_have_a_source_comment():
    for name in [*VOCAB_SIZES, "nouns_large"]:
        path = prompts_dir() / "vocab" / f"{name}.txt"
        assert path.read_text().startswith("#"), path
        assert read_vocab_file(path) == shipped_vocab(name)
