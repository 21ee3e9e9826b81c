"""``groupseg eval``: zero-shot mIoU on segmentation benchmarks (the paper's protocol or groupseg's),
the unsupervised (Hungarian) protocol, and image-text retrieval on Flickr8k; a results JSON, a
console table and pictures. ``python -m groupseg.eval.main`` runs the same options on its own."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from groupseg.argtypes import float_range, int_range

from .datasets import DATASETS, hold_out_sequence, load_dataset
from .report import command_line, print_table, write_json

EXAMPLES = """examples:
  groupseg eval --dataset voc --data-root data/ --weights gvit-yfcc/ --out voc.json --gallery voc.png
  groupseg eval --dataset voc --data-root data/ --weights gvit-yfcc/ --protocol groupseg --window 224
  groupseg eval --dataset camvid --data-root data/camvid --device cuda --confusion camvid_cm.png
  groupseg eval --dataset folder --data-root mydata/ --vocab-file mydata/classes.txt
  groupseg eval --dataset cityscapes --data-root data/ --protocol unsupervised
  groupseg eval --dataset flickr8k --data-root data/flickr8k --split dev

protocols: paper = GroupViT's, exactly as NVlabs' code (default for voc, context, coco-object: their
names, 'simple' template, keep-ratio resize to 2048x448, 448 crops at stride 224, top-5 classes,
background below min(threshold, best segment)); groupseg = groupseg's own settings (the default
elsewhere: synonym vocabularies, --short-side, --window, --flip, --scales, --pamr, plain threshold).
"""
PROTOCOL_CHOICES = ("paper", "groupseg", "unsupervised", "zero-shot")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The ``groupseg eval`` options."""
    p.epilog = EXAMPLES
    p.add_argument("--dataset", required=True, choices=[*DATASETS, "flickr8k"], metavar="NAME",
                   help=f"benchmark: {', '.join(DATASETS)}, flickr8k (retrieval)")
    p.add_argument("--data-root", required=True, help="folder the dataset was unpacked into")
    p.add_argument("--split", default="val", help="split (default: val; flickr8k: dev or test)")
    p.add_argument("--holdout-sequence", default="", metavar="SEQ",
                   help="evaluate only this video sequence's frames of the split (leave-one-sequence-out: "
                        "the sequence a 'groupseg finetune --holdout-sequence SEQ' run never saw)")
    p.add_argument("--weights", help="weights directory or file, or a hub id as hf-hub:OWNER/NAME (default: see README)")
    p.add_argument("--protocol", choices=PROTOCOL_CHOICES, default=None,
                   help="paper (GroupViT's, default for voc/context/coco-object), groupseg (default elsewhere), "
                   "unsupervised (k-means over the dataset + Hungarian matching); zero-shot = the benchmark's default")
    p.add_argument("--vocab-file", help="class names, one per line in label order (required for 'folder'; replaces the shipped list otherwise)")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--save-predictions", metavar="DIR", help="write STEM.png label maps (vocabulary indices, 255 = background)")
    p.add_argument("--threshold", type=float_range(0, 1), help="background threshold in [0, 1] (default: the benchmark's, e.g. 0.95 for voc, 0 without background)")
    p.add_argument("--templates", default=None, help="prompt template set or file (default: simple)")
    p.add_argument("--window", type=int_range(0), default=None,
                   help="sliding-window (crop) size in pixels, a multiple of the patch size (0 = whole image; default: paper 448, "
                   "groupseg the weights' own, else 0)")
    p.add_argument("--top-k", type=int_range(0), default=None,
                   help="keep only each image's k most likely classes (0 = all; default: paper 5, groupseg 0)")
    p.add_argument("--short-side", type=int_range(1), default=None, help="groupseg protocol: resize the short side to this (default: 448)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="groupseg protocol: average class scores with the mirrored image (default: off); unsupervised protocol with "
                   "a STEGO head: its cluster scores (default: the weights' own, on for groupseg discover's since 2026-12-02)")
    p.add_argument("--groupings", type=int_range(1), default=None, metavar="N",
                   help="use only the first N grouping stages' segments (default: all; 1 = finer segments)")
    p.add_argument("--pamr", action=argparse.BooleanOptionalAction, default=None,
                   help="groupseg and unsupervised protocols: refine boundaries onto image edges with PAMR (as TCL); "
                   "default: the weights' own (off, except the clusters of weights from groupseg discover)")
    p.add_argument("--scales", default=None, help="groupseg protocol: comma-separated short-side factors whose class scores are averaged, e.g. 0.75,1,1.25")
    p.add_argument("--limit", type=int_range(0), default=0, help="evaluate only the first N images (0 = all)")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--clusters", type=int_range(0), default=0, help="unsupervised protocol: K (default: the number of classes)")
    p.add_argument("--linear-probe", default="", metavar="SPLIT",
                   help="unsupervised protocol, weights from groupseg discover: also report STEGO's linear probe, a linear "
                        "classifier fitted on the codes of 1,000 labelled pixels of each image of SPLIT (e.g. train; "
                        "without --holdout-sequence's frames)")
    p.add_argument("--gallery", metavar="PNG", help="picture of the 3 best and 3 worst images: image / truth / prediction")
    p.add_argument("--confusion", metavar="PNG", help="picture of the row-normalised confusion matrix")


