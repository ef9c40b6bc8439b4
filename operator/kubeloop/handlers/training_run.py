"""TrainingRun: compile the spec into a KFP pipeline, run it, track it, register the model.

One daemon per TrainingRun, in the shape of every kubeloop daemon (``handlers/daemon.py``):
observe — the compiled pipeline (cached per generation), the namespace's GPU budget, the
executor's run, the steps' progress records, the evaluation, the registered version — then
``planning.training_run.plan_training`` decides once, the actions are carried out once (cancel
a superseded run, submit the attempt, register the ModelVersion) and the status is written
once. Executors are idempotent per attempt, so a restarted operator re-attaches to its run.
A suspended run (``spec.suspend``) is approved by the annotation ``kubeloop.dev/approve=true``,
read from the body each pass: the daemon sees it within one poll (2 s while suspended).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
from dataclasses import dataclass
from typing import Any

import kopf

from kubeloop import GROUP, VERSION
from kubeloop.api.training_run import TrainingRun, TrainingRunStatus
from kubeloop.backends.compiler import Compiled, compile_pipeline
from kubeloop.backends.executor import ExecutorError, Submission
from kubeloop.backends.gpu_usage import observe_gpu_usage
from kubeloop.backends.kube import TRAINING_RUNS
from kubeloop.backends.registry import Registry
from kubeloop.backends.run_store import RunStore
from kubeloop.handlers import daemon, refusals
from kubeloop.handlers.startup import Context, context
from kubeloop.planning import admission, naming, spec_rules
from kubeloop.planning import training_run as plan

REGISTERED_RECHECK_S = 0.2  # the pass after a registration looks again at once


@dataclass
class Memory:
    """What one daemon keeps between passes: the status it wrote, the compiled pipeline."""

    status: TrainingRunStatus | None = None
    compiled: Compiled | None = None


def run_key(tr: TrainingRun) -> str:
    return naming.run_key(tr.name, tr.metadata.uid)


def run_uri(ctx: Context, tr: TrainingRun, attempt: int) -> str:
    cfg = ctx.settings
    return naming.run_uri(
        tr.namespace,
        run_key(tr),
        attempt,
        artifact_root=str(cfg.artifact_root),
        object_store_prefix=cfg.object_store_prefix,
    )


async def observe(
    ctx: Context, registry: Registry, tr: TrainingRun, memory: Memory, now: dt.datetime
) -> plan.Observed:
    status, generation = tr.status, tr.metadata.generation
    if memory.compiled is None or memory.compiled.generation != generation:
        cfg = ctx.settings
        # Refused before any step runs: a data URI outside the tenant, a bad cron or label
        # (the admission webhook's rules, checked again here).
        found = await asyncio.to_thread(refusals.training_run, ctx, tr)
        if found:
            memory.compiled = Compiled(
                generation, error=spec_rules.message(found), reason=found[0].reason
            )
        else:
            memory.compiled = await compile_pipeline(
                plan.pipeline_spec(tr.spec),
                generation,
                image=cfg.training_image,
                kueue_queue=cfg.kueue_queue,
            )
    approved = plan.is_approved(tr.metadata.annotations)
    fields: dict[str, Any] = {
        "generation": generation,
        "now": now,
        "name": tr.name,
        "namespace": tr.namespace,
        "approved": approved,
        "spec_hash": memory.compiled.spec_hash,
        "compile_error": memory.compiled.error,
        "compile_reason": memory.compiled.reason,
    }
    starting = status.attempt == 0 or plan.spec_changed(
        status,
        generation=generation,
        spec_hash=memory.compiled.spec_hash,
        compile_error=memory.compiled.error,
    )
    waiting = plan.awaiting_approval(tr.spec, approved)  # a held run needs no GPU budget
    if (starting or status.phase in plan.NOT_SUBMITTED) and not waiting:
        quotas, others = await observe_gpu_usage(ctx.kube, tr.namespace)
        # From here to the ledger update after planning nothing awaits: admission is serial.
        budget = admission.gpu_budget(
            run=tr.name,
            resource=tr.spec.resources.gpu_resource,
            setting=ctx.settings.gpu_budget,
            quotas=quotas,
            others=others,
            admitted=ctx.admitted[tr.namespace],
        )
        fields.update(
            gpu_limit=budget.limit, gpu_limit_source=budget.source, gpu_in_use=budget.in_use
        )
    if status.phase == "Running" and status.run_id and not starting:
        executor = ctx.executor_for(tr.spec.executor)
        seen = await executor.observe(tr.namespace, run_key(tr), status.attempt, status.run_id)
        fields["run"] = plan.RunView(seen.state, seen.message, seen.failed_step, seen.log_tail)
        store = RunStore(run_uri(ctx, tr, status.attempt))
        finished = seen.state in ("Succeeded", "Failed")
        fields.update(await asyncio.to_thread(store.snapshot, finished=finished))
        if seen.state == "Succeeded":  # only a finished run can have registered anything
            fields["registered"] = await registry.registered_by(
                tr.namespace, tr.name, status.attempt
            )
    return plan.Observed(**fields)


async def apply(
    ctx: Context, registry: Registry, tr: TrainingRun, memory: Memory, decision: plan.Decision
) -> plan.Decision:
    """Carry the decision out; an executor's refusal becomes the attempt's failure."""
    new, executor = decision.status, ctx.executor_for(tr.spec.executor)
    try:
        if decision.cancel_run_id:
            await executor.cancel(
                tr.namespace, run_key(tr), decision.cancel_attempt, decision.cancel_run_id
            )
        if decision.submit:
            assert memory.compiled is not None
            uri = run_uri(ctx, tr, new.attempt)
            new.run_id = await executor.submit(
                Submission(
                    namespace=tr.namespace,
                    name=run_key(tr),
                    attempt=new.attempt,
                    ir_yaml=memory.compiled.ir_yaml,
                    spec_hash=new.spec_hash,
                    run_uri=uri,
                    arguments={"run_uri": uri},
                    timeout_s=plan.timeout_seconds(tr.spec),
                )
            )
        if decision.register:
            await registry.register_attempt(tr, new, run_uri(ctx, tr, new.attempt))
            decision.requeue_after = REGISTERED_RECHECK_S
    except ExecutorError as exc:
        return await _executor_failed(ctx, tr, new, exc)
    return decision


async def _executor_failed(
    ctx: Context, tr: TrainingRun, decided: TrainingRunStatus, exc: ExecutorError
) -> plan.Decision:
    """Refused for good: the attempt fails with the executor's words. Unavailable: Ready says
    so, the phase stays as it was, and the daemon retries with backoff."""
    base = tr.status if exc.temporary else decided
    status, failed = plan.executor_error(
        base,
        generation=tr.metadata.generation,
        now=dt.datetime.now(dt.UTC),
        message=exc.message,
        temporary=exc.temporary,
    )
    ctx.hold_gpus(tr.namespace, tr.name, tr.spec.resources.gpu, status.phase == "Running")
    await daemon.write_status(ctx.kube, TRAINING_RUNS, tr, status, failed)
    if exc.temporary:
        raise exc
    return plan.Decision(status, requeue_after=plan.IDLE_S)


async def reconcile_training(
    ctx: Context, registry: Registry, tr: TrainingRun, memory: Memory
) -> float:
    """One pass; returns the seconds until the next one is due."""
    try:
        observed = await observe(ctx, registry, tr, memory, dt.datetime.now(dt.UTC))
    except ExecutorError as exc:
        return (await _executor_failed(ctx, tr, tr.status, exc)).requeue_after
    decision = plan.plan_training(tr.spec, tr.status, observed)
    ctx.hold_gpus(tr.namespace, tr.name, tr.spec.resources.gpu, decision.status.phase == "Running")
    done = await apply(ctx, registry, tr, memory, decision)
    if done is decision:
        await daemon.write_status(ctx.kube, TRAINING_RUNS, tr, decision.status, decision.events)
    return done.requeue_after


@kopf.daemon(GROUP, VERSION, "trainingruns", cancellation_timeout=10)
async def run_training(
    body: kopf.Body,
    memo: kopf.Memo,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    ctx = context(memo)
    registry = ctx.registry(kwargs["versions_by_model"])  # the kopf index of ModelVersions
    memory = Memory()

    async def one_pass() -> float | None:
        parse = functools.partial(TrainingRun.parse, body)
        if await daemon.refused(ctx.kube, TRAINING_RUNS, body, parse, "Failed"):
            return daemon.POLL_S
        tr = parse()
        if memory.status is not None and memory.status.attempt >= tr.status.attempt:
            tr.status = memory.status  # ours is newer than what the watch may have echoed
        if plan.is_idle(tr.spec, tr.status, tr.metadata.generation, dt.datetime.now(dt.UTC)):
            return None
        delay = await reconcile_training(ctx, registry, tr, memory)
        memory.status = tr.status
        return delay

    await daemon.run(
        "TrainingRun", body, stopped, logger, one_pass, kube=ctx.kube, resource=TRAINING_RUNS
    )


@kopf.on.delete(GROUP, VERSION, "trainingruns")
async def delete_training(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Stop the current attempt's run; registered ModelVersions stay (the registry keeps them)."""
    ctx = context(memo)
    tr = TrainingRun.parse(body)
    ctx.hold_gpus(tr.namespace, tr.name, 0, False)
    if tr.status.run_id and tr.status.phase in plan.ACTIVE:
        await ctx.executor_for(tr.spec.executor).cancel(
            tr.namespace, run_key(tr), tr.status.attempt, tr.status.run_id
        )
