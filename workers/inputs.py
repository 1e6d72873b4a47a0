"""A job's inputs: datasets and model references resolved inside the job's project (`file_…`, `job://…`)."""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.spec import DatasetRef, ModelRef
from db.repositories import artifacts as artifact_repo
from db.repositories.jobs import get_job
from db.session import transaction
from workers.data import Dataset, fetch, load_dataset, split_validation
from workers.data.streaming import ShardedSource, is_sharded, open_sharded
from workers.errors import JobFailure
from workers.models import Classifier, build_model, load_model, load_weights_into
from workers.runtime import JobRun


def lookup(run: JobRun, uri: str) -> str:
    """Storage key of an uploaded file or another job's artifact, only within the caller's project."""
    with transaction(run.settings.database_url) as session:
        if uri.startswith("file_"):
            row = artifact_repo.get_project_file(session, run.project_id, uri)
            if row is None:
                raise JobFailure("file_not_found", f"No uploaded file {uri!r} in this project; upload it with POST /v1/files.")
            return row.storage_key
        job_id, _, name = uri.removeprefix("job://").partition("/")
        job = get_job(session, job_id)
        if job is None or job.project_id != run.project_id:
            raise JobFailure("job_not_found", f"No job {job_id!r} in this project.")
        artifact = artifact_repo.get_artifact(session, job_id, name)
        if artifact is None:
            names = [a.name for a in artifact_repo.list_artifacts(session, job_id)]
            raise JobFailure("artifact_not_found", f"Job {job_id} has no artifact {name!r}"
                             + (f"; it has {', '.join(names)}." if names else f" (its status is {job.status})."))
        return artifact.storage_key


def _fetch(run: JobRun, uri: str) -> Path:
    return fetch(uri, run.workdir / "inputs", run.settings, lambda u: lookup(run, u), run.store.copy_to)


def _load(run: JobRun, uri: str, label_column: str | None, classes: list[str] | None = None) -> Dataset:
    return load_dataset(uri, label_column=label_column, dest_dir=run.workdir / "inputs", settings=run.settings,
                        lookup=lambda u: lookup(run, u), copy=run.store.copy_to, classes=classes)


def load_train_and_validation(run: JobRun, ref: DatasetRef, seed: int) -> tuple[Dataset, Dataset]:
    return _with_validation(run, ref, _load(run, ref.uri, ref.label_column), seed)


@dataclass
class StreamedTrainingSet:
    """A training set too large for memory: its shards stream (workers.data.streaming); `sample`, its first rows,
    stands in for it where the whole set is not needed (input shape, classes, normalisation statistics)."""
    source: ShardedSource
    sample: Dataset
    validation_shards: list[str]  # held out of training (validation.fraction); empty with validation.uri


STATS_ROWS = 10_000  # rows the normalisation statistics of a streamed training set are computed on, at most


