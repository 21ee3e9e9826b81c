"""Pretrain GroupViT from image-text shards with the multi-label contrastive loss.

    groupseg train --config tiny-cpu [--key value ...]
    accelerate launch -m groupseg.training.main --config ... [--key value ...]

Kill it at any moment; ``--resume auto`` continues from the latest complete checkpoint
(model, optimizer, scheduler, scaler, RNG states and data position), bitwise exactly on
CPU with a fixed seed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

import groupseg
from groupseg.loss import MultiLabelContrastiveLoss
from groupseg.dataclass_cli import add_dataclass_args
from groupseg.optim import build_optimizer as adamw
from groupseg.optim import decay_groups
from groupseg.precision import resolve_precision

from .checkpoint import latest_checkpoint, read_state, save_checkpoint
from .config import TrainConfig, load_config, parse_overrides
from .engine import MetricsWriter, choose_checkpoint, export_weights, keep_freed_memory, warmup_cosine

log = logging.getLogger("groupseg.train")


# --------------------------------------------------------------------------- building blocks
def build_model(cfg: TrainConfig) -> groupseg.GroupViT:
    if cfg.init_weights:
        model = groupseg.load_model(cfg.init_weights)
    else:
        if Path(cfg.model).suffix == ".json":
            mcfg = groupseg.ModelConfig.load(cfg.model)
        else:
            mcfg = groupseg.get_model_config(cfg.model)
        if cfg.model_overrides:
            d = mcfg.to_dict()
            _deep_update(d, cfg.model_overrides)
            mcfg = groupseg.ModelConfig.from_dict(d)
        if cfg.text_encoder:
            from .text_encoders import hf_text_config

            mcfg.text = hf_text_config(cfg.text_encoder, mcfg.text.context_length)
        model = groupseg.GroupViT(mcfg)
        if cfg.text_encoder:
            from .text_encoders import load_hf_text_weights

            load_hf_text_weights(model, cfg.text_encoder)
    if cfg.lock_text:
        for p in model.text.parameters():
            p.requires_grad_(False)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.train()
    if cfg.lock_text:
        model.text.eval()  # frozen: no dropout, features can be cached
    return model


class TextFeatureCache:
    """Text-tower outputs of a locked tower, computed once per distinct string (LiT-style).

    With the text tower frozen, a caption's features never change: caching them makes a
    training step cost only the vision tower and the projections.
    """

    def __init__(self, model: groupseg.GroupViT, tokenizer, device: torch.device, batch_size: int = 256) -> None:
        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, device, batch_size
        self.store: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: list[list[str]]) -> torch.Tensor:
        """(B lists of T strings) -> (B, T, width) features."""
        missing = list(dict.fromkeys(t for row in texts for t in row if t not in self.store))
        for i in range(0, len(missing), self.batch_size):
            chunk = missing[i : i + self.batch_size]
            feats = self.model.text(self.tokenizer(chunk).to(self.device)).float().cpu()
            self.store.update(zip(chunk, feats))
        return torch.stack([torch.stack([self.store[t] for t in row]) for row in texts]).to(self.device)


def _deep_update(d: dict, u: dict) -> None:
    for k, v in u.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            _deep_update(d[k], v)
        else:
            d[k] = v


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused where torch has it; no weight decay on norms, biases, embeddings and group tokens."""
    groups = decay_groups(model.named_parameters(), cfg.weight_decay, model.no_weight_decay())
    return adamw(groups, cfg.lr, cfg.betas, cfg.eps)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, warmup: int):
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr``."""
    return warmup_cosine(opt, total_steps, warmup, cfg.min_lr / cfg.lr if cfg.lr else 0.0)


# --------------------------------------------------------------------------- the run
class Trainer:
    """State and loop of one training run."""

    def __init__(self, cfg: TrainConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from . import data as D

        self.cfg = cfg
        self.D = D
        self.out = Path(cfg.output_dir)
        self.precision = resolve_precision(cfg.precision)
        self.accelerator = Accelerator(
            mixed_precision="no" if self.precision == "fp32" else self.precision,
            gradient_accumulation_steps=cfg.grad_accum,
            log_with=None if cfg.tracker == "none" else cfg.tracker,
            project_dir=str(self.out),
        )
        acc = self.accelerator
        set_seed(cfg.seed)
        if not cfg.train_data:
            raise ValueError("no training data: set train_data to a shard pattern (e.g. shards/train-{000000..000009}.tar)")
        self.urls = D.expand_urls(cfg.train_data)
        if cfg.resampled and not cfg.epoch_samples:
            raise ValueError("resampled=true needs epoch_samples (samples per epoch)")
        self.epoch_samples = cfg.epoch_samples or D.count_samples(self.urls)
        world = acc.num_processes
        self.batches_per_epoch = self.epoch_samples // (cfg.batch_size * world)
        if self.batches_per_epoch < cfg.grad_accum:
            raise ValueError(
                f"{self.epoch_samples} samples give no full batch of {cfg.batch_size} x {world} processes x {cfg.grad_accum} accumulation"
            )
        self.steps_per_epoch = self.batches_per_epoch // cfg.grad_accum
        total = self.steps_per_epoch * cfg.epochs
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        warmup = cfg.warmup_steps or int(cfg.warmup_epochs * self.steps_per_epoch)
        self.warmup = min(warmup, max(0, self.total_steps - 1))

        model = build_model(cfg)
        self.model_cfg = model.cfg
        opt = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(opt, cfg, self.total_steps, self.warmup)
        if cfg.compile:
            model = torch.compile(model)
        self.model, self.optimizer = acc.prepare(model, opt)
        acc.register_for_checkpointing(self.scheduler)
        self.text_cache = TextFeatureCache(self.unwrapped, self._tokenizer(), acc.device) if cfg.lock_text else None
        if cfg.text_encoder:
            from .text_encoders import copy_tokenizer

            self._export_extra = lambda d: copy_tokenizer(cfg.text_encoder, d)
        self.loss_fn = MultiLabelContrastiveLoss(
            cfg.multi_label_weight, acc.process_index, acc.num_processes, cfg.group_label_weight, cfg.group_usage_weight
        )
        self.return_groups = bool(cfg.group_label_weight or cfg.group_usage_weight)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped: dict[str, int] = {}
        self.samples_read = 0
        self.position = D.LoaderPosition()
        self.resume_position: dict | None = None

    # ------------------------------------------------------------------ checkpoints
    @property
    def unwrapped(self) -> groupseg.GroupViT:
        m = self.accelerator.unwrap_model(self.model)
        return getattr(m, "_orig_mod", m)

    def state(self, positions: list) -> dict[str, Any]:
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "total_steps": self.total_steps, "skipped": self.skipped, "samples_read": self.samples_read,
            "model_config": self.model_cfg.to_dict(),
            "positions": positions,  # the data position of every rank
        }

    def save(self) -> None:
        from accelerate.utils import gather_object

        acc = self.accelerator
        positions = gather_object([self.position.state_dict()]) if acc.num_processes > 1 else [self.position.state_dict()]
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = self.state(positions)
            save_checkpoint(self.out, self.step, lambda d: acc.save_state(str(d)), state, self.cfg.keep_last)
            self.export(self.out / "model")
        acc.wait_for_everyone()

    def export(self, directory: Path) -> None:
        """The model in groupseg's format (``groupseg segment --weights DIR`` reads it)."""
        dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[self.cfg.export_dtype]
        export_weights(self.unwrapped, directory, dtype, getattr(self, "_export_extra", None))

    def checked_resume(self) -> tuple[Path, dict] | None:
        """The checkpoint to resume from and its state, checked before anything is written."""
        cfg = self.cfg
        if not cfg.resume and latest_checkpoint(self.out) is not None:
            raise ValueError(
                f"{self.out} already holds checkpoints of an earlier run: pass --resume auto to continue it, "
                "or choose another --output-dir"
            )
        ckpt = choose_checkpoint(cfg.resume, self.out)
        if ckpt is None:
            return None
        st = read_state(ckpt)
        if st.get("model_config") != json.loads(json.dumps(self.model_cfg.to_dict())):
            raise ValueError(f"{ckpt}: checkpoint is of a different architecture than this run's model config")
        positions = st.get("positions") or []
        if len(positions) != self.accelerator.num_processes:
            raise ValueError(f"{ckpt}: saved by {len(positions)} processes, resumed with {self.accelerator.num_processes}")
        return ckpt, st

    def load(self, ckpt: Path, st: dict, metrics: MetricsWriter) -> None:
        """Continue from a checked checkpoint (``checked_resume``)."""
        self.accelerator.load_state(str(ckpt))
        self.step, self.epoch, self.batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
        self.skipped = st.get("skipped", {})
        self.samples_read = st.get("samples_read", 0)
        self.resume_position = st["positions"][self.accelerator.process_index]
        metrics.trim(self.step)  # the main process drops what was logged after the checkpoint
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, self.step, self.epoch, self.batch_in_epoch)

    # ------------------------------------------------------------------ loop
    def loader(self, epoch: int, position: dict | None = None):
        """The data loader of ``epoch``, continuing from a saved position when given."""
        cfg, acc, mc = self.cfg, self.accelerator, self.model_cfg
        pipe = self.D.build_train_pipeline(
            self.urls, image_size=mc.vision.image_size, mean=mc.image_mean, std=mc.image_std,
            batch_size=cfg.batch_size, num_prompts=cfg.num_prompts, shuffle=cfg.shuffle_buffer,
            seed=cfg.seed, resampled=cfg.resampled, drop_last=True,
            epoch_samples=self.batches_per_epoch * cfg.batch_size * acc.num_processes if cfg.resampled else None,
            scale=cfg.crop_scale, rank=acc.process_index, world_size=acc.num_processes,
            tokenizer=None if self.text_cache is not None else self._tokenizer(),
        )
        if position is not None and position.get("epoch") == epoch:
            pipe.resume(position)
        else:
            pipe.set_epoch(epoch)
        return self.D.build_loader(pipe, cfg.workers)

    def _tokenizer(self):
        from groupseg.tokenizer import HFTokenizer, get_tokenizer

        if self.model_cfg.text.kind == "hf":
            from .text_encoders import resolve_encoder_dir

            src = resolve_encoder_dir(self.cfg.text_encoder) if self.cfg.text_encoder else Path(self.cfg.init_weights) / "tokenizer"
            return HFTokenizer(src, self.model_cfg.text.context_length)
        return get_tokenizer(self.model_cfg)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        acc, cfg = self.accelerator, self.cfg
        px = batch["pixels"].to(acc.device, non_blocking=True)
        feats = text = None
        if self.text_cache is not None:
            feats = self.text_cache(batch["texts"])
        else:
            text = batch["text"].to(acc.device, non_blocking=True)
        with acc.accumulate(self.model):
            with acc.autocast():
                out = self.model(px, text, text_features=feats, return_groups=self.return_groups)
            losses = self.loss_fn(
                out["image_embeds"],
                out["text_embeds"],
                out["logit_scale"],
                out.get("multi_label_logit_scale"),
                out.get("group_embeds"),
                out.get("groupings"),
            )
            acc.backward(losses["loss"])
            if acc.sync_gradients and cfg.clip_grad > 0:
                acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {k: float(v.detach()) for k, v in losses.items()} | {"logit_scale": float(out["logit_scale"].detach())}

    def fit(self) -> groupseg.GroupViT:
        from tqdm import tqdm

        acc, cfg = self.accelerator, self.cfg
        resume = self.checked_resume()  # every check passes before anything is written
        self.out.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            cfg.save(self.out / "config.yaml")
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", acc.is_main_process)
        if resume is not None:
            self.load(*resume, self.metrics)
        if cfg.tracker != "none":
            acc.init_trackers("groupseg", config={k: str(v) for k, v in cfg.to_dict().items()})
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not acc.is_main_process)
        self._new_window()
        while self.step < self.total_steps and self.epoch < cfg.epochs:
            self.train_epoch(bar)
            if self.step < self.total_steps:  # this epoch's data is used up: next epoch
                self.epoch += 1
                self.batch_in_epoch = 0
                self.position = self.D.LoaderPosition()
        bar.close()
        last = latest_checkpoint(self.out)
        if last is None or read_state(last)["step"] != self.step:
            self.save()
        if cfg.val_data:
            self.evaluate()
        self.metrics.plot(self.out / "loss_curve.png")
        acc.end_training()
        return self.unwrapped

    def train_epoch(self, bar) -> None:
        """Steps of the current epoch, from the saved data position when resuming."""
        acc, cfg = self.accelerator, self.cfg
        with torch.random.fork_rng(devices=[]):  # DataLoader.__iter__ draws a seed: keep the global RNG exact
            it = iter(self.loader(self.epoch, self.resume_position))
        if self.resume_position is not None:
            self.position = self.D.LoaderPosition(self.resume_position)
            self.resume_position = None
        while self.batch_in_epoch < self.batches_per_epoch and self.step < self.total_steps:
            t0 = time.perf_counter()
            try:
                with torch.random.fork_rng(devices=[]):  # data loading never touches the model's RNG stream
                    batch = next(it)
            except StopIteration:
                break
            win = self.window  # (a new one after each record)
            win["wait"] += time.perf_counter() - t0
            self.position.update(batch)
            for k, v in batch.get("skip_reasons", {}).items():
                self.skipped[k] = self.skipped.get(k, 0) + int(v)
            losses = self.train_step(batch)
            self.batch_in_epoch += 1
            n = batch["pixels"].shape[0] * acc.num_processes
            win["samples"] += n
            self.samples_read += n
            for k, v in losses.items():
                win["sums"][k] = win["sums"].get(k, 0.0) + v
            win["n"] += 1
            if not acc.sync_gradients:
                continue
            self.scheduler.step()
            self.step += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                self._log_window(bar)
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self.evaluate()
            if self.step % cfg.save_every == 0:
                self.save()

    def _new_window(self) -> None:
        self.window = {"t": time.perf_counter(), "wait": 0.0, "samples": 0, "sums": {}, "n": 0}

    def _log_window(self, bar) -> None:
        """Mean losses, rates and skip count since the last record: ``metrics.jsonl``, trackers, the bar."""
        win = self.window
        dt = time.perf_counter() - win["t"]
        rec = {k: v / win["n"] for k, v in win["sums"].items()}
        rec |= {
            "step": self.step, "epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": win["samples"] / dt, "data_wait": win["wait"] / dt,
            "skipped": sum(self.skipped.values()),
            "skip_reasons": {k: v for k, v in sorted(self.skipped.items()) if v},
        }
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", sps=f"{rec['samples_per_s']:.1f}")
        self.metrics.write(rec)
        self.accelerator.log({k: v for k, v in rec.items() if k not in ("step",)}, step=self.step)
        self._new_window()

    def summary(self) -> str:
        """One line: samples read and skipped, by reason."""
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()) if v)
        return f"{self.samples_read} samples read, {skipped} skipped" + (f" ({reasons})" if reasons else "")

    def evaluate(self) -> dict[str, float] | None:
        """Retrieval recall@K on ``val_data`` (uses eval/ when installed; never required)."""
        if not self.cfg.val_data or not self.accelerator.is_main_process:
            return None
        try:
            from groupseg.eval.retrieval import embed_pairs, recall_at_k
        except ImportError:
            log.warning("eval package not importable: skipping evaluation")
            return None
        from groupseg.segment import Segmenter

        model = self.unwrapped
        was = model.training
        # the Segmenter puts the model in eval mode; train mode is restored below
        seg = Segmenter(model, templates="simple", device=self.accelerator.device, tokenizer=self._tokenizer())
        img, cap, owner = embed_pairs(seg, self.D.build_eval_pairs(self.cfg.val_data))
        res = recall_at_k(img @ cap.T, owner)
        model.train(was)
        if self.cfg.lock_text:
            model.text.eval()
        res = {f"val/{k}": v for k, v in res.items()}
        self.accelerator.log(res, step=self.step)
        with open(self.out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **res}) + "\n")
        log.info("step %d: %s", self.step, ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
        return res


# --------------------------------------------------------------------------- command line
def add_train_args(p: argparse.ArgumentParser) -> None:
    """``--config`` plus one option per ``TrainConfig`` field, each overriding the config file."""
    p.add_argument("--config", help="YAML file or shipped config name setting TrainConfig fields")
    add_dataclass_args(p.add_argument_group("TrainConfig fields (override the config file)"), TrainConfig, set_defaults=False)
    p.set_defaults(overrides=[])  # further --key value pairs (unknown keys are an error)
    p.epilog = (p.epilog or "") + "example:\n  groupseg train --config tiny-cpu --batch-size 32 --resume auto\n"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file (``--config``), then the field options given, then any ``--key value`` left over."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    return load_config(args.config, given | parse_overrides(list(args.overrides or [])))


def run_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    trainer = Trainer(cfg)
    trainer.fit()
    print(f"done: weights in {Path(cfg.output_dir) / 'model'}; {trainer.summary()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="groupseg.training.main", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    args, rest = p.parse_known_args(argv)
    args.overrides = rest
    try:
        return run_train(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"groupseg train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
