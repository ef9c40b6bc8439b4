"""The training loop, prediction, validation metrics, and the model directory.

:func:`fit` trains one network on numpy arrays: CUDA when there is a GPU (bf16 autocast when
``model.mixedPrecision``), the spec's optimiser and learning-rate schedule, imbalance handling
(re-sampling, class weights or focal loss), training-time augmentation, early stopping on the
validation loss with the best weights restored, and a per-epoch history. A ``callback`` sees
every epoch (progress reports, Optuna's ``trial.report``); an exception it raises (such as
``optuna.TrialPruned``) stops training and propagates.

:func:`save_network` writes the model directory of ``contract.py``; :func:`load_trained`
rebuilds the eager module from it.

Longer than the house ~400 lines: the loop, its metrics and the directory it writes are read
together (other steps import ``load_trained``/``serving_module``/``predict`` from here).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from kubeloop.api.training_run import (
    Augmentation,
    EarlyStopping,
    Imbalance,
    ModelSpec,
    TrainingRunSpec,
)
from kubeloop.contract.evaluation import QUALITY_METRICS_BY_TASK
from kubeloop.contract.reference import (
    IMAGE,
    TEXT,
    image_summary,
    reference_from_data,
    text_summary,
)
from kubeloop.serving.artifact import save_model
from kubeloop_pipelines.contract import (
    ARCH_FILE,
    HISTORY_FILE,
    PARAMS_FILE,
    STATE_FILE,
    StepError,
    read_json,
    write_json,
)
from kubeloop_pipelines.ml.evaluate import compute_metrics
from kubeloop_pipelines.ml.imbalance import FocalLoss, class_weights, resample
from kubeloop_pipelines.ml.models import apply_params, arch_from, build_model

if TYPE_CHECKING:
    from kubeloop_pipelines.ml.preprocess import Prepared

Task = Literal["classification", "regression"]
PREDICT_BATCH = 2048

# torch's global RNG initialises the weights and drives dropout; trials in parallel threads
# seed and build under this lock so each gets its own reproducible initial weights.
_SEED_LOCK = threading.Lock()


# --- metrics -----------------------------------------------------------------------------


def default_metric(task: str) -> str:
    return "f1" if task == "classification" else "rmse"


def check_metric(metric: str, task: str, *, field_name: str) -> None:
    """StepError naming ``field_name`` unless ``metric`` is a validation metric of ``task``."""
    allowed = QUALITY_METRICS_BY_TASK[task]
    if metric not in allowed:
        raise StepError(
            f"{field_name}={metric!r} does not apply to a {task} model; expected one of "
            f"{list(allowed)}",
            field=field_name,
        )


def score(metric: str, task: str, y_true: npt.ArrayLike, output: npt.ArrayLike) -> float:
    """``metric`` of predictions ``output`` (class probabilities (n, k), or values (n,)) with
    the conventions of the test-split evaluation (``ml/evaluate.py``), so a validation score
    during tuning means what the same test metric means at the gates: precision/recall/f1 of
    class 1 for two classes, macro-averaged for more; ``minority_recall`` is the recall of the
    rarest class in ``y_true``. NaN where the metric is undefined (e.g. roc_auc with a single
    class in ``y_true``)."""
    check_metric(metric, task, field_name="metric")
    out = np.asarray(output)
    classes = [str(c) for c in range(out.shape[1])] if task == "classification" else []
    return compute_metrics(task, y_true, out, classes=classes).get(metric, math.nan)


# --- training ----------------------------------------------------------------------------


@dataclass
class EpochStats:
    """One epoch: losses are per-sample means (regression: of standardised targets)."""

    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    val_metric: float
    lr: float
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return {
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "val_metric": self.val_metric,
            "lr": self.lr,
            "seconds": self.seconds,
        }


@dataclass
class FitResult:
    """A trained network (on the CPU, eval mode) with its arch and history."""

    module: nn.Module
    arch: dict[str, Any]
    metric: str
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    train_samples: int = 0
    train_samples_per_s: float = 0.0
    device: str = "cpu"

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def kept(self) -> EpochStats:
        """The epoch whose weights the module holds."""
        return self.history[self.best_epoch - 1]

    @property
    def best_val_loss(self) -> float:
        return min(h.val_loss for h in self.history)

    @property
    def val_metric(self) -> float:
        return self.kept.val_metric

    def history_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "epochs": [h.as_dict() for h in self.history],
        }


EpochCallback = Callable[[EpochStats], None]


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _optimizer(module: nn.Module, model: ModelSpec) -> torch.optim.Optimizer:
    params = module.parameters()
    lr, decay = model.learning_rate, model.weight_decay
    if model.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay)
    if model.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=decay)


def _scheduler(optimizer: torch.optim.Optimizer, model: ModelSpec) -> Any:
    """Stepped once an epoch (plateau: with the validation loss)."""
    sched = torch.optim.lr_scheduler
    if model.lr_schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=max(model.epochs, 1))
    if model.lr_schedule == "step":
        return sched.StepLR(optimizer, step_size=max(model.epochs // 3, 1), gamma=0.1)
    if model.lr_schedule == "plateau":
        # Halve the rate after half the early-stopping patience without improvement, so a
        # lower rate gets its chance before training stops (torch's patience counts the bad
        # epochs tolerated: reduction comes on bad epoch ``patience + 1``).
        stopping = model.early_stopping.patience if model.early_stopping else 5
        return sched.ReduceLROnPlateau(optimizer, factor=0.5, patience=(stopping + 1) // 2 - 1)
    return None


def _criterion(
    task: str, imbalance: Imbalance, y_train: npt.NDArray[Any], n_classes: int
) -> nn.Module:
    if task == "regression":
        return nn.MSELoss()
    weights = None
    if imbalance.strategy in ("class_weights", "focal_loss"):
        weights = torch.from_numpy(class_weights(y_train, n_classes))
    if imbalance.strategy == "focal_loss":
        # The alpha-balanced focal loss: at a 1 % prior the focusing term alone hardly moves
        # the rare class's recall; with inverse-frequency alpha it does (see ml/imbalance.py).
        return FocalLoss(imbalance.focal_gamma, weights)
    return nn.CrossEntropyLoss(weight=weights)


def augmentation_enabled(augmentation: Augmentation | None, modality: str) -> bool:
    """Whether ``augmentation`` changes anything for ``modality``."""
    if augmentation is None:
        return False
    if modality == "image":
        return bool(
            augmentation.rotation_degrees
            or augmentation.flip
            or augmentation.scale
            or augmentation.image_noise
        )
    if modality == "text":
        return augmentation.synonym_swap > 0
    return augmentation.tabular_noise > 0


def _as_tensor(x: npt.NDArray[Any], modality: str, device: torch.device) -> torch.Tensor:
    dtype = torch.int64 if modality == "text" else torch.float32
    return torch.as_tensor(np.ascontiguousarray(x)).to(device=device, dtype=dtype)


def _targets(y: npt.NDArray[Any], task: str, device: torch.device) -> torch.Tensor:
    dtype = torch.int64 if task == "classification" else torch.float32
    return torch.as_tensor(np.ascontiguousarray(y)).to(device=device, dtype=dtype)


def _forward(
    module: nn.Module, x: torch.Tensor, *, amp: bool, device: torch.device
) -> torch.Tensor:
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
        out: torch.Tensor = module(x)
    return out.float()


def _batch_loss(
    criterion: nn.Module, out: torch.Tensor, target: torch.Tensor, task: str, scale: float
) -> torch.Tensor:
    if task == "regression":
        # The loss of standardised targets: gradients the same size whatever the units.
        loss: torch.Tensor = criterion(out.reshape(-1), target) / (scale * scale)
        return loss
    result: torch.Tensor = criterion(out, target)
    return result


def _evaluate(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    criterion: nn.Module,
    task: str,
    scale: float,
    amp: bool,
    device: torch.device,
) -> tuple[float, npt.NDArray[np.float32]]:
    """Mean loss and outputs (probabilities or values) over ``x`` in batches."""
    module.eval()
    total = torch.zeros((), device=device)
    outputs: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(x), PREDICT_BATCH):
            xb, yb = x[start : start + PREDICT_BATCH], y[start : start + PREDICT_BATCH]
            out = _forward(module, xb, amp=amp, device=device)
            total += _batch_loss(criterion, out, yb, task, scale) * len(xb)
            outputs.append(torch.softmax(out, 1) if task == "classification" else out[:, 0])
    values = torch.cat(outputs).cpu().numpy().astype(np.float32)
    return float(total.item()) / max(len(x), 1), values


class _BestWeights:
    """Early-stopping bookkeeping: the best validation loss, its epoch and (when early
    stopping is on) a copy of its weights."""

    def __init__(self, stopping: EarlyStopping | None) -> None:
        self.stopping = stopping
        self.loss = math.inf
        self.epoch = 0
        self.bad_epochs = 0
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, val_loss: float, module: nn.Module) -> None:
        min_delta = self.stopping.min_delta if self.stopping else 0.0
        if val_loss < self.loss - min_delta:
            self.loss, self.epoch, self.bad_epochs = val_loss, epoch, 0
            if self.stopping:
                self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            self.bad_epochs += 1

    @property
    def should_stop(self) -> bool:
        return self.stopping is not None and self.bad_epochs >= self.stopping.patience


@dataclass
class _Loop:
    """What one training run holds on the device."""

    module: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    task: str
    device: torch.device
    amp: bool
    scale: float  # regression: the target's standard deviation
    augment: Callable[[torch.Tensor], torch.Tensor] | None

    def train_epoch(
        self, x: torch.Tensor, y: torch.Tensor, batch: int, generator: torch.Generator
    ) -> tuple[float, int]:
        """One pass over the shuffled train split: (mean loss, samples seen)."""
        self.module.train()
        n = len(x)
        order = torch.randperm(n, generator=generator).to(self.device)
        total = torch.zeros((), device=self.device)
        seen = 0
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            if len(idx) < 2 < n:  # BatchNorm cannot train on a batch of one
                continue
            xb, yb = x[idx], y[idx]
            if self.augment is not None:
                xb = self.augment(xb)
            out = _forward(self.module, xb, amp=self.amp, device=self.device)
            loss = _batch_loss(self.criterion, out, yb, self.task, self.scale)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
            total += loss.detach() * len(idx)
            seen += len(idx)
        return float(total.item()) / max(seen, 1), seen  # .item() waits for the GPU


def _augmenter(
    augmentation: Augmentation | None,
    modality: str,
    generator: torch.Generator,
    synonyms: Mapping[int, Sequence[int]] | None,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if augmentation is None or not augmentation_enabled(augmentation, modality):
        return None
    from kubeloop_pipelines.ml.augment import augment_batch

    def augment(batch: torch.Tensor) -> torch.Tensor:
        return augment_batch(
            batch, modality=modality, augmentation=augmentation, generator=generator,
            synonyms=synonyms,
        )  # fmt: skip

    return augment


def fit(
    arch: Mapping[str, Any],
    x_train: npt.NDArray[Any],
    y_train: npt.NDArray[Any],
    x_val: npt.NDArray[Any],
    y_val: npt.NDArray[Any],
    *,
    task: Task,
    model: ModelSpec,
    imbalance: Imbalance | None = None,
    metric: str | None = None,
    modality: str = "tabular",
    augmentation: Augmentation | None = None,
    synonyms: Mapping[int, Sequence[int]] | None = None,
    seed: int = 0,
    callback: EpochCallback | None = None,
    device: str | torch.device | None = None,
) -> FitResult:
    """Train a network of ``arch`` (see ``models.arch_from``) with the training settings of
    ``model`` (epochs, batch size, optimiser, schedule, early stopping, mixed precision).

    ``imbalance`` re-samples the train split or weights the loss (classification only);
    ``metric`` (default f1 / rmse) is computed on the validation split every epoch;
    ``augmentation`` is applied to every training batch (``ml/augment.py``); ``synonyms``
    feed text synonym swaps. Seeded: the same inputs give the same weights on one device.
    """
    imbalance = imbalance or Imbalance()
    metric = metric or default_metric(task)
    check_metric(metric, task, field_name="metric")
    dev = pick_device(device)
    arch = dict(arch)
    if task == "classification":
        x_train, y_train = resample(
            x_train, y_train, strategy=imbalance.strategy, target_ratio=imbalance.target_ratio,
            seed=seed, modality=modality,
        )  # fmt: skip
    else:
        # The network learns standardised targets; build_model maps them back to the units.
        y64 = np.asarray(y_train, dtype=np.float64)
        arch["target_mean"] = float(y64.mean())
        arch["target_scale"] = float(y64.std()) or 1.0

    with _SEED_LOCK:
        torch.manual_seed(seed)
        module = build_model(arch).to(dev)
    n_classes = int(arch["n_outputs"]) if task == "classification" else 0
    optimizer = _optimizer(module, model)
    scheduler = _scheduler(optimizer, model)
    generator = torch.Generator().manual_seed(seed)
    loop = _Loop(
        module=module,
        criterion=_criterion(task, imbalance, y_train, n_classes).to(dev),
        optimizer=optimizer,
        task=task,
        device=dev,
        amp=dev.type == "cuda" and model.mixed_precision,
        scale=float(arch.get("target_scale", 1.0)),
        augment=_augmenter(augmentation, modality, generator, synonyms),
    )
    xt, yt = _as_tensor(x_train, modality, dev), _targets(y_train, task, dev)
    xv, yv = _as_tensor(x_val, modality, dev), _targets(y_val, task, dev)
    batch = max(1, min(model.batch_size, len(xt)))
    best = _BestWeights(model.early_stopping)
    result = FitResult(
        module=module, arch=arch, metric=metric, device=str(dev), train_samples=len(xt)
    )
    train_seconds, seen = 0.0, 0

    for epoch in range(1, model.epochs + 1):
        started = time.perf_counter()
        train_loss, epoch_seen = loop.train_epoch(xt, yt, batch, generator)
        train_seconds += time.perf_counter() - started
        seen += epoch_seen
        val_loss, val_out = _evaluate(
            module, xv, yv, criterion=loop.criterion, task=task, scale=loop.scale,
            amp=loop.amp, device=dev,
        )  # fmt: skip
        stats = EpochStats(
            epoch=epoch,
            epochs=model.epochs,
            train_loss=train_loss,
            val_loss=val_loss,
            val_metric=score(metric, task, y_val, val_out),
            lr=float(optimizer.param_groups[0]["lr"]),
            seconds=time.perf_counter() - started,
        )
        result.history.append(stats)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_loss)
        elif scheduler is not None:
            scheduler.step()
        best.update(epoch, val_loss, module)
        if callback is not None:
            callback(stats)
        if best.should_stop:
            result.stopped_early = epoch < model.epochs
            break

    if best.state is not None:
        module.load_state_dict(best.state)
        result.best_epoch = best.epoch
    else:
        result.best_epoch = len(result.history)
    result.module = module.cpu().eval()
    result.train_samples_per_s = seen / train_seconds if train_seconds > 0 else 0.0
    return result


def predict(
    module: nn.Module,
    x: npt.NDArray[Any],
    task: str,
    *,
    batch_size: int = PREDICT_BATCH,
) -> npt.NDArray[np.float32]:
    """Class probabilities ``(n, classes)`` or values ``(n,)``, in batches, on the module's
    device. Integer inputs (token ids) stay integers; everything else becomes float32."""
    module.eval()
    first = next(module.parameters(), None)
    dev = first.device if first is not None else torch.device("cpu")
    arr = np.ascontiguousarray(x)
    dtype = torch.int64 if np.issubdtype(arr.dtype, np.integer) else torch.float32
    outputs: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(arr), batch_size):
            xb = torch.as_tensor(arr[start : start + batch_size]).to(device=dev, dtype=dtype)
            out = module(xb).float()
            outputs.append(torch.softmax(out, 1) if task == "classification" else out[:, 0])
    if not outputs:
        return np.zeros((0,), dtype=np.float32)
    return np.asarray(torch.cat(outputs).cpu().numpy(), dtype=np.float32)


# --- the pipeline's view: prepared data in, model directory out ---------------------------


def history_metric(spec: TrainingRunSpec, task: str) -> str:
    """The validation metric recorded every epoch: the tuning objective, else the first gate
    on a validation metric of this task, else f1 (classification) / rmse (regression)."""
    allowed = QUALITY_METRICS_BY_TASK[task]
    if spec.tuning is not None and spec.tuning.objective.metric in allowed:
        return spec.tuning.objective.metric
    for gate in spec.evaluation.gates:
        if gate.metric in allowed:
            return gate.metric
    return default_metric(task)


def train_network(
    spec: TrainingRunSpec,
    prepared: Prepared,
    params: Mapping[str, Any],
    *,
    callback: EpochCallback | None = None,
    device: str | torch.device | None = None,
) -> FitResult:
    """:func:`fit` on a prepared dataset with the spec's model, imbalance handling and
    augmentation, ``params`` (tuned hyperparameters, camelCase) applied; seeded with
    ``data.split.seed`` so every tuning trial starts from the same weights."""
    task: Task = "classification" if prepared.task == "classification" else "regression"
    model, imbalance = apply_params(spec.model, spec.imbalance, params)
    arch = arch_from(
        model,
        {},
        input_shape=prepared.input_shape,
        n_outputs=prepared.n_classes if task == "classification" else 1,
        vocab_size=prepared.vocab_size,
    )
    return fit(
        arch,
        prepared.x_train,
        prepared.y_train,
        prepared.x_validation,
        prepared.y_validation,
        task=task,
        model=model,
        imbalance=imbalance if task == "classification" else None,
        metric=history_metric(spec, task),
        modality=str(prepared.modality),
        augmentation=spec.preprocessing.augmentation,
        synonyms=prepared.synonyms,
        seed=spec.data.split.seed,
        callback=callback,
        device=device,
    )


def reference_summary(prepared: Prepared) -> dict[str, Any] | None:
    """How the reference describes the inputs: per-row summary features for text (sequence
    length, out-of-vocabulary rate) and images (brightness, contrast), whose columns are token
    positions or pixels; None for tables, whose columns are the features."""
    if prepared.modality == TEXT:
        return text_summary(prepared.vocab_size)
    if prepared.modality == IMAGE:
        return image_summary()
    return None


def model_reference(serving: nn.Module, prepared: Prepared) -> dict[str, Any]:
    """The drift reference of a serving module: the feature histograms of the raw train rows
    (NaN counted as missing, not imputed) and the prediction histogram of its outputs on the
    validation rows (the train split's when there are none), on the shared edges."""
    features = [str(f) for f in prepared.serving_features]
    validation = np.asarray(prepared.serving_rows("validation"), dtype=np.float32)
    train_rows = np.asarray(prepared.serving_rows("train"), dtype=np.float32)
    scored = validation if len(validation) else train_rows
    return reference_from_data(
        train_rows,
        features,
        predict(serving, scored, prepared.task),
        task=prepared.task,
        summary=reference_summary(prepared),
    )


def serving_module(network: nn.Module, prepared: Prepared) -> nn.Module:
    """What serving runs: the fitted transforms, then the network (raw rows in)."""
    from kubeloop_pipelines.ml.transforms import transform_module

    return nn.Sequential(transform_module(prepared.transform), network).eval()


def save_network(
    model_dir: str | Path,
    result: FitResult,
    *,
    prepared: Prepared,
    params: Mapping[str, Any],
) -> Path:
    """Write the model directory (``contract.py``): the serving artifact with the transforms
    baked in (``model.pt2`` + ``model.json``: the modality, the reference of
    :func:`model_reference`, the bf16 check on the validation rows), ``arch.json``,
    ``state.pt``, ``history.json`` and ``params.json``."""
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    network = result.module.cpu().eval()
    write_json(out / ARCH_FILE, result.arch)
    torch.save(network.state_dict(), out / STATE_FILE)
    write_json(out / HISTORY_FILE, result.history_json())
    write_json(out / PARAMS_FILE, dict(params))

    features = [str(f) for f in prepared.serving_features]
    serving = serving_module(network, prepared)
    width = len(features)
    save_model(
        out,
        serving,
        task="classification" if prepared.task == "classification" else "regression",
        features=features,
        classes=[str(c) for c in prepared.classes] if prepared.task == "classification" else (),
        mean=[0.0] * width,
        scale=[1.0] * width,
        reference=model_reference(serving, prepared),
        modality=prepared.modality,
        check_rows=prepared.serving_rows("validation"),
    )
    return out


def load_trained(model_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The eager network (without transforms, eval mode, CPU) and its arch."""
    root = Path(model_dir)
    for name in (ARCH_FILE, STATE_FILE):
        if not (root / name).is_file():
            raise StepError(
                f"{root / name} is missing: {root} is not a model directory written by the "
                "train step (expected arch.json and state.pt)",
                permanent=True,
            )
    arch = read_json(root / ARCH_FILE)
    module = build_model(arch)
    module.load_state_dict(torch.load(root / STATE_FILE, map_location="cpu", weights_only=True))
    return module.eval(), dict(arch)
