"""End-to-end segmentation latency with a 1,000-word vocabulary: groupseg vs transformers' GroupViT.

    python benchmarks/segment.py --weights runs/flickr8k-default/model [--image docs/rocket.jpg] [--threads 2]

groupseg: ``Segmenter.segment`` on a photo resized to a 448 px short side, the first call
(1,000 new words, prompt encoding included) and later calls (cached text embeddings), with the
prompt encoder in fp32 and in bf16 autocast (``text_precision``), alternating in one run.
transformers: ``GroupViTModel(output_segmentation=True)`` of the published gvit-s config (random
weights: only the time matters) at 224 px, the only size it accepts, with the same 1,000 words in
one template (it has no text cache: every call encodes the prompts, padded to 77 tokens).

``--window N`` segments in N-px sliding windows (what fine-tuned weights do by default, at their
crop size) and also times, in the same run, merging the windows' scores per region of the window
overlay (``groupseg.segment._WindowMerge``, the code path) against per pixel (the previous code,
kept here as the reference), alternating, on the same model outputs, and checks they agree.

The output starts with the machine (CPU model and flags) and a same-run matmul peak per precision;
every figure line names the CPU kind; bf16 rows say "not measured (no native bf16)" on CPUs without it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _machine import NOT_NATIVE_BF16, bf16_native, cpu_tag, print_header
from groupseg.prompting import DEFAULT_TEMPLATES


def time_groupseg(weights, image, vocab, templates, precision, repeats, window=None) -> tuple[float, float, float]:
    from groupseg.segment import Segmenter

    seg = Segmenter.from_pretrained(weights, templates=templates, text_precision=precision, window=window)
    t0 = time.perf_counter()
    first = seg.segment(image, vocab)
    t_first = time.perf_counter() - t0
    later = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        seg.segment(image, vocab)
        later.append(time.perf_counter() - t0)
    return t_first, first.timing["text"], statistics.median(later)


def per_pixel_merge(parts, h: int, w: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous merge: every window's scores for 64 classes at a time at full resolution, averaged."""
    conf, label = torch.full((h, w), -1.0), torch.zeros((h, w), dtype=torch.long)
    for c0 in range(0, C, 64):
        acc, count = torch.zeros(min(64, C - c0), h, w), torch.zeros(h, w)
        for y, x, probs, gidx in parts:
            s = probs[:, c0 : c0 + 64].T[:, gidx]
            acc[:, y : y + s.shape[1], x : x + s.shape[2]] += s
            count[y : y + s.shape[1], x : x + s.shape[2]] += 1
        v, i = (acc / count).max(0)
        better = v > conf
        conf, label = torch.where(better, v, conf), torch.where(better, i + c0, label)
    return conf, label


def time_window_merge(weights, image, vocab, templates, window, repeats) -> tuple[int, int, float, float]:
    from groupseg.segment import Segmenter, _WindowMerge
    from groupseg.transforms import load_image, target_size, to_tensor

    seg = Segmenter.from_pretrained(weights, templates=templates, window=window)
    _, text, owner = seg.class_embeddings(vocab)
    img = load_image(image)
    h, w = target_size(img.size[1], img.size[0], seg.short_side, seg.cfg.vision.patch_size)
    parts = seg._windows(to_tensor(img, (h, w), seg.cfg.image_mean, seg.cfg.image_std), text, owner, len(vocab), seg.top_k)
    old, new = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ref_conf, ref_label = per_pixel_merge(parts, h, w, len(vocab))
        old.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        merged = _WindowMerge(parts, h, w)
        conf, label = merged.best()
        new.append(time.perf_counter() - t0)
    agree = (label[merged.region] == ref_label).float().mean().item()
    assert agree > 0.999 and torch.allclose(conf[merged.region], ref_conf, atol=1e-6), "merges disagree"
    return len(parts), len(merged.count), statistics.median(old), statistics.median(new)


def time_transformers(vocab, repeats) -> tuple[float, float]:
    from transformers import GroupViTConfig, GroupViTModel

    from groupseg.tokenizer import tokenize

    model = GroupViTModel(GroupViTConfig()).eval()
    ids = tokenize([f"a photo of a {w}." for w in vocab], 77)
    px = torch.randn(1, 3, 224, 224)
    times, img_times = [], []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model(input_ids=ids, pixel_values=px, output_segmentation=True)
            times.append(time.perf_counter() - t0)
            assert out.segmentation_logits.shape[1] == len(vocab)
            t0 = time.perf_counter()
            model.get_image_features(pixel_values=px)
            img_times.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.median(img_times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="weights to time (default: groupseg's default weights)")
    p.add_argument("--image", default="docs/rocket.jpg")
    p.add_argument("--words", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="alternating fp32 / bf16 rounds of the first call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--templates", default=DEFAULT_TEMPLATES)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--window", type=int, default=None, help="sliding-window side (default: the weights' own)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from groupseg.prompting import load_templates, shipped_vocab

    print_header(("fp32", "bf16"))
    tag = cpu_tag()
    vocab = shipped_vocab("nouns_large")[: args.words]
    n_t = len(load_templates(args.templates))
    print(f"{len(vocab)} words x {n_t} templates ({args.templates}), {args.image} at a 448 px short side, "
          f"{args.threads} threads, window: {args.window}")
    if args.window:
        n, regions, old, new = time_window_merge(args.weights, args.image, vocab, args.templates, args.window, args.repeats)
        print(f"window merge ({n} windows, {regions} regions): per pixel {old:.3f} s, per region {new:.3f} s: "
              f"{old / new:.1f}x faster (same run, same model outputs, labels agree) {tag}")
    precisions = ("fp32", "bf16") if bf16_native() else ("fp32",)
    res: dict[str, list] = {p: [] for p in precisions}
    for _ in range(args.rounds):
        for prec in precisions:
            res[prec].append(time_groupseg(args.weights, args.image, vocab, args.templates, prec, args.repeats, args.window))
    for prec, rows in res.items():
        first = statistics.median(r[0] for r in rows)
        text = statistics.median(r[1] for r in rows)
        cached = statistics.median(r[2] for r in rows)
        print(f"groupseg text {prec}: first call {first:.2f} s (prompt encoding {text:.2f} s), cached calls {cached:.3f} s {tag}")
    if "bf16" not in res:
        print(f"groupseg text bf16: {NOT_NATIVE_BF16} {tag}")
    else:
        f32 = statistics.median(r[0] for r in res["fp32"])
        b16 = statistics.median(r[0] for r in res["bf16"])
        print(f"first call, bf16 vs fp32 prompt encoding: {f32 / b16:.2f}x faster {tag}")
    if not args.no_transformers:
        full, img = time_transformers(vocab, max(2, args.repeats // 2))
        print(f"transformers GroupViT (224 px, {len(vocab)} prompts x 1 template, every call): {full:.2f} s per call; "
              f"image tower alone {img:.3f} s; 448 px: not possible (fixed input size) {tag}")


if __name__ == "__main__":
    main()
