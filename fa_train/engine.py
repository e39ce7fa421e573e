"""Training loop: SGD with warm-up, AMP on CUDA, checkpoints (last.pt / best.pt), resume, JSONL metrics,
a progress bar with the loss terms, images/s and ETA, and the clean AP50 table at the end of a run.

The per-step work (which losses, which attacks) is the objective's (fa_train/adversarial/objectives.py);
this loop owns the optimizer, the schedule, the bookkeeping and the non-finite-loss guard.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from typing import Callable, Optional

import numpy as np
import torch

from . import distributed as D
from .checkpoint import (atomic_save, check_classes, load_checkpoint, load_into, resolved_data_paths, save_safetensors,
                         versions)
from .config import check_config, describe, dump_config
from .data import DataError, build_dataset, collate
from .evaluation import evaluate, format_ap_table
from .models import create_model


class TrainingError(RuntimeError):
    pass


class TrainingInterrupted(RuntimeError):
    """SIGTERM / SIGINT: a checkpoint was written; `signum` tells which."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # what the command exits with (fa_train.errors.run_cli)


def resolve_device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {name}: CUDA is not available on this machine")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model, tcfg):
    """SGD (or AdamW); weight decay on convolution/linear weights only (not BN, not biases), as in the paper's code."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if tcfg["optimizer"] == "adamw":  # converges faster on the small CPU demo; SGD is the paper's recipe
        return torch.optim.AdamW(groups, lr=tcfg["lr"], betas=(tcfg["momentum"], 0.999))
    if tcfg["optimizer"] != "sgd":
        raise ValueError(f"optimizer {tcfg['optimizer']!r}: expected sgd or adamw")
    return torch.optim.SGD(groups, lr=tcfg["lr"], momentum=tcfg["momentum"], nesterov=tcfg["nesterov"])


def lr_factor(step: int, steps_per_epoch: int, tcfg) -> float:
    epochs = tcfg["epochs"]
    total = max(1, epochs * steps_per_epoch)
    warm = min(tcfg["warmup_iters"], total // 2)
    f = 1.0
    if tcfg["schedule"] == "cosine":
        f = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    elif step >= int(tcfg["lr_drop_at"] * total):
        f = 0.1
    if warm and step < warm:
        f *= (step / warm) ** 4 * 0.99 + 0.01  # Darknet burn-in (power 4), never exactly zero
    return f


def worker_error_message(e: BaseException) -> Optional[str]:
    """The exception's own message when `e` is PyTorch's re-raise of an exception from a data-loader worker
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."), else None."""
    text = str(e)
    first = text.partition("\n")[0]
    if not (first.startswith("Caught ") and "DataLoader worker process" in first):
        return None
    cls = type(e)
    # the last line(s) of the worker's traceback: "<module>.<class>: <message>"
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
    i = text.rfind(f"\n{name}: ")
    return text[i + len(name) + 3:].rstrip("\n") if i >= 0 else None


class _WorkerErrorsUnwrapped:
    """A DataLoader iterator whose DataErrors from worker processes come out as in a single process: the DataError
    with its own one-line message (the worker's traceback kept in its `worker_traceback` attribute)."""

    def __init__(self, it):
        self._it = it

    def __iter__(self):
        return self

    def __len__(self):
        return len(self._it)

    def __next__(self):
        try:
            return next(self._it)
        except DataError as e:
            msg = worker_error_message(e)
            if msg is None:
                raise
            try:
                err = type(e)(msg)
            except TypeError:  # a subclass with another constructor
                err = DataError(msg)
            err.worker_traceback = str(e)
            raise err from None


class DetectionLoader(torch.utils.data.DataLoader):
    """torch's DataLoader, except that bad data found by a worker process is reported as the DataError itself
    (`fa-train: error: <file>: corrupt or unreadable image (...)`), exactly as without workers. Every loader of
    the toolkit (training, evaluation, fa-bench, fa-export calibration) is made by `make_loader`."""

    def __iter__(self):
        return _WorkerErrorsUnwrapped(super().__iter__())