def make_segmenter(args, threshold: float = 0.0, protocol: str = "groupseg"):
    """(Segmenter, weights name) for these options."""
    from groupseg.argtypes import resolve_device
    from groupseg.pretrained import resolve_weights
    from groupseg.segment import Segmenter

    weights = resolve_weights(args.weights)
    seg = Segmenter.from_pretrained(weights, device=resolve_device(args.device), templates=args.templates,
                                    short_side=args.short_side or 448, window=args.window, top_k=args.top_k,
                                    threshold=threshold, refine={True: "pamr", False: "", None: None}[args.pamr], groupings=args.groupings,
                                    protocol="groupseg" if protocol == "unsupervised" else protocol)
    return seg, str(weights)


def _processes():
    """(world size, rank, state): under `accelerate launch` (or torchrun) every process takes its share."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1, 0, None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available())
    return state.num_processes, state.process_index, state


def run_eval(args: argparse.Namespace) -> int:
    """Run ``groupseg eval``; returns the exit code."""
    if args.dataset == "flickr8k":
        from .retrieval import run_retrieval

        return run_retrieval(args, make_segmenter, add_eval_args)
    from .zero_shot import evaluate_zero_shot, resolve_protocol, settings, vocabulary

    ds = load_dataset(args.dataset, args.data_root, args.split, args.vocab_file)
    if args.holdout_sequence:
        ds = hold_out_sequence(ds, args.holdout_sequence, keep="held")
    protocol = resolve_protocol(args, ds)
    samples = ds.samples[: args.limit] if args.limit > 0 else ds.samples
    threshold = ds.default_threshold if args.threshold is None else args.threshold
    vocab = vocabulary(ds, protocol, bool(args.vocab_file))
    if args.clusters and protocol != "unsupervised":
        raise ValueError("--clusters applies to --protocol unsupervised (for one image: groupseg segment --clusters K)")
    if protocol == "unsupervised" and args.scales not in (None, "1"):
        raise ValueError("--scales applies to the zero-shot protocols only")
    if args.linear_probe and protocol != "unsupervised":
        raise ValueError("--linear-probe applies to --protocol unsupervised")
    probe_fit = _probe_split(args, ds) if args.linear_probe else None
    if args.top_k and args.top_k > len(vocab):
        raise ValueError(f"--top-k {args.top_k} is larger than the vocabulary ({len(vocab)} classes)")
    world, rank, state = _processes()
    if world > 1:
        if protocol == "unsupervised":
            raise ValueError("--protocol unsupervised clusters the whole dataset at once: run it in one process")
        args.device = str(state.device) if args.device in (None, "auto") else args.device
        print(f"process {rank} of {world}: {len(samples[rank::world])} of {len(samples)} images", file=sys.stderr)
    seg, weights = make_segmenter(args, threshold, protocol)
    if probe_fit is not None and getattr(seg.model, "stego", None) is None:
        raise ValueError("--linear-probe needs weights with a STEGO head (from groupseg discover)")
    if protocol == "unsupervised" and args.flip is not None and getattr(seg.model, "stego", None) is None:
        raise ValueError("--flip with --protocol unsupervised needs weights with a STEGO head (from groupseg discover)")
    if protocol == "unsupervised":
        cm, per_image, used = _unsupervised(args, seg, ds, samples, probe_fit)
    else:
        cm, per_image = evaluate_zero_shot(seg, ds, samples[rank::world], vocab, args, threshold)
        source = "--vocab-file" if args.vocab_file else ("NVlabs' class names" if vocab is ds.paper_vocab else "groupseg's vocabulary")
        used = settings(seg, protocol, threshold, source)
    if world > 1:
        from accelerate.utils import reduce

        cm.mat = reduce(cm.mat.to(state.device), reduction="sum").cpu()
        if not state.is_main_process:
            return 0  # the main process reports (its gallery shows its own share of the images)
    return _report(args, ds, cm, per_image, len(samples), used, threshold, weights)


def _unsupervised(args, seg, ds, samples, probe_fit):
    """The Hungarian protocol's confusion, gallery and settings; with ``probe_fit``, the linear probe's scores among the settings."""
    from groupseg.stego import cluster_flip, cluster_refinement

    from .unsupervised import evaluate_unsupervised, linear_probe

    cm, per_image = evaluate_unsupervised(seg, ds, samples, args)
    used = {"protocol": "unsupervised", "clusters": args.clusters or ds.num_classes,
            "refine": (cluster_refinement(seg) if getattr(seg.model, "stego", None) is not None else "") or "none",
            "flip": cluster_flip(seg, args.flip)}  # False without a head: --flip was refused there
    if probe_fit is not None:
        res = linear_probe(seg, probe_fit, ds, samples).compute()
        used["linear_probe"] = {"fit_split": args.linear_probe, "fit_images": len(probe_fit.samples),
                                **{k: res[k] for k in ("miou", "pixel_acc", "mean_acc")},
                                "per_class_iou": dict(zip(ds.classes, res["per_class_iou"]))}
        print(f"linear probe (fitted on {args.linear_probe}, {len(probe_fit.samples)} images): "
              f"mIoU {100 * res['miou']:.1f}, pixel acc {100 * res['pixel_acc']:.1f}")
    return cm, per_image, used


def _probe_split(args, ds):
    """The dataset the linear probe is fitted on: ``--linear-probe``'s split without the held-out
    sequence's frames; never the evaluated images themselves."""
    from .datasets import sequence_of

    fit = load_dataset(args.dataset, args.data_root, args.linear_probe, args.vocab_file)
    if args.holdout_sequence and any(sequence_of(s.stem) == args.holdout_sequence for s in fit.samples):
        fit = hold_out_sequence(fit, args.holdout_sequence, keep="rest")
    if not fit.samples:
        raise ValueError(f"--linear-probe {args.linear_probe} has no images left to fit on")
    if {s.image for s in fit.samples} & {s.image for s in ds.samples}:
        raise ValueError(f"--linear-probe {args.linear_probe} would fit on the evaluated images: name another split (e.g. train)")
    if fit.num_classes != ds.num_classes:
        raise ValueError(f"--linear-probe {args.linear_probe} has {fit.num_classes} classes, the evaluated split {ds.num_classes}")
    return fit


