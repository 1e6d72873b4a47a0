"""`train/supervised`: plain supervised training — baselines, teachers, oracle retrains. Keeps the best validation
checkpoint, resumes from the newest checkpoint, stops cleanly on budget or cancel. A sharded training set too large
for memory streams (workers.data.streaming) and is checkpointed mid-epoch with its stream position."""
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.methods.train import TrainParams
from workers import distributed
from workers.checkpoints import optimizer_tensors, pack, restore_optimizer
from workers.data.streaming import ShardStream, StreamState, stream_epoch
from workers.errors import JobFailure
from workers.evaluation import predict_logits
from workers.inputs import StreamedTrainingSet, load_training_data, resolve_model, to_tensors
from workers.methods import Outcome, register
from workers.models import default_arch
from workers.outputs import publish_model
from workers.runtime import JobRun, Stop
from workers.training import auto_batch_size, lr_factor, make_optimizer, pick_device, set_lr, train_one_epoch

AUTO_MAX_EPOCHS = 1000
PROGRESS_EVERY = 50  # steps between progress updates inside a streamed epoch


def shift_images(x: torch.Tensor) -> torch.Tensor:
    """Random ±1 pixel translations, the classic cheap augmentation for small digit images."""
    dx, dy = torch.randint(-1, 2, (2,)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


@register("train", "supervised")
class SupervisedTraining:
    data_parallel = True  # trains through train_one_epoch and ends training with distributed.training_done()

    def setup(self, run: JobRun) -> None:
        self.p = TrainParams.model_validate(run.params)
        self.run_ = run
        torch.manual_seed(run.spec.seed)
        self.device = pick_device(run.settings.device)
        data, self.val = load_training_data(run, run.spec.dataset, run.spec.seed)
        # A streamed training set is described (shape, classes, normalisation statistics) by its first rows.
        self.streamed = data if isinstance(data, StreamedTrainingSet) else None
        self.train = self.streamed.sample if self.streamed else data
        self.train_rows = self.streamed.source.rows if self.streamed else len(data.y)
        streaming = (f" streamed from {len(self.streamed.source.shards)} shards" if self.streamed else "")
        run.event("data.loaded", f"Loaded {self.train_rows} training rows{streaming} and {len(self.val.y)} validation "
                  f"rows, {len(self.train.classes)} classes, inputs {list(self.train.x.shape[1:])}.",
                  train_rows=self.train_rows, validation_rows=len(self.val.y), classes=len(self.train.classes),
                  streamed=self.streamed is not None)
        self.model, self.model_info = resolve_model(run, run.spec.model, self.train, default_arch(self.train.kind))
        self.model.to(self.device)
        if not self.streamed:
            self.x, self.y = to_tensors(self.train, self.device)
        self.val_x, self.val_y = to_tensors(self.val, self.device)
        self.optimizer = make_optimizer(self.p.optimizer, self.model, self.p.lr, self.p.weight_decay, self.p.momentum)
        self.epochs = AUTO_MAX_EPOCHS if self.p.epochs == "auto" else self.p.epochs
        if run.spec.budget.max_epochs:
            self.epochs = min(self.epochs, run.spec.budget.max_epochs)
        self.batch_size = self.p.batch_size if self.p.batch_size != "auto" else auto_batch_size(self.train_rows)
        self.steps_per_epoch = math.ceil(self.train_rows / self.batch_size)
        if self.streamed:
            # Each rank streams its own slice (workers.data.streaming.stream) in batches of its share of the global
            # batch; every rank takes the same number of steps.
            self.rank_batch_size = max(1, self.batch_size // distributed.world())
            self.steps_per_epoch = math.ceil(self.train_rows // distributed.world() / self.rank_batch_size)
        self.epoch, self.step = 0, 0
        self.stream_state: StreamState | None = None  # how far the current streamed epoch got
        self.best_accuracy, self.best_loss, self.best_epoch, self.best_state = -1.0, math.inf, -1, None
        self.curves: dict[str, list[list[float]]] = {"train_loss": [], "val_loss": [], "val_accuracy": [], "lr": []}
        n_params = sum(p.numel() for p in self.model.parameters())
        run.event("model.built", f"Model {self.model_info['arch']} with {n_params} parameters on {self.device}.",
                  arch=self.model_info["arch"], params=n_params, device=str(self.device))

    def save_checkpoint(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        opt_tensors, opt_meta = optimizer_tensors(self.optimizer)
        groups = {"model": self.model.state_dict(), "optimizer": opt_tensors}
        if self.best_state is not None:
            groups["best"] = self.best_state
        meta = {"epoch": self.epoch, "step": self.step, "metric_step": self.epoch, "best_accuracy": self.best_accuracy,
                "best_loss": self.best_loss,
                "best_epoch": self.best_epoch, "curves": self.curves, "optimizer": opt_meta,
                "stream": self.stream_state.as_json() if self.stream_state else None}
        return groups, meta

    def load_checkpoint(self, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        self.model.load_state_dict(groups["model"])
        restore_optimizer(self.optimizer, groups.get("optimizer", {}), meta["optimizer"], self.device)
        self.best_state = groups.get("best")
        self.epoch, self.step = meta["epoch"], meta["step"]
        self.best_accuracy, self.best_epoch = meta["best_accuracy"], meta["best_epoch"]
        self.best_loss = meta.get("best_loss", math.inf)
        self.curves = meta["curves"]
        self.stream_state = StreamState.from_json(meta["stream"]) if meta.get("stream") else None

    def evaluate(self) -> dict[str, float]:
        logits = predict_logits(self.model, self.val_x)
        return {"val_loss": F.cross_entropy(logits, self.val_y).item(),
                "val_accuracy": (logits.argmax(1) == self.val_y).float().mean().item()}

    def run(self, run: JobRun) -> Outcome:
        p = self.p
        stopped_by = "completed"
        total_steps = None if p.epochs == "auto" else self.epochs * self.steps_per_epoch
        if run.spec.budget.max_steps:
            total_steps = min(total_steps or run.spec.budget.max_steps, run.spec.budget.max_steps)
        self.total_steps = total_steps
        try:
            while self.epoch < self.epochs:
                self._train_epoch(run, total_steps)
                if p.epochs == "auto" and self.epoch - self.best_epoch > p.patience:
                    run.event("train.plateau", f"No validation gain for {p.patience} epochs; stopping.")
                    break
        except Stop as stop:
            stopped_by = run.budget_reached(stop, f"Budget reached after {self.epoch} full epochs; keeping the best "
                                            "model.")
            self.step = stop.step if stop.step is not None else self.step
        distributed.training_done()
        if self.best_state is None:
            raise JobFailure("budget_exhausted", "The budget ran out before one epoch finished, so there is no model "
                             "to keep; raise budget.max_seconds or lower the data size.")
        self.model.load_state_dict(self.best_state)
        sections = {"training": {**p.model_dump(mode="json"), "batch_size_used": self.batch_size,
                                 "epochs_run": self.epoch, "steps": self.step, "best_epoch": self.best_epoch + 1}}
        if self.streamed:
            source = self.streamed.source
            sections["dataset"] = {
                "uri": run.spec.dataset.uri, "kind": self.train.kind, "train_rows": self.train_rows,
                "validation_rows": len(self.val.y), "input_shape": list(source.input_shape), "classes": source.classes,
                "streamed": True, "format": source.format, "train_shards": len(source.shards),
                "validation_shards": self.streamed.validation_shards, "statistics_rows": len(self.train.y)}
        run.event("train.finished", f"Best validation accuracy {self.best_accuracy:.4f} at epoch {self.best_epoch + 1}.",
                  best_accuracy=self.best_accuracy, best_epoch=self.best_epoch + 1)
        result = publish_model(run, self.model, self.model_info, self.train, self.val, self.val_x, self.val_y,
                               curves=self.curves, stopped_by=stopped_by, sections=sections)
        return Outcome(stopped_by=stopped_by, metrics=result)

    def _train_epoch(self, run: JobRun, total_steps: int | None) -> None:
        p = self.p
        lr = p.lr * (lr_factor(p.schedule, self.epoch, self.epochs) if p.epochs != "auto" else 1.0)
        set_lr(self.optimizer, lr)

        def loss_of(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            if p.augment and xb.ndim == 4:
                xb = shift_images(xb)
            return F.cross_entropy(self.model(xb), yb, label_smoothing=p.label_smoothing)

        if self.streamed:
            train_loss, self.step = train_one_epoch(run, self.model, self.optimizer, self.train_rows, self.batch_size,
                                                    lambda batch: loss_of(*batch), seed=run.spec.seed,
                                                    epoch=self.epoch, step=self.step, lr_hint=p.lr,
                                                    batches=self._streamed_batches(run), rows_of=lambda b: len(b[1]))
            self.stream_state = None
        else:
            train_loss, self.step = train_one_epoch(run, self.model, self.optimizer, len(self.y), self.batch_size,
                                                    lambda index: loss_of(self.x[index], self.y[index]),
                                                    seed=run.spec.seed, epoch=self.epoch, step=self.step, lr_hint=p.lr)
        self.epoch += 1
        scores = self.evaluate()
        for name, value in (("train_loss", train_loss), ("val_loss", scores["val_loss"]),
                            ("val_accuracy", scores["val_accuracy"]), ("lr", lr)):
            self.curves[name].append([self.epoch, value])
        run.metrics(self.epoch, {"train_loss": train_loss, **scores, "lr": lr})
        # Best = highest validation accuracy, ties broken by lower validation loss: on small validation sets
        # accuracy saturates early, and the first epoch to reach it is usually undertrained.
        if (scores["val_accuracy"], -scores["val_loss"]) > (self.best_accuracy, -self.best_loss):
            self.best_accuracy, self.best_loss, self.best_epoch = scores["val_accuracy"], scores["val_loss"], self.epoch - 1
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        run.progress(self.step, total_steps, epoch=self.epoch)
        run.event("train.epoch", f"Epoch {self.epoch}/{self.epochs if self.p.epochs != 'auto' else 'auto'}: "
                  f"train loss {train_loss:.4f}, val accuracy {scores['val_accuracy']:.4f}.", level="debug",
                  epoch=self.epoch, train_loss=round(train_loss, 5), **{k: round(v, 5) for k, v in scores.items()})
        if run.checkpoint_due():
            groups, meta = self.save_checkpoint()
            run.save_checkpoint(pack(groups), meta)

    def _streamed_batches(self, run: JobRun) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's (x, y) batches from the shards, continuing where a checkpoint of this epoch left off. Between
        steps (after one batch's update, before the next batch) it records the batch and checkpoints when due, so a
        long epoch is resumable mid-way and a resumed attempt trains on each remaining row exactly once. In a
        multi-device job every rank streams its own rows; all ranks are at the same step and window position, so
        rank 0's checkpoint holds every rank's stream state."""
        stream = ShardStream(self.streamed.source, seed=run.spec.seed, epoch=self.epoch, rank=distributed.rank(),
                             world=distributed.world(), batch_size=self.rank_batch_size,
                             window_rows=run.settings.stream_shuffle_rows, state=self.stream_state)
        self.stream_state = stream.state
        # Dropout and augmentation draw from torch's RNG: reseeded per epoch, as the in-memory path's epoch_batches.
        torch.manual_seed(run.spec.seed * 100003 + self.epoch)
        row_log = self._row_log(run)
        try:
            for batch in stream_epoch(stream, run.settings.stream_workers):
                if row_log:
                    row_log.write(f"{self.epoch} {self.step} {' '.join(batch.ids)}\n")
                    row_log.flush()
                yield batch.x.to(self.device), batch.y.to(self.device)
                stream.record(batch)
                self.step += 1  # what train_one_epoch counts too; the checkpoint below needs it now
                if self.step % PROGRESS_EVERY == 0:  # a streamed epoch may be long: report progress inside it
                    run.progress(self.step, self.total_steps, epoch=self.epoch)
                if run.checkpoint_due() and stream.batches_done() < len(stream):
                    groups, meta = self.save_checkpoint()
                    run.save_checkpoint(pack(groups), meta)
        finally:
            if row_log:
                row_log.close()

    @staticmethod
    def _row_log(run: JobRun):
        """REFINERY_STREAM_ROW_LOG (debug, audit): one line per streamed batch, "<epoch> <step> <row ids>"."""
        if not run.settings.stream_row_log:
            return None
        folder = Path(run.settings.stream_row_log)
        folder.mkdir(parents=True, exist_ok=True)
        rank = f"-rank-{distributed.rank()}" if distributed.rank() else ""
        return open(folder / f"{run.job_id}-attempt-{run.attempt}{rank}.log", "a")
