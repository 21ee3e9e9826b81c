"""The ``groupseg`` command line: one table of commands, each imported only when it runs.

``groupseg --help``, ``groupseg COMMAND --help`` and a bad option import nothing but argparse and
this table, so they answer at once; torch and the rest load when a command does its work. Every
command names the modules it needs and the extra that installs them, and says so in one line
before doing anything when one is missing.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Sequence

from .argtypes import float_range, int_range
from .prompting import DEFAULT_TEMPLATES

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``groupseg segment: error: ...``, exit 2), no usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


@dataclass(frozen=True)
class Command:
    """One subcommand: where its options and its work live, and what it needs installed."""

    help: str
    add: str  # function (parser) -> None adding the command's options
    run: str  # function (args) -> exit code
    module: str | None = None  # module holding both, imported only when this command is used (None: this one)
    needs: tuple[str, ...] = ()  # top-level modules beyond the core install, checked before any work
    extra: str = ""  # the groupseg extra that installs them
    epilog: str = ""


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


def _device(args: argparse.Namespace) -> str:
    """``--device`` through the one device rule (auto = cuda when visible); a missing GPU is a ValueError."""
    from .argtypes import resolve_device

    return str(resolve_device(args.device))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="weights directory, file or hub id (hf-hub:ORG/NAME); default: the shipped model")
    p.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N")


def _add_image_args(p: argparse.ArgumentParser, out_default: str) -> None:
    """Inputs, vocabulary, weights, output folder and preprocessing: shared by segment and groups."""
    p.add_argument("images", nargs="+", help="image files, directories or glob patterns")
    p.add_argument("--vocab", help="comma-separated classes; synonyms with ';' (e.g. 'person;pedestrian,car')")
    p.add_argument("--vocab-file", help="file with one class per line (synonyms with ';')")
    _add_model_args(p)
    p.add_argument("--out", default=out_default, help=f"output directory (default: {out_default})")
    p.add_argument("--templates", default=DEFAULT_TEMPLATES, help=f"prompt template set or file (default: {DEFAULT_TEMPLATES})")
    p.add_argument("--short-side", type=int_range(16), default=448, metavar="PX",
                   help="resize so the short side is this many pixels (>= 16; default: 448)")


def add_segment_args(p: argparse.ArgumentParser) -> None:
    _add_image_args(p, "groupseg_out")
    p.add_argument("--threshold", type=float_range(0, 1), default=0.0, metavar="P",
                   help="class probability in [0, 1] below which a pixel is background (255; default: 0)")
    p.add_argument("--window", type=int_range(0), default=None, metavar="PX",
                   help="sliding-window size in pixels (0 = whole image; default: the weights' own, else 0)")
    p.add_argument("--top-k", type=int_range(0), default=0, metavar="K",
                   help="keep only the image's k most likely classes (0 = all)")
    p.add_argument("--pamr", action=argparse.BooleanOptionalAction, default=None,
                   help="refine segment boundaries onto image edges (PAMR, as TCL); default: the weights' own "
                   "(off, except clusters of weights from groupseg discover)")
    p.add_argument("--groupings", type=int_range(1), default=None, metavar="N",
                   help="use only the first N grouping stages' segments (default: all; 1 = finer segments)")
    p.add_argument("--clusters", type=int_range(1), default=None, metavar="K",
                   help="vocabulary-free: cluster the segments into K groups and name them from --vocab/--vocab-file "
                   "or the shipped noun list")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _summary(res, threshold: float) -> str:
    """The console line of one result: classes by pixel share, or that nothing passed the threshold."""
    frac = res.fractions()
    top = sorted(((v, k) for k, v in frac.items() if v > 0 and k != "background"), reverse=True)
    if not top:
        why = f"no class reached --threshold {threshold:g}; try a lower one" if threshold > 0 else "no class found"
        return f"all background ({why})"
    if frac.get("background", 0) > 0:
        top.append((frac["background"], "background"))
    return ", ".join(f"{k} {100 * v:.1f}%" if v >= 0.0005 else f"{k} <0.1%" for v, k in top)


def run_segment(args: argparse.Namespace) -> int:
    vocab = _vocab_from_args(args, required=not args.clusters)
    paths = expand_images(args.images)
    device = _device(args)
    from tqdm import tqdm

    from .segment import Segmenter

    seg = Segmenter.from_pretrained(
        args.weights, device=device, templates=args.templates, short_side=args.short_side,
        window=args.window, top_k=args.top_k, threshold=args.threshold, refine={True: "pamr", False: "", None: None}[args.pamr],
        groupings=args.groupings,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    stems: dict[str, int] = {}
    bar = tqdm(paths, desc="segment", unit="img", disable=len(paths) < 2 or args.quiet)
    for path in bar:
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
        if not args.quiet:  # one line per image: what it was labelled, or that nothing passed the threshold
            line = f"{_summary(res, args.threshold)} -> {out / stem}_overlay.png"
            if res.note:  # e.g. fewer clusters than asked for, and why
                line += f" ({res.note})"
            bar.write(line if len(paths) == 1 else f"{path.name}: {line}")
    if failed:
        print(f"groupseg: {failed} of {len(paths)} images failed", file=sys.stderr)
        return 1
    return 0


def add_groups_args(p: argparse.ArgumentParser) -> None:
    _add_image_args(p, "groupseg_groups")


def run_groups(args: argparse.Namespace) -> int:
    vocab = _vocab_from_args(args, required=False)
    paths = expand_images(args.images)
    device = _device(args)
    from .groups import save_groups
    from .segment import Segmenter

    seg = Segmenter.from_pretrained(args.weights, device=device, templates=args.templates, short_side=args.short_side)
    for path in paths:
        print(save_groups(seg, path, args.out, vocab))
    return 0


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="transformers GroupViT directory, NVlabs .pth, groupseg directory or hf-hub:ORG/NAME")
    p.add_argument("dst", help="output directory")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="stored precision")


def run_convert(args: argparse.Namespace) -> int:
    import torch

    from .factory import load_model

    model = load_model(args.src)
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model.save_pretrained(args.dst, dtype=dtype)
    print(f"wrote {args.dst}/config.json and model.safetensors ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")
    return 0


def add_info_args(p: argparse.ArgumentParser) -> None:
    pass


def run_info(args: argparse.Namespace) -> int:
    from .factory import list_models
    from .pretrained import default_weights
    from .prompting import list_templates

    info = {"models": list_models(), "templates": list_templates()}
    try:
        info["default_weights"] = str(default_weights())
    except Exception as e:  # noqa: BLE001 - shown to the user
        info["default_weights"] = f"error: {e}"
    info["commands"] = {name: ("ok" if not missing_modules(c.needs) else f'needs pip install "groupseg[{c.extra}]"')
                        for name, c in COMMANDS.items()}
    print(json.dumps(info, indent=2))
    return 0


TRAIN_NEEDS = ("accelerate", "yaml", "webdataset", "matplotlib")

COMMANDS: dict[str, Command] = {
    "segment": Command(
        "segment images with a word list", "add_segment_args", "run_segment",
        epilog='examples (run from a checkout, which has these photos):\n'
        '  groupseg segment docs/astronaut.jpg --vocab "person,sky,flag,rocket" --groupings 1 --templates short\n'
        '  groupseg segment docs/cat.jpg docs/rocket.jpg --vocab "cat,rocket,sky,person" --threshold 0.3 --out results/\n'
        "  groupseg segment docs/cat.jpg --clusters 3"),
    "groups": Command(
        "pictures of the learned groups of each grouping stage", "add_groups_args", "run_groups",
        epilog='example:\n  groupseg groups docs/cat.jpg --vocab "cat,grass,person" --out groups/'),
    "convert": Command(
        "convert transformers / NVlabs weights to groupseg's format", "add_convert_args", "run_convert",
        epilog="example:\n  groupseg convert group_vit_gcc_yfcc_30e-74d335e6.pth gvit-yfcc/"),
    "info": Command("list architectures, template sets, the default weights and which commands are installed",
                    "add_info_args", "run_info"),
    "eval": Command("evaluate zero-shot segmentation or retrieval", "add_eval_args", "run_eval",
                    module="groupseg.eval.main", needs=("accelerate", "scipy", "matplotlib"), extra="eval"),
    "make-shards": Command("build webdataset shards from images + captions", "add_make_shards_args", "run_make_shards",
                           module="groupseg.training.shards", needs=("webdataset",), extra="train"),
    "train": Command("pretrain GroupViT from image-text shards", "add_train_args", "run_train",
                     module="groupseg.training.main", needs=TRAIN_NEEDS, extra="train"),
    "finetune": Command("fine-tune on a few pixel-labelled images (ce, mix-match) or image tags (weak-shot)",
                        "add_finetune_args", "run_finetune", module="groupseg.training.finetune",
                        needs=("accelerate", "yaml", "matplotlib"), extra="train"),
    "discover": Command("learn to segment with no labels and no words (STEGO head + PASS-style self-training)",
                        "add_discover_args", "run_discover", module="groupseg.training.discover",
                        needs=("matplotlib",), extra="train"),
}

EXAMPLES = """examples:
  groupseg segment docs/astronaut.jpg --vocab "person,sky,flag,rocket" --groupings 1 --templates short
  groupseg segment docs/cat.jpg docs/rocket.jpg --vocab "cat,rocket,sky,person" --threshold 0.3 --out results/
  groupseg segment docs/cat.jpg --clusters 3
  groupseg eval --dataset camvid --data-root ../shared/data/camvid --split val
  groupseg convert group_vit_gcc_yfcc_30e-74d335e6.pth gvit-yfcc/
  groupseg make-shards --images flickr8k/images --captions Flickr8k.token.txt --out shards/
  groupseg train --config tiny-cpu
  groupseg finetune --dataset camvid --data-root ../shared/data/camvid --fraction 0.1 --out runs/ft-camvid-10
