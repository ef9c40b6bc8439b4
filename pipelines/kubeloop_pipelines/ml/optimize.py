"""Post-training optimisation: variants of a trained network, each measured as it would be
served, and the budget rule that keeps or rejects them.

Variants of the eager network (the module without the input transforms):

- ``pruned``: global L1-magnitude unstructured pruning (``torch.nn.utils.prune``) of every
  Linear/Conv2d weight at the requested sparsity, made permanent (zeros in dense tensors);
- ``int8``: torchao's int8 dynamic-activation / int8-weight quantisation of the Linear layers;
- ``distilled``: a smaller MLP student trained on the teacher's softened logits (KL at
  temperature T) plus the hard labels (cross-entropy), or on the teacher's values (regression).

Every variant (and the fp32 ``baseline``) is measured the way serving runs it: ``serve(net)``
(the network behind the input transforms) is exported with ``torch.export`` (dynamic batch;
a torchao-quantised one is also decomposed to core aten ops, so it needs no torchao to load);
then the objective on the validation rows, the median latency of a :data:`SERVING_BATCH`-row
batch and of one row (one intra-op thread, variants timed in interleaved rounds), and the size
of the saved program (raw and zlib-compressed). A variant that cannot be exported is measured
eagerly and rejected with the reason.

Budget rule (:func:`choose_variant`): a variant is kept when its objective is at most
``max_accuracy_drop`` worse than the baseline's and, for int8 and distillation, its latency at
the serving batch size is at least ``min_speedup`` times lower; pruning, which leaves dense
tensors as fast as before, is kept when within the objective budget and its compressed program
is smaller. Of the kept variants the fastest (then the smallest) is chosen; none → baseline.
"""

from __future__ import annotations

import copy
import io
import math
import statistics
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from kubeloop.contract.evaluation import LOWER_IS_BETTER
from kubeloop_pipelines.ml.evaluate import SERVING_BATCH, compute_metrics, median_latency_ms

Serve = Callable[[nn.Module], nn.Module]
PRUNABLE = (nn.Linear, nn.Conv2d)


@dataclass
class Variant:
    """One candidate model and what was measured of it."""

    name: str  # baseline | pruned | int8 | distilled
    module: nn.Module | None
    score: float = math.nan  # the objective on the validation rows
    latency_ms: float = math.nan  # median, SERVING_BATCH rows
    latency_ms_b1: float = math.nan  # median, one row
    size_bytes: int = 0  # the saved torch.export program
    compressed_bytes: int = 0  # the same, zlib level 6 (zeros from pruning compress)
    exportable: bool = True
    program: torch.export.ExportedProgram | None = None
    runner: Any = None  # what is timed: the exported program's module (or the eager one)
    status: str = "measured"  # baseline | kept | rejected | unsupported
    reason: str = ""
    chosen: bool = False
    drop: float = math.nan  # objective loss vs the baseline (positive = worse)
    speedup: float = math.nan  # baseline latency / this latency at SERVING_BATCH
    details: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """A JSON-able summary (no module) for reports and metrics."""
        return {
            "name": self.name,
            "score": self.score,
            "latency_ms": self.latency_ms,
            "latency_ms_b1": self.latency_ms_b1,
            "size_bytes": self.size_bytes,
            "compressed_bytes": self.compressed_bytes,
            "exportable": self.exportable,
            "status": self.status,
            "reason": self.reason,
            "chosen": self.chosen,
            "drop": self.drop,
            "speedup": self.speedup,
            **self.details,
        }


# --- the variants ------------------------------------------------------------------------