def _report(args, ds, cm, per_image, n_images: int, used: dict, threshold: float, weights: str) -> int:
    """The console table, the pictures and the results JSON; every one names the protocol."""
    from groupseg.viz import plot_confusion

    res = cm.compute()
    split = args.split + (f", sequence {args.holdout_sequence} only" if args.holdout_sequence else "")
    print_table(ds.classes, res, n_images, f"{ds.name} ({split}), protocol {used['protocol']}, threshold {threshold:g}")
    if args.confusion:
        plot_confusion(cm.mat, ds.classes, args.confusion, f"{ds.name} {args.split} ({used['protocol']}): mIoU {100 * res['miou']:.1f}")
        print(f"wrote {args.confusion}")
    if args.gallery:
        per_image.save(args.gallery)
        print(f"wrote {args.gallery}")
    results = {
        "dataset": ds.name, "split": args.split, "holdout_sequence": args.holdout_sequence, "protocol": used["protocol"], "settings": used,
        "miou": res["miou"], "per_class_iou": dict(zip(ds.classes, res["per_class_iou"])),
        "pixel_acc": res["pixel_acc"], "mean_acc": res["mean_acc"], "fwiou": res["fwiou"],
        "num_images": n_images, "num_pixels": res["num_pixels"], "threshold": threshold,
        "command": command_line(args, add_eval_args), "weights": weights,
    }
    if args.out:
        write_json(results, args.out)
        print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m groupseg.eval.main ...``: the ``groupseg eval`` options, parsed here."""
    from groupseg.convert import CheckpointError
    from groupseg.transforms import ImageError

    p = argparse.ArgumentParser(prog="python -m groupseg.eval.main", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(p)
    args = p.parse_args(argv)
    try:
        return run_eval(args)
    except (FileNotFoundError, NotADirectoryError, ImageError, CheckpointError, ValueError) as e:
        print(f"{p.prog}: error: {str(e).splitlines()[0] if str(e) else e.__class__.__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
