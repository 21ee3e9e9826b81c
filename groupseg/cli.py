"""The ``groupseg`` command line."""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from .prompting import DEFAULT_TEMPLATES

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def expand_images(items: Sequence[str]) -> list[Path]:
    """Files, directories (their images, sorted) and glob patterns -> image paths."""
    out: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise UserError(f"no images in directory {item}")
            out += found
        elif p.exists():
            out.append(p)
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).suffix.lower() in IMAGE_EXTS)
            if not found:
                raise UserError(f"no images match {item}")
            out += found
        else:
            raise UserError(f"image not found: {item}")
    return out


def _vocab_from_args(args: argparse.Namespace, required: bool = True) -> list[str] | None:
    from .prompting import normalize_vocab, read_vocab_file

    if args.vocab and args.vocab_file:
        raise UserError("give either --vocab or --vocab-file, not both")
    if args.vocab_file:
        return normalize_vocab(read_vocab_file(args.vocab_file))
    if args.vocab is not None:
        return normalize_vocab(args.vocab)
    if required:
        raise UserError("no vocabulary: pass --vocab 'sky,road,car' or --vocab-file words.txt")
    return None


def _add_vocab_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab", help="comma-separated classes; synonyms with ';' (e.g. 'person;pedestrian,car')")
    p.add_argument("--vocab-file", help="file with one class per line (synonyms with ';')")


def _add_image_args(p: argparse.ArgumentParser, out_default: str) -> None:
    """Inputs, vocabulary, weights, output folder and preprocessing: shared by segment and groups."""
    p.add_argument("images", nargs="+", help="image files, directories or glob patterns")
    _add_vocab_args(p)
    _add_model_args(p)
    p.add_argument("--out", default=out_default, help=f"output directory (default: {out_default})")
    p.add_argument("--templates", default=DEFAULT_TEMPLATES, help=f"prompt template set or file (default: {DEFAULT_TEMPLATES})")
    p.add_argument("--short-side", type=int, default=448, help="resize so the short side is this many pixels")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="weights directory, file or hub id (default: see README, 'Default weights')")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .segment import Segmenter

    vocab = _vocab_from_args(args, required=not args.clusters)
    if args.clusters < 0:
        raise UserError(f"--clusters must be a positive number of segments, got {args.clusters}")
    paths = expand_images(args.images)
    seg = Segmenter.from_pretrained(
        args.weights, device=args.device, templates=args.templates, short_side=args.short_side,
        window=args.window, top_k=args.top_k, threshold=args.threshold, refine="pamr" if args.pamr else "",
        groupings=args.groupings,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    stems: dict[str, int] = {}
    for path in tqdm(paths, desc="segment", unit="img", disable=len(paths) < 2 or args.quiet):
        try:
            if args.clusters:
                from .clusters import cluster_segment

                res = cluster_segment(seg, path, args.clusters, vocab)  # vocab names the clusters
            else:
                res = seg.segment(path, vocab)
        except (OSError, ValueError) as e:
            print(f"groupseg: error: {e}", file=sys.stderr)
            failed += 1
            continue
        stem = path.stem
        stems[stem] = stems.get(stem, 0) + 1
        if stems[stem] > 1:  # two inputs with the same name: keep both
            stem = f"{stem}_{stems[stem]}"
        res.save(out / stem)
        if not args.quiet and len(paths) == 1:
            top = sorted(((v, k) for k, v in res.fractions().items() if v > 0), reverse=True)
            print(", ".join(f"{k} {100 * v:.1f}%" for v, k in top), f"-> {out / stem}_overlay.png")
    if failed:
        print(f"groupseg: {failed} of {len(paths)} images failed", file=sys.stderr)
        return 1
    return 0


def cmd_groups(args: argparse.Namespace) -> int:
    from .groups import save_groups
    from .segment import Segmenter

    vocab = _vocab_from_args(args, required=False)
    paths = expand_images(args.images)
    seg = Segmenter.from_pretrained(args.weights, device=args.device, templates=args.templates, short_side=args.short_side)
    for path in paths:
        print(save_groups(seg, path, args.out, vocab))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .factory import load_model

    model = load_model(args.src)
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model.save_pretrained(args.dst, dtype=dtype)
    print(f"wrote {args.dst}/config.json and model.safetensors ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .factory import list_models
    from .pretrained import default_weights
    from .prompting import list_templates

    info = {"models": list_models(), "templates": list_templates()}
    try:
        info["default_weights"] = str(default_weights())
    except Exception as e:  # noqa: BLE001 - shown to the user
        info["default_weights"] = f"error: {e}"
    print(json.dumps(info, indent=2))
    return 0


def _lazy(module: str, add: str, run: str) -> tuple[Callable, Callable]:
    """Subcommands implemented beside the package (training/, eval/): imported only when used."""

    def add_args(p: argparse.ArgumentParser) -> None:
        try:
            getattr(importlib.import_module(module), add)(p)
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] in ("training", "eval", "groupseg"):
                raise  # a bug in our own code, not a missing install
            p.set_defaults(_missing=f"{module} (missing package {e.name!r})")

    def runner(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), run)(args)

    return add_args, runner


