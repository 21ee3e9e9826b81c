"""Fine-tune a text-pretrained GroupViT on a few pixel-labelled images, keeping the open vocabulary.

    groupseg finetune --dataset camvid --data-root ../shared/data/camvid --out runs/ft-camvid \\
        [--fraction 0.1 | --images 12] [--objective ce|mix-match] [--weak-classes "car,fence"]
    accelerate launch -m groupseg.training.finetune --dataset camvid ...

The classifier is an (S, D) matrix in the joint image-text space, one row per class name and
synonym, initialised with their prompt-ensembled text embeddings, so zero labelled images is
exactly the zero-shot model.
Group-to-class logits give each pixel the class distribution of its group (the argmax group, as at
inference, with the soft assignment's gradient: straight-through), trained with a per-pixel loss
(ignore index honoured, median-frequency class weights); the backbone learns at a lower rate.
Models pretrained on a few thousand photos assign patches to groups with nearly flat logits, so
the first-stage assignments get a learnable sharpening scale (``--assign-scale``, 50 at the start)
and no Gumbel noise while tuning; the exported model segments in windows of the crop size.

Modes:
- ``ce``: per-pixel negative log-likelihood only.
- ``mix-match`` (Zhan et al., AAAI 2018; the default: ahead of ``ce`` at 1, 10 and 100 % of the
  CamVid labels at the default settings, 18.9 / 43.4 / 43.0 against 15.1 / 38.5 / 40.0 % mIoU):
  first, patches sampled from all labelled images of a batch ("mix") form a class-wise graph; a
  triplet loss on their first-stage tokens over every same-class pair, with semi-hard negatives,
  pulls same-class patches together ("match"); then the per-pixel loss.
- ``--weak-classes`` (weak-shot, after SimFormer, NeurIPS 2022): those classes' pixel labels are
  hidden (set to ignore before anything reaches a loss) and only their image-level tags are
  kept (those of each training crop). Groups act as class-agnostic proposals learnt from
  base-class pixels; a multiple-instance tag loss on the proposals' class probabilities, pooled
  over the patches each group owns (``--tag-topk``: the best 2 %), names the weak classes;
  SimFormer's complementary loss gives the pixels no base label claims to the union of the
  crop's tagged weak classes (``--comp-weight``), with class-balanced targets (``--comp-balance``)
  so the easiest tagged class does not take them all; and a pixel-pixel similarity head trained on
  base-class patch pairs supervises whether two patches share a class where labels are hidden.
  ``--weak-loss none`` is the base-only baseline: weak classes get no signal at all.

The output directory holds ordinary groupseg weights (``config.json`` + ``model.safetensors``):
the fine-tuned classes keep their tuned classifier (a row per synonym, scored as at inference:
a class is its best synonym), any other word goes through the text tower. Checkpoints are
written to ``OUT/checkpoints`` every epoch; ``--resume auto`` continues from the latest valid one.

Pieces: ``FinetuneConfig`` (``training/config.py``), the data (``finetune_data.py``), the head
(``finetune_head.py``), the losses (``groupseg.loss.segmentation``), the shared training core
(``engine.py``); this module orchestrates them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import groupseg
from groupseg.dataclass_cli import add_dataclass_args, dataclass_from_args
from groupseg.layers.grouping import AssignAttention
from groupseg.loss.segmentation import (
    IGNORE,
    complementary_loss,
    patch_labels,
    pixel_log_probs,
    pixel_pair_similarity_losses,
    sample_patches,
    tag_scores,
    triplet_loss,
)
from groupseg.optim import build_optimizer, decay_groups

from .checkpoint import latest_checkpoint, read_state, save_checkpoint
from .config import FinetuneConfig
from .engine import MetricsWriter, choose_checkpoint, export_weights, keep_freed_memory, warmup_cosine
from .finetune_data import (
    LabelledImages,
    hide_classes,
    median_frequency_weights,
    resolve_weak_classes,
    select_subset,
    vocab_targets,
)
from .finetune_head import SegmentationHead

log = logging.getLogger("groupseg.finetune")

__all__ = ["FinetuneConfig", "Finetuner", "SegmentationHead", "add_finetune_args", "run_finetune", "main"]


class Finetuner:
    """State and loop of one fine-tuning run (``cfg`` is checked when it is built)."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        from groupseg.eval.datasets import hold_out_sequence, load_dataset
        from groupseg.precision import resolve_precision
        from groupseg.pretrained import resolve_weights

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.ds = load_dataset(cfg.dataset, cfg.data_root, cfg.split, cfg.vocab_file or None)
        if cfg.holdout_sequence:
            self.ds = hold_out_sequence(self.ds, cfg.holdout_sequence, keep="rest")
        if not self.ds.samples:
            raise FileNotFoundError(f"{cfg.dataset}: no labelled images in split {cfg.split!r}")
        self.labels = self.ds.labels
        self.hidden = resolve_weak_classes(cfg.weak_classes, self.labels) if cfg.weak_classes else []
        self.subset = select_subset(len(self.ds), cfg.images, cfg.fraction, cfg.seed)
        precision = resolve_precision(cfg.precision)
        # some heads sit idle in some stages (the classifier during mix-and-match, the similarity head without weak classes)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.acc = Accelerator(mixed_precision="no" if precision == "fp32" else precision, kwargs_handlers=[ddp])
        set_seed(cfg.seed)
        src = resolve_weights(cfg.weights or None)
        self.weights_dir = Path(str(src)) if Path(str(src)).is_dir() else Path(str(src)).parent
        self.export_dtype = self._stored_dtype(self.weights_dir)
        seg = groupseg.Segmenter.from_pretrained(src, templates=cfg.templates)
        model = seg.model
        with torch.no_grad():  # one row per synonym, as the Segmenter scores them
            _, emb, owner = seg.class_embeddings(self.ds.vocab)
        model.text.requires_grad_(False)
        model.text_proj.requires_grad_(False)
        if cfg.assign_scale > 0 and self.subset and cfg.epochs > 0:  # (no images: the zero-shot model, unchanged)
            model.sharpen_assignments(cfg.assign_scale)
        self.head = SegmentationHead(model, F.normalize(emb.float().cpu(), dim=-1), owner, cfg.groupings or None)
        self.step, self.epoch, self.samples_read = 0, 0, 0
        self.data = LabelledImages(self.ds, self.subset, cfg, self.hidden, model.cfg.image_mean, model.cfg.image_std)
        self.class_weights = None
        if cfg.class_weights != "none":  # from the visible labels of the subset (hidden weak classes excluded)
            maps = (hide_classes(vocab_targets(self.ds, self.ds.samples[i]), self.hidden) for i in self.subset)
            power = 0.5 if cfg.class_weights == "sqrt-median-freq" else 1.0
            self.class_weights = median_frequency_weights(maps, len(self.labels), power=power)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.epochs, self.mix_epochs = cfg.epochs, 0
        self.average = None  # the running weight average (--average-weights), built in fit()

    # ------------------------------------------------------------------ pieces
    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW: the vision tower at ``lr * backbone_lr_mult``, the heads at ``lr``; no weight decay
        on the model's ``no_weight_decay()`` parameters and 1-D ones (norms, biases, scales)."""
        cfg, head = self.cfg, self.head
        scales = {id(p) for p in head.model.assignment_scales()}
        named = dict(head.named_parameters())
        backbone = [(n, p) for n, p in named.items() if n.startswith("model.visual.") and id(p) not in scales]
        heads = [(n, p) for n, p in named.items() if n.startswith(("model.visual_proj.", "classifier"))]
        heads += [("model.logit_scale", head.model.logit_scale)]
        heads += [(n, p) for n, p in named.items() if id(p) in scales]
        heads += [(n, p) for n, p in named.items() if n.startswith("sim_head.")]
        skip = head.no_weight_decay()
        groups = decay_groups(backbone, cfg.weight_decay, skip, lr=cfg.lr * cfg.backbone_lr_mult, name="backbone")
        groups += decay_groups(heads, cfg.weight_decay, skip, lr=cfg.lr, name="head")
        return build_optimizer(groups, cfg.lr)

    def _loader(self, epoch: int):
        """This process's share of a seeded shuffle of the subset (every process: a different share)."""
        self.data.epoch = epoch
        g = torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
        order = torch.randperm(len(self.data), generator=g)[self.acc.process_index :: self.acc.num_processes].tolist()
        return torch.utils.data.DataLoader(
            self.data, batch_size=self.cfg.batch_size, sampler=order, drop_last=len(order) > self.cfg.batch_size,
            # a few images: a worker process per epoch would cost more than it saves
            num_workers=loader_workers(self.cfg.workers, self.acc.device) if len(order) >= 8 * self.cfg.batch_size else 0,
            persistent_workers=False,
        )

    def _train_mode(self) -> None:
        self.head.train()
        self.head.model.text.eval()
        for m in self.head.modules():  # small batches: keep the pretrained BatchNorm statistics
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
            if isinstance(m, AssignAttention) and not self.cfg.assign_noise:
                m.eval()  # hard argmax assignment without Gumbel noise, as at inference

    # ------------------------------------------------------------------ losses
    def losses(self, batch: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        """All loss terms of one batch (only what the stage and mode use)."""
        with self.acc.autocast():
            out = self.head(batch["pixels"])
        if epoch < self.mix_epochs:
            return self._match_terms(out, batch["target"])
        return self._pixel_terms(out, batch["target"], batch["tags"])

    def _match_terms(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mix-and-match stage: triplets over patches of all images in the batch."""
        lab = patch_labels(target, tuple(out["grouping"].shape[-2:]))
        idx = sample_patches(lab, self.cfg.patches_per_class, self.gen).to(target.device)
        # the first stage's patch tokens, which the grouping reads: group-pooled features are equal
        # for all patches of a segment, so a different-class patch in the same segment is a negative
        # at distance 0 with no gradient, only the positives pull, and the features collapse
        feats = out["patch_tokens"].reshape(-1, out["patch_tokens"].shape[-1])
        return {"triplet": triplet_loss(feats[idx], lab.reshape(-1)[idx], self.cfg.margin)}

    def _pixel_terms(self, out: dict[str, torch.Tensor], target: torch.Tensor, tags: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-pixel loss, plus the weak-shot terms when classes are hidden."""
        cfg = self.cfg
        hard = cfg.grouping_loss == "hard"
        logp = pixel_log_probs(out["group_logits"], out["grouping"], tuple(target.shape[-2:]), hard)
        terms = {"ce": self.pixel_loss(logp, target)}
        if self.hidden and cfg.weak_loss == "tags":
            weak = torch.tensor(self.hidden, device=target.device)
            # proposals = groups: an image has a weak class iff some of its segments are that class
            p_img = tag_scores(out["group_logits"], out["grouping"], weak, cfg.tag_topk, hard)  # (B, W)
            terms["tag"] = cfg.tag_weight * F.binary_cross_entropy(p_img, tags[:, weak].float())
            if cfg.comp_weight > 0:
                terms["comp"] = cfg.comp_weight * complementary_loss(logp, target, weak, tags[:, weak], cfg.comp_balance)
            lab = patch_labels(target, tuple(out["grouping"].shape[-2:])).reshape(target.shape[0], -1)  # (B, N)
            emb = F.normalize(self.head.sim_head(out["patch_tokens"]), dim=-1)  # (B, N, 64)
            sim = pixel_pair_similarity_losses(emb, lab, out["group_logits"], out["grouping"], cfg.patches_per_class * 8, self.gen)
            terms.update({k: cfg.sim_weight * v for k, v in sim.items()})
        return terms

    def pixel_loss(self, log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-pixel NLL; ``IGNORE`` pixels (hidden weak classes included) contribute nothing."""
        w = None if self.class_weights is None else self.class_weights.to(log_probs.device, log_probs.dtype)
        return F.nll_loss(log_probs, target, weight=w, ignore_index=IGNORE)

    # ------------------------------------------------------------------ checkpoints and export
    def _state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "samples_read": self.samples_read,
                "config": json.loads(json.dumps(dataclasses.asdict(self.cfg))),
                "subset": [self.ds.samples[i].stem for i in self.subset], "gen": self.gen.get_state().tolist()}

    def save(self) -> None:
        if self.acc.is_main_process:
            save_checkpoint(self.out / "checkpoints", self.step, lambda d: self.acc.save_state(str(d)), self._state(), self.cfg.keep_last)
            self.export()
        self.acc.wait_for_everyone()

    def _checked_resume(self) -> tuple[Path, dict] | None:
        """The checkpoint to resume from and its state, checked before anything is written."""
        if not self.cfg.resume and latest_checkpoint(self.out / "checkpoints") is not None:
            raise ValueError(f"{self.out} already holds checkpoints: pass --resume auto to continue, or choose another --out")
        ckpt = choose_checkpoint(self.cfg.resume, self.out / "checkpoints")
        if ckpt is None:
            return None
        st = read_state(ckpt)
        if st.get("subset") != [self.ds.samples[i].stem for i in self.subset]:
            raise ValueError(f"{ckpt}: checkpoint was trained on a different image subset (check --seed/--images/--fraction)")
        return ckpt, st

    def _load(self, ckpt: Path, st: dict, metrics: MetricsWriter) -> None:
        self.acc.load_state(str(ckpt))
        self.step, self.epoch, self.samples_read = st["step"], st["epoch"], st.get("samples_read", 0)
        self.gen.set_state(torch.tensor(st["gen"], dtype=torch.uint8))
        metrics.trim(self.step)  # the main process drops what was logged after the checkpoint
        log.info("resumed from %s at epoch %d (step %d)", ckpt, self.epoch, self.step)

    def export(self) -> Path:
        """Ordinary groupseg weights in ``out``: the model plus the tuned class rows (the averaged
        weights once ``--average-weights`` has started averaging, else the live ones)."""
        averaging = self.average is not None and int(self.average.n_averaged) > 0
        head = self.average.module if averaging else self.acc.unwrap_model(self.head)
        model = head.model
        cfg = model.cfg
        saved = (list(cfg.tuned_classes), list(cfg.tuned_owner), model.tuned_class_embeds, cfg.groupings, cfg.window)
        cfg.groupings = self.cfg.groupings or None  # the exported model segments as it was tuned:
        cfg.window = self.cfg.crop_size  # with its grouping stages, in windows of its crop size
        try:  # the live model stays as it was: checkpoints keep one state layout
            model.set_tuned_classes(self.labels, head.class_rows().detach(), head.owner.tolist())
            return self._write_weights(model)
        finally:
            model.clear_tuned_classes()
            cfg.tuned_classes, cfg.tuned_owner, cfg.groupings, cfg.window = saved[0], saved[1], saved[3], saved[4]
            if saved[2] is not None:
                model.tuned_class_embeds = saved[2]

    def _write_weights(self, model: groupseg.GroupViT) -> Path:
        """``model`` (in the starting weights' precision) and their tokenizer files into ``out``."""
        import shutil

        tok = self.weights_dir / "tokenizer"
        extra = (lambda d: shutil.copytree(tok, d / "tokenizer")) if tok.is_dir() else None
        return export_weights(model, self.out, self.export_dtype, extra)

    @staticmethod
    def _stored_dtype(weights_dir: Path) -> torch.dtype | None:
        """fp16 when the starting weights are stored in 16 bits (the export keeps their size), else fp32."""
        from safetensors import safe_open

        st = weights_dir / "model.safetensors"
        if not st.exists():
            return None
        with safe_open(str(st), "pt") as f:
            return torch.float16 if f.get_slice(next(iter(f.keys()))).get_dtype() in ("F16", "BF16") else None

    # ------------------------------------------------------------------ loop
    def fit(self) -> Path:
        cfg, acc = self.cfg, self.acc
        resume = self._checked_resume()  # every check passes before anything is written
        self.out.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            (self.out / "subset.txt").write_text("".join(self.ds.samples[i].stem + "\n" for i in self.subset))
            (self.out / "finetune_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if not self.subset or cfg.epochs == 0:
            # nothing to learn from: the zero-shot model itself (prompt ensembles, max over synonyms)
            log.info("no labelled images: writing the starting (zero-shot) model unchanged")
            return self._write_weights(self.acc.unwrap_model(self.head).model)
        opt = self.build_optimizer()
        steps_per_epoch = max(1, len(self._loader(0)))
        self.epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
        if cfg.objective == "mix-match":
            self.mix_epochs = cfg.mix_match_epochs or max(1, self.epochs // 3)
        total = steps_per_epoch * self.epochs
        log.info("%d labelled images, %d epochs of %d steps", len(self.subset), self.epochs, steps_per_epoch)
        if self.class_weights is not None:
            log.info("class weights (%s): %s", cfg.class_weights,
                     ", ".join(f"{n} {w:.2f}" for n, w in zip(self.labels, self.class_weights.tolist())))
        sched = warmup_cosine(opt, total, int(cfg.warmup_epochs * steps_per_epoch))
        self.head, opt = acc.prepare(self.head, opt)
        acc.register_for_checkpointing(sched)
        if cfg.average_weights > 0:  # SWA's uniform average (Izmailov et al. 2018), kept in every checkpoint
            from torch.optim.swa_utils import AveragedModel

            self.average = AveragedModel(acc.unwrap_model(self.head))
            acc.register_for_checkpointing(self.average)
        metrics = MetricsWriter(self.out / "metrics.jsonl", acc.is_main_process)
        if resume is not None:
            self._load(*resume, metrics)
        self._run_epochs(opt, sched, metrics, steps_per_epoch, total)
        metrics.plot(self.out / "loss_curve.png")
        return self.out

    def _run_epochs(self, opt, sched, metrics: MetricsWriter, steps_per_epoch: int, total: int) -> None:
        from tqdm import tqdm

        cfg, acc = self.cfg, self.acc
        head_group = [g.get("name") for g in opt.param_groups].index("head")  # the lr logged
        bar = tqdm(total=total, initial=self.step, desc="finetune", disable=not acc.is_main_process, dynamic_ncols=True)
        average_from = total - int(round(cfg.average_weights * total))  # steps after this one are averaged
        t0 = time.time()
        while self.epoch < self.epochs:
            self._train_mode()
            for batch in self._loader(self.epoch):
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                terms = self.losses(batch, self.epoch)
                loss = sum(terms.values())
                acc.backward(loss)
                acc.clip_grad_norm_(self.head.parameters(), 5.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                self.step += 1
                if self.average is not None and self.step > average_from:
                    self.average.update_parameters(acc.unwrap_model(self.head))
                self.samples_read += len(batch["pixels"]) * acc.num_processes
                bar.update(1)
                if self.step % cfg.log_every == 0:
                    rec = {"step": self.step, "epoch": self.epoch, "loss": float(loss.detach())}
                    rec |= {f"{k}_loss": float(v.detach()) for k, v in terms.items()}
                    rec |= {"lr": sched.get_last_lr()[head_group], "elapsed_s": round(time.time() - t0, 1)}
                    metrics.write(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}")
            self.epoch += 1
            # checkpoint every epoch, or every few epochs when epochs are only a step or two long
            if self.epoch % max(1, math.ceil(20 / steps_per_epoch)) == 0 or self.epoch == self.epochs:
                self.save()
        bar.close()


def loader_workers(workers: int, device: torch.device) -> int:
    """Data-loading processes: ``workers``, or for -1 one, except when training on a CPU whose cores
    torch's threads take all of (measured on 2 cores: a worker process costs 1.18 s a step against
    1.10 s decoding in the training process, because it preempts a thread at every synchronisation)."""
    if workers >= 0:
        return workers
    if device.type != "cpu":
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cpus > torch.get_num_threads() else 0


# --------------------------------------------------------------------------- command line
def add_finetune_args(p: argparse.ArgumentParser) -> None:
    """One option per ``FinetuneConfig`` field (``groupseg finetune --help`` lists them)."""
    add_dataclass_args(p, FinetuneConfig)
    p.epilog = (p.epilog or "") + (
        "example:\n  groupseg finetune --dataset camvid --data-root ../shared/data/camvid --fraction 0.1 --out runs/ft-camvid-10\n"
    )


def run_finetune(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(FinetuneConfig, args)  # range checks, before any work
    keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ft = Finetuner(cfg)
    out = ft.fit()
    print(f"done: weights in {out} (groupseg segment/eval/groups --weights {out}); "
          f"{ft.samples_read} labelled crops read over {ft.step} steps, 0 skipped")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="groupseg.training.finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_finetune_args(p)
    args = p.parse_args(argv)
    try:
        return run_finetune(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"groupseg finetune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