"""


def missing_modules(names: Sequence[str]) -> list[str]:
    """Those of ``names`` that cannot be imported here (looked up without importing them)."""
    out = []
    for name in names:
        if name in sys.modules:
            if sys.modules[name] is None:  # blocked, as ``python -c "import sys; sys.modules['x'] = None"``
                out.append(name)
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def _function(cmd: Command, name: str):
    return getattr(importlib.import_module(cmd.module), name) if cmd.module else globals()[name]


def build_parser(command: str | None = None) -> ArgumentParser:
    """The parser; only ``command``'s options are loaded (the others' modules stay unimported)."""
    parser = ArgumentParser(prog="groupseg", description="Open-vocabulary, zero-shot semantic segmentation with GroupViT.",
                            epilog=EXAMPLES, formatter_class=_formatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, epilog=cmd.epilog or None, formatter_class=_formatter)
        if name == command:
            _function(cmd, cmd.add)(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in COMMANDS else None
    if name:
        cmd = COMMANDS[name]
        missing = missing_modules(cmd.needs)
        if missing:  # before its module is imported and before any work
            print(f'groupseg {name} needs {", ".join(missing)}: pip install "groupseg[{cmd.extra}]"', file=sys.stderr)
            return 2
    parser = build_parser(name)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if name == "train" and hasattr(args, "overrides"):
            args.overrides = unknown  # --key value pairs overriding TrainConfig fields
        else:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if name is None:
        parser.print_help(sys.stderr)
        return 2
    return _run(COMMANDS[name], args)


def _run(cmd: Command, args: argparse.Namespace) -> int:
    """Run a command; user errors become one line and exit 2."""
    try:
        return int(_function(cmd, cmd.run)(args) or 0)
    except KeyboardInterrupt:
        print("groupseg: interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError, NotADirectoryError, ValueError) as e:  # CheckpointError, ImageError too
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        print(f"groupseg: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
