"""Image-text retrieval: recall@K by the standard protocol (each image has several captions)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from .report import command_line, write_json


def recall_at_k(sim: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K in percent for both directions.

    Args:
        sim: (N_images, N_captions) similarities.
        caption_image: (N_captions,) index of each caption's image.
        ks: the K values.

    Image-to-text: an image counts as found at K when any of its captions ranks in its
    top K. Text-to-image: a caption counts when its image ranks in its top K.
    """
    n_img = sim.shape[0]
    out: dict[str, float] = {}
    # image -> text: best rank among the image's own captions
    order = sim.argsort(dim=1, descending=True)  # (I, T)
    hit = caption_image[order] == torch.arange(n_img)[:, None]  # (I, T) True where a caption of the image
    first = hit.float().argmax(dim=1)  # rank of the first correct caption
    # text -> image
    order_t = sim.T.argsort(dim=1, descending=True)  # (T, I)
    rank_t = (order_t == caption_image[:, None]).float().argmax(dim=1)
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * (first < k).float().mean().item()
        out[f"t2i_r{k}"] = 100.0 * (rank_t < k).float().mean().item()
    out["rsum"] = sum(v for k, v in out.items())
    return out


def embed_pairs(segmenter, pairs, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embeddings (I, D), caption embeddings (T, D), caption -> image index (T,)) of a
    stream of ``(image, [captions], key)``, through ``Segmenter.encode_images``/``encode_texts``."""
    imgs, texts, owner, buf = [], [], [], []
    for i, (image, captions, _key) in enumerate(pairs):
        buf.append(image)
        texts += list(captions)
        owner += [i] * len(captions)
        if len(buf) == batch_size:
            imgs.append(segmenter.encode_images(buf).cpu())
            buf = []
    if buf:
        imgs.append(segmenter.encode_images(buf).cpu())
    return torch.cat(imgs), segmenter.encode_texts(texts).cpu(), torch.tensor(owner)


def run_retrieval(args: argparse.Namespace, make_segmenter, add_args) -> int:
    """Flickr8k image-text retrieval: recall@1/5/10 both ways.

    Args:
        args: the ``groupseg eval`` options.
        make_segmenter: ``args -> (Segmenter, weights name)``.
        add_args: the options' definition (for the reproducing command line).
    """
    from tqdm import tqdm

    root = Path(args.data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root} (--data-root)")
    split = {"val": "dev"}.get(args.split, args.split)
    names_file = root / f"Flickr_8k.{split}Images.txt"
    tokens_file = root / "Flickr8k.token.txt"
    for f in (names_file, tokens_file):
        if not f.is_file():
            raise FileNotFoundError(f"Flickr8k file not found: expected {f} (--split dev or test)")
    img_dir = next((root / d for d in ("images", "Flicker8k_Dataset", "Flickr8k_Dataset") if (root / d).is_dir()), root)
    names = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
    if args.limit > 0:
        names = names[: args.limit]
    caps: dict[str, list[str]] = {}
    for ln in tokens_file.read_text(encoding="utf-8").splitlines():
        if "\t" in ln:
            key, text = ln.split("\t", 1)
            caps.setdefault(key.split("#", 1)[0], []).append(text.strip())
    missing = [n for n in names if n not in caps]
    if missing:
        raise ValueError(f"{tokens_file.name} has no captions for {missing[0]} ({len(missing)} images without captions)")
    texts, owner = [], []
    for i, n in enumerate(names):
        texts += caps[n]
        owner += [i] * len(caps[n])
    seg, weights = make_segmenter(args)
    img_emb = []
    for i in tqdm(range(0, len(names), 32), desc="images", unit="batch", dynamic_ncols=True):
        img_emb.append(seg.encode_images([img_dir / n for n in names[i : i + 32]]).cpu())
    txt_emb = []
    for i in tqdm(range(0, len(texts), 256), desc="captions", unit="batch", dynamic_ncols=True):
        txt_emb.append(seg.encode_texts(texts[i : i + 256]).cpu())
    sim = torch.cat(img_emb) @ torch.cat(txt_emb).T  # (I, T)
    r = recall_at_k(sim, torch.tensor(owner))
    print(f"\nflickr8k ({split}), {len(names)} images, {len(texts)} captions")
    print("            R@1    R@5   R@10")
    for d, name in (("i2t", "image->text"), ("t2i", "text->image")):
        print(f"{name:<11} {r[f'{d}_r1']:5.1f}  {r[f'{d}_r5']:5.1f}  {r[f'{d}_r10']:5.1f}")
    print(f"rsum {r['rsum']:.1f}")
    results = {"dataset": "flickr8k", "split": split, **r, "num_images": len(names), "num_captions": len(texts),
               "command": command_line(args, add_args), "weights": weights}
    if args.out:
        write_json(results, args.out)
        print(f"wrote {args.out}")
    return 0