EXAMPLES = """examples:
  groupseg segment street.jpg --vocab "sky,road,car,tree,person;pedestrian"
  groupseg segment photos/ --vocab-file words.txt --out results --threshold 0.5
  groupseg segment street.jpg --clusters 5
  groupseg eval --dataset camvid --data-root ../shared/data/camvid --split val
  groupseg convert nvidia-groupvit-dir/ my-weights/
  groupseg make-shards --images flickr8k/images --captions Flickr8k.token.txt --out shards/
  groupseg train --config tiny-cpu
  groupseg finetune --dataset camvid --data-root ../shared/data/camvid --fraction 0.1 --out runs/ft-camvid-10
"""


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groupseg", description="Open-vocabulary, zero-shot semantic segmentation with GroupViT.",
        epilog=EXAMPLES, formatter_class=_formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("segment", help="segment images with a word list", formatter_class=_formatter,
                       epilog='example:\n  groupseg segment street.jpg --vocab "sky,road,car" --out out/')
    _add_image_args(p, "groupseg_out")
    p.add_argument("--threshold", type=float, default=0.0, help="class probability below which a pixel is background (255)")
    p.add_argument("--window", type=int, default=None,
                   help="sliding-window size in pixels (0 = whole image; default: the weights' own, else 0)")
    p.add_argument("--top-k", type=int, default=0, help="keep only the image's k most likely classes (0 = all)")
    p.add_argument("--pamr", action="store_true", help="refine segment boundaries onto image edges (PAMR, as TCL)")
    p.add_argument("--groupings", type=int, default=None, metavar="N",
                   help="use only the first N grouping stages' segments (default: all; 1 = finer segments)")
    p.add_argument("--clusters", type=int, default=0, metavar="K",
                   help="vocabulary-free: cluster the segments into K groups and name them from --vocab/--vocab-file "
                   "or the shipped noun list")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("groups", help="pictures of the learned groups of each grouping stage", formatter_class=_formatter,
                       epilog='example:\n  groupseg groups photo.jpg --vocab "dog,grass,person" --out groups/')
    _add_image_args(p, "groupseg_groups")
    p.set_defaults(func=cmd_groups)

    p = sub.add_parser("convert", help="convert transformers / NVlabs weights to groupseg's format", formatter_class=_formatter,
                       epilog="example:\n  groupseg convert group_vit_gcc_yfcc_30e.pth gvit-yfcc/")
    p.add_argument("src", help="transformers GroupViT directory, NVlabs .pth, groupseg directory or hub id")
    p.add_argument("dst", help="output directory")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="stored precision")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="list architectures, template sets and the default weights")
    p.set_defaults(func=cmd_info)

    lazy = {
        "make-shards": ("groupseg.training.shards", "add_make_shards_args", "run_make_shards", "build webdataset shards from images + captions"),
        "train": ("groupseg.training.main", "add_train_args", "run_train", "pretrain GroupViT from image-text shards"),
        "eval": ("groupseg.eval.main", "add_eval_args", "run_eval", "evaluate zero-shot segmentation or retrieval"),
        "finetune": ("groupseg.training.finetune", "add_finetune_args", "run_finetune",
                     "fine-tune on a few pixel-labelled images (ce, mix-match) or image tags (weak-shot)"),
        "discover": ("groupseg.training.discover", "add_discover_args", "run_discover", "learn to segment with no labels and no words (STEGO + self-training)"),
    }
    wanted = argv[0] if argv else None
    for name, (module, add, run, help_) in lazy.items():
        p = sub.add_parser(name, help=help_, formatter_class=_formatter)
        add_args, runner = _lazy(module, add, run)
        if wanted == name:  # only import the implementation of the command being run
            add_args(p)
        p.set_defaults(func=runner, _module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if getattr(args, "command", None) == "train":
            args.overrides = unknown  # --key value pairs overriding TrainConfig fields
        else:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"groupseg: error: '{args.command}' needs {args._missing}, which is not installed (pip install 'groupseg[train,eval]')", file=sys.stderr)
        return 2
    from .convert import CheckpointError
    from .transforms import ImageError

    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, NotADirectoryError, ImageError, CheckpointError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        print(f"groupseg: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("groupseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