def make_loader(dataset, batch_size, shuffle, workers, seed=0, drop_last=False, sampler=None, batch_sampler=None,
                timeout: float = 0):
    """`timeout` (seconds, with workers): a worker that hangs raises instead of stalling the run forever."""
    g = torch.Generator()
    g.manual_seed(seed)
    if batch_sampler is not None:
        kw = {"batch_sampler": batch_sampler}
    else:
        kw = {"batch_size": batch_size, "shuffle": shuffle and sampler is None, "drop_last": drop_last,
              "sampler": sampler}
    return DetectionLoader(dataset, num_workers=workers, collate_fn=collate, generator=g,
                           persistent_workers=workers > 0, worker_init_fn=_worker_init,
                           timeout=timeout if workers > 0 else 0, **kw)


def eval_loader(dataset, batch_size, workers):
    """Sequential loader over this rank's shard of `dataset` (all of it in a single process)."""
    return make_loader(dataset, batch_size, False, workers, sampler=D.ShardSampler(len(dataset)))


def _worker_init(worker_id):
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


# settings a resumed run may change (where it runs, how often it reports and saves, how long it trains on)
RESUME_MAY_CHANGE = {"device", "out", "data.workers", "data.loader_timeout", "data.bad_images", "data.max_test_images",
                     "data.test_split", "train.epochs", "train.eval_every", "train.save_every_steps",
                     "train.save_safetensors", "train.max_nonfinite", "train.amp"}


def resume_differences(saved: dict, now: dict, prefix: str = "") -> list:
    """'key: checkpoint value != current value' for every setting that differs and matters to the run."""
    out = []
    for k in sorted(set(saved) | set(now)):
        key = prefix + k
        if key in RESUME_MAY_CHANGE:
            continue
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += resume_differences(a, b, key + ".")
        # keys added to the config since the checkpoint was written, or removed since, are not differences
        elif a != b and k in saved and k in now:
            out.append(f"{key}: {a!r} (checkpoint) != {b!r} (now)")
    return out


def check_resume(ckpt: dict, cfg: dict, path: str) -> Optional[str]:
    """Refuse a resume that would not continue the run of checkpoint `ckpt` with config `cfg` (an error listing
    every difference); returns a message when the run is already finished (nothing to do), else None."""
    saved = ckpt.get("config")
    if not isinstance(saved, dict) or "optimizer" not in ckpt:
        raise TrainingError(f"--resume {path}: not a training checkpoint of fa-train (no run configuration or "
                            f"optimizer state); to start a new run from its weights, pass it as --init")
    diffs = resume_differences(saved, cfg)
    if diffs:
        raise TrainingError(f"--resume {path}: the run was started with another configuration; resuming it "
                            f"would not continue the same run:\n  " + "\n  ".join(diffs))
    from .adversarial.objectives import data_passes

    done, epochs = int(ckpt.get("epoch", 0)), cfg["train"]["epochs"]
    m = cfg.get("method", {})
    replays = int(m.get("free_replays") or 1) if m.get("name", "standard") != "standard" else 1
    passes = data_passes(epochs, replays)  # Free AT: `epoch` counts passes over the data
    if passes < done:
        raise TrainingError(f"{describe('train.epochs', epochs)}: {path} has already trained {done} epochs; "
                            f"pass more than {done * replays if replays > 1 else done} to train longer")
    if passes == done:
        return (f"{path}: the run is finished ({done} of {passes} epochs); nothing to do (raise --epochs to "
                f"train longer)")
    return None


