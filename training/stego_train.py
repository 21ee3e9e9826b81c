"""Training pieces of ``groupseg discover``: the on-disk feature cache, the STEGO head's training
loop (seeded, checkpointed, resumable) and the streamed cluster probe."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from groupseg.loss import correspondence_loss
from groupseg.optim import build_optimizer
from groupseg.stego import MiniBatchKMeans, StegoHead, features_from_tokens, first_stage_tokens, to_grid

if TYPE_CHECKING:
    from .config import DiscoverConfig

log = logging.getLogger("groupseg.discover")


def five_crops(h: int, w: int, side: int) -> list[tuple[int, int]]:
    """Top-left corners of the four corner crops and the centre crop of side ``side``."""
    return [(0, 0), (0, w - side), (h - side, 0), (h - side, w - side), ((h - side) // 2, (w - side) // 2)]


def crop_pixels(model, path, res: int, crop_ratio: float) -> torch.Tensor:
    """(5, 3, res, res) normalised five crops of the image at ``path``, resized so its short side is
    ``res / crop_ratio`` (the crops the feature cache holds, in its order)."""
    from groupseg.transforms import load_image, target_size, to_tensor

    img = load_image(path)
    h, w = target_size(img.height, img.width, int(round(res / crop_ratio)), 1)
    px = to_tensor(img, (h, w), model.cfg.image_mean, model.cfg.image_std)
    return torch.stack([px[:, y : y + res, x : x + res] for y, x in five_crops(h, w, res)])


class FeatureCache:
    """First-stage patch tokens of five crops per image, float16 in a file (memory-mapped).

    Attributes:
        tokens: (N, g * g, width) memmap; ``glob`` (N, width) mean tokens; ``groups`` (N,) image index;
        grid: g, the crop's patch grid side.
    """

    def __init__(self, directory: Path, meta: dict) -> None:
        n, g, c = meta["items"], meta["grid"], meta["width"]
        self.grid, self.width, self.meta = g, c, meta
        self.tokens = np.memmap(directory / "tokens.f16", dtype=np.float16, mode="r", shape=(n, g * g, c))
        self.glob = np.load(directory / "glob.npy")
        self.groups = np.load(directory / "groups.npy")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    def build(cls, model, paths: Sequence[Path], directory: Path, res: int, crop_ratio: float, device) -> "FeatureCache":
        """Compute (or reuse, when the images and settings match) the cache in ``directory``."""
        from tqdm import tqdm

        patch, width = model.cfg.vision.patch_size, model.visual.width
        meta = {"images": [str(p) for p in paths], "res": res, "crop_ratio": crop_ratio, "grid": res // patch,
                "width": width, "items": 5 * len(paths),
                # which backbone computed them (self-training can move it): a checksum of its weights
                "backbone": float(sum(p.detach().double().sum() for p in model.visual.parameters()))}
        directory.mkdir(parents=True, exist_ok=True)
        mfile = directory / "meta.json"
        if mfile.is_file() and json.loads(mfile.read_text()) == meta:
            print(f"discover: reusing the feature cache in {directory}")
            return cls(directory, meta)
        g = meta["grid"]
        tokens = np.memmap(directory / "tokens.f16", dtype=np.float16, mode="w+", shape=(meta["items"], g * g, width))
        glob = np.zeros((meta["items"], width), np.float32)
        for i, path in enumerate(tqdm(paths, desc="features", unit="img", dynamic_ncols=True)):
            crops = crop_pixels(model, path, res, crop_ratio)
            with torch.no_grad():
                t, _ = first_stage_tokens(model, crops.to(model.logit_scale.device))  # (5, g*g, width)
            tokens[5 * i : 5 * i + 5] = t.cpu().numpy().astype(np.float16)
            glob[5 * i : 5 * i + 5] = F.normalize(t.float(), dim=-1).mean(1).cpu().numpy()
        tokens.flush()
        del tokens
        np.save(directory / "glob.npy", glob)
        np.save(directory / "groups.npy", np.repeat(np.arange(len(paths)), 5))
        mfile.write_text(json.dumps(meta))
        return cls(directory, meta)

    def token_batch(self, idx: torch.Tensor | np.ndarray, device) -> torch.Tensor:
        """(B, g*g, width) float32 tokens of items ``idx``."""
        return torch.from_numpy(self.tokens[np.asarray(idx)].astype(np.float32)).to(device)

    def features(self, model, idx, feature: str) -> torch.Tensor:
        """(B, C, g, g) dense features of items ``idx``."""
        with torch.no_grad():
            x = features_from_tokens(model, self.token_batch(idx, model.logit_scale.device), feature)
        return to_grid(x, self.grid, self.grid)

    def chunks(self, size: int, gen: torch.Generator | None = None) -> Iterator[np.ndarray]:
        """Item indices in chunks of ``size`` (shuffled when ``gen`` is given, sorted within a chunk)."""
        order = torch.randperm(len(self), generator=gen).numpy() if gen is not None else np.arange(len(self))
        for s in range(0, len(self), size):
            yield np.sort(order[s : s + size])


# ----------------------------------------------------------------------------- head training
def _save(path: Path, head: StegoHead, opt, step: int, gen: torch.Generator, tag: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step, "gen": gen.get_state(), "tag": tag}, tmp)
    tmp.replace(path)


def _load(path: Path, head: StegoHead, opt, gen: torch.Generator, tag: str) -> int:
    """Restore a checkpoint of the same phase (``tag``); returns its step, 0 when there is none."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("tag") != tag:
        return 0
    head.load_state_dict(state["head"])
    opt.load_state_dict(state["opt"])
    gen.set_state(state["gen"])
    print(f"discover: resumed {tag} at step {state['step']} from {path}")
    return int(state["step"])