def load_training_data(run: JobRun, ref: DatasetRef, seed: int) -> tuple[Dataset | StreamedTrainingSet, Dataset]:
    """Like load_train_and_validation, except that a sharded training set above REFINERY_MAX_INMEMORY_BYTES stays on
    its shards. Its validation data is held in memory: `validation.uri`, or whole shards held out (a seeded
    `validation.fraction` of them, 0.1 by default, at least one)."""
    if not is_sharded(ref.uri):
        return load_train_and_validation(run, ref, seed)
    cap = run.settings.max_inmemory_bytes
    source = open_sharded(ref.uri, run.settings, label_column=ref.label_column)
    if source.decoded_bytes <= cap:
        return _with_validation(run, ref, source.load_all(), seed)
    validation = ref.validation
    held_out: list[str] = []
    if validation is not None and validation.uri is not None:
        val = _load(run, validation.uri, source.label_column, classes=source.classes)
        if tuple(val.x.shape[1:]) != source.input_shape:
            raise JobFailure("dataset_invalid", f"validation inputs have shape {list(val.x.shape[1:])}, the training "
                             f"data {list(source.input_shape)}; they must match.")
    else:
        n = len(source.shards)
        if n < 2:
            raise JobFailure("dataset_invalid", f"{ref.uri}: one shard cannot be split into training and validation "
                             "shards; give dataset.validation.uri or more shards")
        fraction = validation.fraction if validation is not None else 0.1
        held = sorted(np.random.default_rng(seed).permutation(n)[:min(n - 1, max(1, round(fraction * n)))].tolist())
        val_source = source.with_shards([source.shards[i] for i in held])
        if val_source.decoded_bytes > cap:
            raise JobFailure("validation_too_large", f"{ref.uri}: the {len(held)} validation shards decode to "
                             f"{val_source.decoded_bytes} bytes, above REFINERY_MAX_INMEMORY_BYTES ({cap}); validation "
                             "data is held in memory: lower dataset.validation.fraction or give validation.uri")
        val = val_source.load_all()
        held_out = [shard.name for shard in val_source.shards]
        source = source.with_shards([s for i, s in enumerate(source.shards) if i not in held])
    sample = source.sample(max(1, min(STATS_ROWS, cap // 4 // source.row_bytes)), seed)
    return StreamedTrainingSet(source=source, sample=sample, validation_shards=held_out), val


def _with_validation(run: JobRun, ref: DatasetRef, data: Dataset, seed: int) -> tuple[Dataset, Dataset]:
    validation = ref.validation
    if validation is not None and validation.uri is not None:
        val = _load(run, validation.uri, ref.label_column, classes=data.classes)
        if val.x.shape[1:] != data.x.shape[1:]:
            raise JobFailure("dataset_invalid", f"validation inputs have shape {list(val.x.shape[1:])}, the training "
                             f"data {list(data.x.shape[1:])}; they must match.")
        return data, val
    return split_validation(data, validation.fraction if validation else 0.1, seed)


def input_stats(data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Standardisation statistics from the training data: per channel for images, per feature for tables."""
    axes = (0, 2, 3) if data.x.ndim == 4 else (0,)
    mean = data.x.mean(axis=axes, keepdims=True)
    std = data.x.std(axis=axes, keepdims=True)
    std = np.where(std < 1e-6, 1.0, std)  # constant features/channels: leave them unscaled
    return mean[0].astype(np.float32), std[0].astype(np.float32)


def resolve_model(run: JobRun, ref: ModelRef | None, data: Dataset, default_arch: str) -> tuple[Classifier, dict]:
    """Build a fresh model, or load one: `job://<id>` carries its own model.json; other weights need `arch`."""
    input_shape = tuple(data.x.shape[1:])
    num_classes = len(data.classes)
    if ref is None or ref.uri is None:
        arch = ref.arch if ref else default_arch
        args = dict(ref.args) if ref else {}
        mean, std = input_stats(data)
        model = build_model(arch, args, input_shape, num_classes, mean, std)
        return model, {"arch": arch, "args": args, "source": "new"}
    uri = ref.uri
    if uri.startswith("job://") and "/" not in uri.removeprefix("job://"):
        card_path = _fetch(run, f"{uri}/model.json")
        weights = _fetch(run, f"{uri}/model.safetensors")
        card = json.loads(card_path.read_text())
        model = load_model(card, weights)
    else:
        if ref.arch is None:
            raise JobFailure("model_arch_required", "model.uri points at bare weights; also give model.arch (and "
                             "model.args) so the architecture can be rebuilt, or use job://<id> for a Refinery model.")
        weights = _fetch(run, uri)
        mean, std = input_stats(data)
        model = load_weights_into(build_model(ref.arch, dict(ref.args), input_shape, num_classes, mean, std),
                                  weights, ref.arch)
        card = {"arch": ref.arch, "args": dict(ref.args), "input_shape": list(input_shape), "num_classes": num_classes}
    if tuple(card.get("input_shape", input_shape)) != input_shape or card.get("num_classes", num_classes) != num_classes:
        raise JobFailure("model_data_mismatch", f"the model takes inputs {card.get('input_shape')} with "
                         f"{card.get('num_classes')} classes; the dataset has {list(input_shape)} with {num_classes}.")
    return model, {"arch": card.get("arch"), "args": card.get("args", {}), "source": uri}


def to_tensors(data: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Small datasets live on the training device whole: batches are index slices, not a per-sample DataLoader."""
    return torch.from_numpy(data.x).float().to(device), torch.from_numpy(data.y).long().to(device)