class Trainer:
    def __init__(self, cfg: dict, log: Callable[[str], None] = print, progress: bool = True):
        """Builds the data, model, optimizer and objective of a run; writes nothing (the run folder is made by
        `fit`, once a resume has been accepted)."""
        self.cfg = check_config(cfg)
        dist_device = D.init_from_env(cfg["device"])  # torchrun: join the process group
        self.rank, self.world = D.rank(), D.world_size()
        self.main = self.rank == 0
        self.log = log if self.main else (lambda m: None)  # rank 0 alone logs, shows progress and writes files
        log = self.log
        self.progress = progress and self.main
        t, d = cfg["train"], cfg["data"]
        self.device = resolve_device(dist_device or cfg["device"])
        seed_everything(t["seed"])
        self.train_set = build_dataset(d["spec"], "train", d["img_size"], d["train_split"], d["max_images"],
                                       d["synth_seed"], log=log)
        self.test_set = build_dataset(d["spec"], "test", d["img_size"], d["test_split"], d["max_test_images"],
                                      d["synth_seed"], log=log)
        self.train_set.skip_bad = d["bad_images"] == "skip"
        self.skipped_images = []
        for ds in (self.train_set, self.test_set):
            if len(ds) == 0:
                raise TrainingError(f"{'training' if ds is self.train_set else 'test'} set {ds.name} is empty")
        for ds in (self.train_set, self.test_set):
            if ds.stats.clipped or ds.stats.dropped_zero_area:
                log(f"data {ds.name}: {ds.stats.summary()}")
        m = cfg["model"]
        self.model = create_model(m["name"], len(self.train_set.class_names),
                                  **{k: v for k, v in m.items() if k != "name" and v is not None}).to(self.device)
        if t["init"]:
            self._load_init(t["init"])
        if t.get("sync_bn") and self.world > 1:
            self.model = D.convert_sync_batchnorm(self.model, self.device)
        D.broadcast_model(self.model)  # every rank starts from rank 0's weights
        self.optimizer = build_optimizer(self.model, t)
        self.batch_size = t["batch_size"]
        try:  # --batch-size is the global batch: each of the `world` ranks takes batch_size / world of it
            self.sampler = D.GlobalBatchSampler(len(self.train_set), self.batch_size, shuffle=True, drop_last=True,
                                                seed=t["seed"])
        except ValueError as e:
            raise TrainingError(str(e)) from None
        self.train_loader = make_loader(self.train_set, self.batch_size, True, d["workers"], t["seed"],
                                        batch_sampler=self.sampler, timeout=d["loader_timeout"])
        if len(self.train_loader) == 0:
            raise TrainingError(f"--batch-size {self.batch_size} is larger than the training set "
                                f"({len(self.train_set)} images)")
        self.test_loader = make_loader(self.test_set, self.batch_size // self.world or 1, False, d["workers"],
                                       sampler=D.ShardSampler(len(self.test_set)), timeout=d["loader_timeout"])
        self.steps_per_epoch = len(self.train_loader)
        from .adversarial.objectives import data_passes

        # Free AT replays each batch m times: ceil(epochs / m) passes over the data, m optimizer steps per batch,
        # so the schedule spans about the optimizer steps of `epochs` standard epochs
        self.replays = int(cfg["method"].get("free_replays") or 1) if cfg["method"]["name"] != "standard" else 1
        self.epochs = data_passes(t["epochs"], self.replays)
        sched = dict(t, epochs=self.epochs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.steps_per_epoch * self.replays, sched))
        self.amp = bool(t["amp"]) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        from .adversarial.objectives import build_objective

        self.objective = build_objective(cfg, self.model, self.device, log, steps_per_epoch=self.steps_per_epoch)
        self.epoch, self.step, self.best_ap = 0, 0, -1.0
        self.batch_in_epoch = 0  # batches of the current epoch already consumed (a mid-epoch resume skips them)
        self._signal = None
        self._threads_before = None  # the CPU thread count before a resume adopted its checkpoint's (restored by fit)
        self.nonfinite_in_row = self.nonfinite_total = 0
        self.out = cfg["out"]

    # -- weights
    def _load_init(self, path):
        if path.endswith(".weights") or path.endswith(".conv.74"):
            from .models.darknet import load_darknet_weights

            if not hasattr(self.model, "darknet_convs"):
                raise TrainingError(f"--init {path}: Darknet weights load into yolov3 only, not into "
                                    f"{self.model.arch_config()['name']} (its local torchvision weights: "
                                    f"model.weights / --weights-backbone)")

            n = load_darknet_weights(self.model, path)
            self.log(f"init: {n} Darknet convolutions from {path}")
        else:
            ckpt = load_checkpoint(path)
            load_into(self.model, ckpt, path)
            self.log(f"init: weights from {path}")

    def checkpoint(self) -> dict:
        return {
            "model": self.model.state_dict(), "world_size": self.world, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "best_ap": self.best_ap, "batch_in_epoch": self.batch_in_epoch,
            "nonfinite_total": self.nonfinite_total,
            # Free AT's carried perturbation (rank 0's), None otherwise
            "objective_state": self.objective.state_dict() if hasattr(self.objective, "state_dict") else {},
            "arch": self.model.arch_config(), "class_names": list(self.train_set.class_names),
            "config": resolved_data_paths(self.cfg), "versions": versions(),
            # CPU sums split across threads round differently for another thread count: an exact resume needs it
            "cpu_threads": torch.get_num_threads(),
            "rng": {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
                    "python": list(random.getstate()[1]),
                    **({"torch_cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})},
        }

    def save(self, name: str):
        if self.main:
            atomic_save(self.checkpoint(), os.path.join(self.out, name))

    def resume(self, path: str) -> Optional[str]:
        """Continue the run of checkpoint `path`; returns the message of a finished run (nothing loaded)."""
        ckpt = load_checkpoint(path)
        finished = check_resume(ckpt, self.cfg, path)
        if finished:
            return finished
        check_classes(ckpt, self.train_set.class_names, path, self.train_set.name)
        load_into(self.model, ckpt, path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step, self.best_ap = ckpt["epoch"], ckpt["step"], ckpt["best_ap"]
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        self.nonfinite_total = int(ckpt.get("nonfinite_total", 0))
        self._adopt_threads(ckpt.get("cpu_threads"), path)
        if hasattr(self.objective, "load_state_dict"):
            if self.world > 1 and (ckpt.get("objective_state") or {}).get("free_delta") is not None:
                # the checkpoint holds rank 0's perturbation only: each rank starts its own afresh
                self.log("Free AT under torchrun: the carried perturbations restart at the resume")
            else:
                self.objective.load_state_dict(ckpt.get("objective_state") or {})
        self.log(f"resumed from {path} at epoch {self.epoch + 1}, batch {self.batch_in_epoch} (step {self.step})")
        return None

    def _adopt_threads(self, saved, path: str) -> None:
        """A run on the CPU continues with the CPU thread count it was computed with (sums split across another
        number of threads round differently, and the resumed weights would drift from the uninterrupted run's); the
        count is restored when `fit` returns. Checkpoints written before the count was recorded are resumed as they
        are."""
        now = torch.get_num_threads()
        if self.device.type != "cpu" or not saved or int(saved) == now:
            return
        self._threads_before = now
        torch.set_num_threads(int(saved))
        self.log(f"resume: {saved} CPU threads as the run of {path} was computed with (this process had {now}), so "
                 f"the result is the uninterrupted run's")

    def _metrics(self, rec: dict):
        if not self.main:
            return
        with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")

    # -- the loop
    def train_epoch(self):
        from tqdm import tqdm

        self.model.train()
        t = self.cfg["train"]
        # every random draw of an epoch (shuffle, worker seeds, flips, attacks) follows from the epoch's seed, so a
        # resume mid-epoch replays the skipped batches' draws and continues exactly where the run stopped
        epoch_seed = t["seed"] * 1000 + self.epoch
        self.train_loader.generator.manual_seed(epoch_seed)
        self.sampler.set_epoch(epoch_seed)
        seed_everything(epoch_seed + 7919 * self.rank)  # per-rank streams; rank 0 = the single-process run
        skip = self.batch_in_epoch
        save_every = int(t.get("save_every_steps") or 0)
        sums, n_img, nsteps, t0 = {}, 0, 0, time.time()
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{self.epochs}",
                   disable=None if self.progress else True, unit="batch", dynamic_ncols=True)
        for i, (images, targets, metas) in enumerate(self._batches(bar)):
            if i < skip:
                continue
            self.batch_in_epoch = i + 1
            self._check_signal()
            self._note_skipped(metas.skipped)
            if len(images):
                images = images.to(self.device, non_blocking=True)
                targets = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
            step_before = self.step
            for replay in range(self.replays):  # Free AT: the same batch m times (1 otherwise)
                logs = self._optimizer_step(images, targets, i, replay)
                if logs is None:
                    continue
                n_img += len(images) * self.world
                nsteps += 1
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
            # checkpoints fall between batches (a resume starts a batch, never the middle of its replays)
            if save_every and self.step // save_every > step_before // save_every:
                self.save("last.pt")
                self._metrics({"event": "checkpoint", "epoch": self.epoch, "batch": self.batch_in_epoch,
                               "step": self.step})
            if nsteps:
                mean = {k: v / nsteps for k, v in sums.items()}
                bar.set_postfix({**{k: f"{v:.3f}" for k, v in mean.items() if k in (
                    "loss", "box", "obj", "cls", "adv", "clean", "ssfa", "kdfa")},
                    "img/s": f"{n_img / max(time.time() - t0, 1e-9):.1f}",
                    "lr": f"{self.optimizer.param_groups[0]['lr']:.2e}"})
        steps = max(1, nsteps)
        rec = {"epoch": self.epoch + 1, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
               "images_per_s": n_img / max(time.time() - t0, 1e-9),
               **{f"train/{k}": v / steps for k, v in sums.items()}}
        return rec

    def _attack_summary(self) -> str:
        """The training attack in the start line (nothing for standard training)."""
        m = self.cfg["method"]
        ob = self.objective
        if m["name"] == "standard" or not hasattr(ob, "eps"):
            return ""
        kind = f"Free AT m={ob.free_replays}" if ob.free_replays > 1 else f"PGD-{ob.steps}"
        warm = f", eps warm-up over {m['eps_warmup_epochs']:g} epochs" if ob.eps_warmup_steps else ""
        return (f"; training attack {kind} at eps {ob.eps:g}, step {ob.step_size:g}, "
                f"{'random' if ob.random_start else 'clean'} start, objective {ob.objective}{warm}")

    def _optimizer_step(self, images, targets, batch: int, replay: int) -> Optional[dict]:
        """One optimizer step on the batch (one replay of it under Free AT): the objective's passes, the
        non-finite-loss guard, the update. The logged values, or None when the step was skipped."""
        from .adversarial.objectives import StepInfo

        self.optimizer.zero_grad(set_to_none=True)
        if len(images):
            info = StepInfo(step=self.step, epoch=self.epoch, batch=batch, replay=replay, rank=self.rank)
            if hasattr(self.objective, "begin_step"):  # where the step is: its random draws, warm-up, Free AT replay
                self.objective.begin_step(info)
            with D.sync_normalizers():  # loss denominators over the global batch
                logs = self.objective.step(self.model, images, targets, self.scaler, self.amp)
        else:  # every image of this rank's share was skipped
            logs = {"loss": 0.0}
        # ranks agree on skipping: a non-finite loss anywhere (or an empty batch) skips the step everywhere
        bad, empty = D.all_reduce_values([float(not math.isfinite(logs["loss"])), float(len(images) == 0)])
        if empty and not bad:
            if replay == 0:
                self.log(f"step {self.step}: every image of the batch was skipped, no update")
            return None
        if bad:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            self.optimizer.zero_grad(set_to_none=True)
            self._metrics({"event": "nonfinite_loss", "epoch": self.epoch, "step": self.step, **logs})
            self.log(f"step {self.step}: non-finite loss, step skipped ({logs})")
            if self.nonfinite_in_row >= self.cfg["train"]["max_nonfinite"]:
                raise TrainingError(f"{self.nonfinite_in_row} non-finite losses in a row, the last at step "
                                    f"{self.step}: {logs}; {self._last_good()}")
            return None
        self.nonfinite_in_row = 0
        D.average_gradients(self.model.parameters())
        if self.world > 1:  # logged values: the mean over ranks
            keys = sorted(logs)
            logs = dict(zip(keys, (v / self.world for v in D.all_reduce_values([logs[k] for k in keys]))))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return logs

    def _batches(self, loader):
        """The loader's batches; a worker that dies or hangs becomes a TrainingError that says so."""
        it = iter(loader)
        while True:
            try:
                yield next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if "DataLoader worker" in str(e) or "DataLoader timed out" in str(e):
                    raise TrainingError(f"data loading failed at epoch {self.epoch + 1}, batch {self.batch_in_epoch + 1}: "
                                        f"{e}; {self._last_good()}") from e
                raise

    def _last_good(self) -> str:
        path = os.path.join(self.out, "last.pt")
        if os.path.isfile(path):
            return f"the last good checkpoint is {path} (continue with --resume)"
        return "no checkpoint had been written yet"

    def _note_skipped(self, skipped):
        for b in skipped:
            self.skipped_images.append(b.file)
            self.log(f"skipped image {b.file}: {b.reason}")
            self._metrics({"event": "bad_image", "epoch": self.epoch, "file": b.file, "reason": b.reason})

    def _check_signal(self):
        got = self._signal
        if self.world > 1:  # all ranks stop at the same batch
            got = int(D.all_reduce_values([float(self._signal or 0)], op="max")[0]) or None
        if got is not None:
            self._signal = got
            # the batch in hand has not been trained on: the checkpoint resumes at it
            self.batch_in_epoch -= 1
            self.save("last.pt")
            D.barrier()  # no rank exits before rank 0 has written the checkpoint
            raise TrainingInterrupted(self._signal, f"stopped by signal {self._signal} at epoch {self.epoch + 1}, "
                                      f"step {self.step}; {self.out}/last.pt written, continue with --resume")

    def fit(self, resume: Optional[str] = None) -> Optional[dict]:
        """Train (or continue the run of checkpoint `resume`) to the configured epochs; the last evaluation, or
        None when the resumed run was already finished (nothing evaluated, nothing written)."""
        import signal
        import threading

        handlers = {}
        if threading.current_thread() is threading.main_thread():
            def on_signal(signum, frame):
                self._signal = signum

            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, on_signal)
        try:
            return self._fit(resume)
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            if self._threads_before:
                torch.set_num_threads(self._threads_before)  # a resume adopted the checkpoint's count for the run
                self._threads_before = None

    def _fit(self, resume: Optional[str] = None) -> Optional[dict]:
        # nothing is written to the run folder before the run is accepted (a refused resume leaves it untouched)
        if resume:
            finished = self.resume(resume)
            if finished:
                self.log(finished)
                return None
        if self.main:
            os.makedirs(self.out, exist_ok=True)
            dump_config(self.cfg, os.path.join(self.out, "config.yaml"))
        if not resume and self.main and os.path.isfile(os.path.join(self.out, "metrics.jsonl")):
            # a new run in an existing folder starts a new record (a resumed run continues its own)
            os.replace(os.path.join(self.out, "metrics.jsonl"), os.path.join(self.out, "metrics.previous.jsonl"))
            self.log(f"{self.out}/metrics.jsonl of an earlier run moved to metrics.previous.jsonl")
        t = self.cfg["train"]
        self.log(f"training {self.cfg['model']['name']} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M "
                 f"parameters) with method {self.cfg['method']['name']} on {self.train_set.name} "
                 f"({len(self.train_set)} images), device {self.device}, {t['epochs']} epochs"
                 + (f" (Free AT: each batch replayed {self.replays} times, so {self.epochs} passes over the data, "
                    f"{self.epochs * self.replays * self.steps_per_epoch} optimizer steps)" if self.replays > 1 else "")
                 + self._attack_summary()
                 + (f", {self.world} processes, {self.batch_size // self.world} images each per step"
                    if self.world > 1 else ""))
        result = None
        while self.epoch < self.epochs:
            rec = self.train_epoch()
            self.epoch += 1
            self.batch_in_epoch = 0
            last = self.epoch == self.epochs
            if last or (t["eval_every"] and self.epoch % t["eval_every"] == 0):
                result = evaluate(self.model, self.test_loader, self.device, progress=self.progress)
                rec["val/AP50"] = result["AP50"]
                rec["val/AP"] = result["stats"]["AP"]
                if result["AP50"] > self.best_ap:
                    self.best_ap = result["AP50"]
                    self.save("best.pt")
                    if t.get("save_safetensors") and self.main:
                        save_safetensors(self.model, os.path.join(self.out, "best.safetensors"),
                                         self.train_set.class_names, self.cfg)
            self.save("last.pt")
            if t.get("save_safetensors") and self.main:
                save_safetensors(self.model, os.path.join(self.out, "last.safetensors"), self.train_set.class_names,
                                 self.cfg)
            self._metrics(rec)
            self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
        self.log(format_ap_table(result, f"clean AP50 on {self.test_set.name} (last epoch)"))
        if self.skipped_images:
            self.log(f"{len(self.skipped_images)} training images were skipped (data.bad_images: skip); "
                     f"listed in {self.out}/metrics.jsonl")
        if self.main:
            with open(os.path.join(self.out, "eval.json"), "w") as f:
                json.dump({"clean": result, "best_AP50": self.best_ap, "skipped_images": self.skipped_images,
                           "world_size": self.world}, f, indent=2)
        D.barrier()
        return result
