"""Compiling a TrainingRun's spec into KFP IR, off the event loop.

The compiler (``kubeloop_pipelines.compiler``) is the pipelines' own code and imports kfp;
it is loaded on first use, so an operator that never compiles never imports it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from kubeloop import reasons
from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.planning.training_run import spec_problem


@dataclass(frozen=True)
class Compiled:
    generation: int
    spec_hash: str = ""
    ir_yaml: str = ""
    error: str = ""  # why the spec cannot be compiled, naming the field
    reason: str = reasons.INVALID_SPEC


async def compile_pipeline(
    spec: TrainingRunSpec, generation: int, *, image: str, kueue_queue: str
) -> Compiled:
    """The spec as KFP IR; a spec that cannot run (``planning.training_run.spec_problem``) or
    that the compiler rejects becomes a message naming the field."""
    from kubeloop_pipelines.compiler import compile_spec

    problem = spec_problem(spec)
    if problem:
        return Compiled(generation, error=problem)

    try:
        compiled = await asyncio.to_thread(compile_spec, spec, image=image, kueue_queue=kueue_queue)
    except (ValueError, TypeError) as exc:
        return Compiled(generation, error=f"spec cannot be compiled into a pipeline: {exc}")
    return Compiled(generation, compiled.spec_hash, compiled.ir_yaml)
