"""Image-text retrieval: recall@K by the standard protocol (each image has several captions)."""
from __future__ import annotations

from typing import Sequence

import torch


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