def prune_magnitude(module: nn.Module, sparsity: float) -> tuple[nn.Module, float]:
    """A copy of ``module`` with the ``sparsity`` fraction of smallest-magnitude weights (over
    all Linear/Conv2d weights together) set to zero permanently; returns it and the sparsity
    achieved over those weights."""
    pruned = copy.deepcopy(module).eval()
    targets = [(m, "weight") for m in pruned.modules() if isinstance(m, PRUNABLE)]
    if not targets:
        raise ValueError("the network has no Linear or Conv2d weights to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    for m, name in targets:  # bake the mask into the weight, drop the reparametrisation
        prune.remove(m, name)  # type: ignore[no-untyped-call]
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    total = sum(m.weight.numel() for m, _ in targets)
    return pruned, zeros / max(total, 1)


def quantize_int8(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with int8 dynamic-activation / int8-weight Linear layers (torchao).
    Raises (ValueError, or torchao's own error) when that cannot be done."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    if not any(isinstance(m, nn.Linear) for m in module.modules()):
        raise ValueError("the network has no Linear layers; torchao int8 quantises only those")
    quantized = copy.deepcopy(module).eval()
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
    return quantized


def distill(
    teacher: nn.Module,
    student: nn.Module,
    x_train: npt.NDArray[Any],
    y_train: npt.NDArray[Any],
    *,
    task: str,
    epochs: int = 30,
    min_steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 5e-3,
    temperature: float = 4.0,
    alpha: float = 0.7,
    target_scale: float = 1.0,
    seed: int = 0,
) -> nn.Module:
    """Train ``student`` to imitate ``teacher`` on the (transformed) training inputs.

    Classification: ``alpha * T^2 * KL(student/T || teacher/T) + (1 - alpha) * CE(student, y)``
    (Hinton et al.). Regression: ``alpha * MSE(student, teacher) + (1 - alpha) * MSE(student,
    y)``, both divided by ``target_scale^2`` so the loss is in standardised units. Small
    training sets get more epochs, so that the student takes at least ``min_steps`` steps."""
    torch.manual_seed(seed)
    teacher = teacher.eval()
    x = torch.as_tensor(np.ascontiguousarray(x_train), dtype=torch.float32)
    y = torch.as_tensor(np.ascontiguousarray(y_train))
    with torch.no_grad():
        soft = torch.cat([teacher(x[i : i + 2048]) for i in range(0, len(x), 2048)])
    optimiser = torch.optim.Adam(student.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    student.train()
    batches = max(math.ceil(len(x) / batch_size), 1)
    for _ in range(max(epochs, math.ceil(min_steps / batches))):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on one row
                continue
            out = student(x[idx])
            if task == "classification":
                kl = F.kl_div(
                    F.log_softmax(out / temperature, dim=1),
                    F.softmax(soft[idx] / temperature, dim=1),
                    reduction="batchmean",
                )
                hard = F.cross_entropy(out, y[idx].long())
                loss = alpha * temperature**2 * kl + (1 - alpha) * hard
            else:
                values, target = out.reshape(-1), y[idx].float()
                loss = (
                    alpha * F.mse_loss(values, soft[idx].reshape(-1))
                    + (1 - alpha) * F.mse_loss(values, target)
                ) / target_scale**2
            optimiser.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    return student.eval()


def count_parameters(module: nn.Module, *, nonzero: bool = False) -> int:
    return sum(int((p != 0).sum()) if nonzero else p.numel() for p in module.parameters())


# --- measuring ---------------------------------------------------------------------------


def has_tensor_subclasses(module: nn.Module) -> bool:
    """Whether any weight is a tensor subclass (torchao's quantised weights are)."""
    plain = (torch.Tensor, nn.Parameter)
    return any(type(t) not in plain for t in (*module.parameters(), *module.buffers()))


def export_program(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``module`` exported with a dynamic batch, as ``save_model`` exports it; a module with
    tensor subclasses (torchao's int8 weights) is then decomposed to core aten ops, so its
    program holds plain int8 tensors and loads without torchao."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
    if not has_tensor_subclasses(module):
        return program
    decomposed: torch.export.ExportedProgram = program.run_decompositions()
    return decomposed


def program_bytes(program: torch.export.ExportedProgram) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _outputs(module: nn.Module, rows: torch.Tensor, task: str) -> npt.NDArray[np.float32]:
    with torch.inference_mode():
        out = torch.cat([module(rows[i : i + 2048]) for i in range(0, len(rows), 2048)])
        out = torch.softmax(out, dim=1) if task == "classification" else out.reshape(-1)
    return np.asarray(out.float().numpy(), dtype=np.float32)


def objective(
    task: str, metric: str, y: npt.ArrayLike, outputs: npt.ArrayLike, classes: Sequence[str]
) -> float:
    return compute_metrics(task, y, outputs, classes=classes).get(metric, math.nan)


def measure(
    variant: Variant,
    *,
    serve: Serve,
    rows: npt.NDArray[Any],
    y: npt.NDArray[Any],
    task: str,
    classes: Sequence[str],
    metric: str,
    timed: bool = True,
    repeats: int = 50,
    threads: int | None = 1,
) -> Variant:
    """Export ``serve(variant.module)``, then measure objective and size and (``timed``) the
    latency, in place. Compare several variants with :func:`time_variants` instead, which
    interleaves them so a busy moment of the machine does not favour one."""
    assert variant.module is not None
    served = serve(variant.module).eval()
    data = torch.as_tensor(np.ascontiguousarray(rows), dtype=torch.float32)
    try:
        variant.program = export_program(served, data[:2] if len(data) >= 2 else data.repeat(2, 1))
        blob = program_bytes(variant.program)
        variant.runner = variant.program.module()
    except Exception as exc:  # torch.export raises many types for unsupported graphs
        variant.exportable = False
        variant.details["export_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        buffer = io.BytesIO()
        torch.save(served.state_dict(), buffer)
        blob, variant.runner = buffer.getvalue(), served
    variant.size_bytes = len(blob)
    variant.compressed_bytes = len(zlib.compress(blob, 6))
    variant.score = objective(task, metric, y, _outputs(variant.runner, data, task), classes)
    if timed:
        time_variants([variant], rows, rounds=1, repeats=repeats, threads=threads)
    return variant


def time_variants(
    variants: Sequence[Variant],
    rows: npt.NDArray[Any],
    *,
    batch: int = SERVING_BATCH,
    rounds: int = 3,
    repeats: int = 30,
    threads: int | None = 1,
) -> None:
    """Median latency (``batch`` rows and one row) of each measured variant: ``rounds`` rounds
    that each time every variant in turn; the figure is the median of the round medians."""
    data = torch.as_tensor(np.ascontiguousarray(rows), dtype=torch.float32)
    serving_batch = data[torch.arange(batch) % len(data)]
    timed = [v for v in variants if v.runner is not None]
    samples: dict[int, list[tuple[float, float]]] = {id(v): [] for v in timed}
    for _ in range(rounds):
        for v in timed:
            samples[id(v)].append(
                (
                    median_latency_ms(v.runner, serving_batch, repeats=repeats, threads=threads),
                    median_latency_ms(v.runner, data[:1], repeats=repeats, threads=threads),
                )
            )
    for v in timed:
        v.latency_ms = statistics.median(b for b, _ in samples[id(v)])
        v.latency_ms_b1 = statistics.median(one for _, one in samples[id(v)])


# --- the budget rule ---------------------------------------------------------------------


def objective_drop(metric: str, baseline: float, value: float) -> float:
    """How much worse ``value`` is than ``baseline`` (positive = worse), for ``metric``."""
    return value - baseline if metric in LOWER_IS_BETTER else baseline - value


def choose_variant(
    baseline: Variant,
    variants: Sequence[Variant],
    max_accuracy_drop: float,
    min_speedup: float,
    *,
    metric: str = "accuracy",
) -> Variant:
    """Mark every variant kept/rejected (with the reason) and return the chosen one: the
    fastest kept variant (then the smallest), or ``baseline`` when none is kept."""
    baseline.status, baseline.reason = "baseline", "the trained model"
    kept: list[Variant] = []
    for v in variants:
        if v.status == "unsupported":
            continue
        v.drop = objective_drop(metric, baseline.score, v.score)
        v.speedup = baseline.latency_ms / v.latency_ms if v.latency_ms > 0 else math.nan
        worse = f"{metric} {baseline.score:.4f} → {v.score:.4f} (drop {v.drop:+.4f})"
        if not v.exportable:
            v.status = "rejected"
            v.reason = f"cannot be exported for serving: {v.details.get('export_error', '')}"
        elif not v.drop <= max_accuracy_drop:  # NaN (unmeasurable) is over budget too
            v.status, v.reason = "rejected", f"{worse} exceeds the budget {max_accuracy_drop}"
        elif v.name == "pruned":
            smaller = v.compressed_bytes < baseline.compressed_bytes
            ratio = v.compressed_bytes / max(baseline.compressed_bytes, 1)
            v.status = "kept" if smaller else "rejected"
            v.reason = f"{worse} within budget; compressed size x{ratio:.2f}" + (
                "" if smaller else " (not smaller)"
            )
        elif v.speedup >= min_speedup:
            v.status, v.reason = "kept", f"{worse} within budget; {v.speedup:.2f}x faster"
        else:
            v.status = "rejected"
            v.reason = f"speed-up {v.speedup:.2f}x < {min_speedup}x at batch {SERVING_BATCH}"
        if v.status == "kept":
            kept.append(v)
    chosen = min(
        kept, key=lambda v: (v.latency_ms, v.compressed_bytes), default=baseline
    )  # fastest first; pruning rarely is, so it wins only alone
    chosen.chosen = True
    return chosen


def int8_latency_ratio(baseline: Variant, variants: Sequence[Variant]) -> float | None:
    """int8 latency / fp32 latency at the serving batch size (below 1 = int8 is faster)."""
    for v in variants:
        if v.name == "int8" and v.status != "unsupported" and baseline.latency_ms > 0:
            return v.latency_ms / baseline.latency_ms
    return None