def train_head(model, head: StegoHead, cache: FeatureCache, neighbours: torch.Tensor, cfg: DiscoverConfig,
               ckpt_dir: Path) -> None:
    """Correspondence distillation of the head on crops paired with themselves, neighbours and random crops."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    opt = build_optimizer([{"params": list(head.parameters()), "weight_decay": 0.0}], cfg.lr)  # Adam, as STEGO
    ckpt = ckpt_dir / "head.pt"
    start = _load(ckpt, head, opt, gen, "stego") if cfg.resume == "auto" else 0
    head.train()
    bar = tqdm(range(start, cfg.steps), desc="stego head", unit="step", initial=start, total=cfg.steps, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(cache), (cfg.batch_size,), generator=gen)
        nb = neighbours[idx, torch.randint(neighbours.shape[1], (cfg.batch_size,), generator=gen)]
        f, fk = cache.features(model, idx, cfg.feature), cache.features(model, nb, cfg.feature)
        loss, parts = correspondence_loss(f, fk, head(f), head(fk), cfg.shifts, cfg.loss_weights, gen, cfg.samples, cfg.rand_pairs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", **{f"l_{k}": f"{v:.4f}" for k, v in parts.items()})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save(ckpt, head, opt, step + 1, gen, "stego")
    head.eval()


# ----------------------------------------------------------------------------- cluster probe
@torch.no_grad()
def code_batches(model, head: StegoHead, cache: FeatureCache, gen: torch.Generator | None, size: int = 64):
    """Yield (codes (n, dim), joint (n, D) or None, chunk) over all crops' pixels, streamed."""
    feature = model.cfg.stego["feature"]
    head.eval()
    for chunk in cache.chunks(size, gen):
        tokens = cache.token_batch(chunk, model.logit_scale.device)
        feats = features_from_tokens(model, tokens, feature)  # (n, g*g, C)
        codes = head(to_grid(feats, cache.grid, cache.grid)).flatten(2).transpose(1, 2)  # (n, g*g, dim)
        yield F.normalize(codes.reshape(-1, codes.shape[-1]), dim=-1), tokens, chunk


@torch.no_grad()
def fit_probe(model, head: StegoHead, cache: FeatureCache, k: int, epochs: int, seed: int,
              init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine k-means of all crops' codes: one mini-batch pass, then ``epochs`` streamed Lloyd passes.

    Returns the (K, code_dim) centres and their (K, D) joint-space naming directions (the mean of
    the joint-space projection of the tokens of each cluster's pixels).
    """
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    km = MiniBatchKMeans(k, seed)
    if init is not None and init.abs().sum() > 0:
        km.centres, km.counts = init.clone(), torch.zeros(k, device=init.device)
    for codes, _, _ in code_batches(model, head, cache, gen):
        km.update(codes)
    for _ in range(epochs):  # exact Lloyd steps, sums accumulated over the stream
        sums = torch.zeros_like(km.centres)
        for codes, _, _ in code_batches(model, head, cache, None):
            sums.index_add_(0, km.predict(codes), codes)
        km.centres = torch.where(sums.norm(dim=1, keepdim=True) > 0, F.normalize(sums, dim=-1), km.centres)
    embeds = torch.zeros(k, model.cfg.embed_dim, device=km.centres.device)
    for codes, tokens, _ in code_batches(model, head, cache, None):
        joint = features_from_tokens(model, tokens, "joint").reshape(-1, embeds.shape[1])
        embeds.index_add_(0, km.predict(codes), joint)
    print(f"discover: cluster probe K={k} over {len(cache) * cache.grid ** 2} pixels in {time.time() - t0:.0f} s")
    return km.centres, embeds


# ----------------------------------------------------------------------------- picture
@torch.no_grad()
def plot_code_space(model, head: StegoHead, cache: FeatureCache, path: Path, points: int = 6000, seed: int = 0) -> None:
    """The learned code space in 2-D (PCA of a seeded sample of pixels), coloured by cluster."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from groupseg.segment import palette

    gen = torch.Generator().manual_seed(seed)
    per = max(1, points // max(1, len(cache)))
    xs = []
    for codes, _, _ in code_batches(model, head, cache, gen):
        xs.append(codes[torch.randperm(len(codes), generator=gen)[: per * 64]])
        if sum(len(x) for x in xs) >= points:
            break
    x = torch.cat(xs)[:points].float()
    lab = (x @ head.centres.T.to(x)).argmax(1).cpu().numpy()
    xc = x - x.mean(0)
    _, _, v = torch.pca_lowrank(xc, q=2, center=False)
    xy = (xc @ v[:, :2]).cpu().numpy()
    colours = palette(max(int(lab.max()) + 1, 2)) / 255.0
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot(111)
    ax.scatter(xy[:, 0], xy[:, 1], s=2, c=colours[lab], linewidths=0)
    ax.set_title(f"codes of {len(x)} training pixels (PCA), coloured by cluster")
    ax.set_xticks([]), ax.set_yticks([])
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
