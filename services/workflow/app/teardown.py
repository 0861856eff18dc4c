"""Teardown: the workflow's resources destroyed in reverse dependency order."""
from __future__ import annotations

from dataclasses import replace

import grpc

from services.common.auth import Principal
from services.common.clients import RemoteError
from services.common.errors import Aborted, FailedPrecondition, PreconditionViolation, Unavailable
from services.common.uow import utcnow
from services.workflow.adapters.remote import ResourceInfo
from services.workflow.domain.model import (DONE, ERROR, IN_PROGRESS, PENDING, Step, TeardownItem, Workflow,
                                            awaiting_approval, teardown_order, teardown_ready)
from services.workflow.app.base import WorkflowsBase, log


class Teardown(WorkflowsBase):
    # --- teardown ------------------------------------------------------------------------------

    async def _teardown_plan(self, steps: list[Step]) -> tuple[list[TeardownItem], dict[str, list[str]]]:
        """Steps whose resources still exist, in reverse dependency order, and
        per step the resources outside the workflow that depend on them."""
        ours = {s.resource_id for s in steps if s.resource_id}
        remaining, external = [], {}
        for st in steps:
            if not st.resource_id:
                continue
            resource = await self.remote.find_resource(st.resource_id)
            if resource is None or (resource.state, resource.status) == ("destroyed", "done"):
                continue
            remaining.append(st)
            external[st.id] = [c.id for c in await self.remote.children(st.resource_id)
                               if c.id not in ours and c.state != "destroyed"]
        return teardown_order(remaining), external

    async def preview_teardown(self, uow, id_: str) -> tuple[list[TeardownItem], dict[str, list[str]]]:
        w = await self.get(uow, id_)
        return await self._teardown_plan(await uow.steps.of(w.id))

    async def teardown(self, uow, principal: Principal, id_: str) -> Workflow:
        """Destroys the workflow's resources, dependents first. Retrying after
        a failed teardown destroys what is left."""
        w = await self.get(uow, id_)
        if w.status == IN_PROGRESS:
            raise FailedPrecondition(f"workflow {w.id} is executing", [PreconditionViolation(
                "WORKFLOW_RUNNING", f"workflows/{w.id}", "tear down once the execution has ended")])
        if w.teardown_status == IN_PROGRESS:
            raise FailedPrecondition(f"workflow {w.id} is being torn down", [PreconditionViolation(
                "TEARDOWN_RUNNING", f"workflows/{w.id}", "a teardown is under way")])
        steps = await uow.steps.of(w.id)
        plan, external = await self._teardown_plan(steps)
        blockers = [PreconditionViolation("DEPENDENT_OUTSIDE_WORKFLOW", f"resources/{rid}",
                                          f"depends on the resource of step {item.step.template_name} "
                                          f"({item.step.resource_id}); destroy it first")
                    for item in plan for rid in external[item.step.id]]
        if blockers:
            raise FailedPrecondition(f"resources outside workflow {w.id} depend on its resources", blockers,
                                     reason="DEPENDENTS_OUTSIDE_WORKFLOW")
        if not plan and w.teardown_status == DONE:
            raise FailedPrecondition(f"workflow {w.id} is torn down already", [PreconditionViolation(
                "ALREADY_TORN_DOWN", f"workflows/{w.id}", "none of its resources is left")])
        to_destroy = {item.step.id for item in plan}
        for st in steps:
            status = PENDING if st.id in to_destroy else (DONE if st.resource_id else "")
            if (st.teardown_status, st.teardown_error_message) != (status, ""):
                changed = replace(st, teardown_status=status, teardown_error_message="", version=st.version + 1)
                if not await uow.steps.update(changed, st.version):
                    raise Aborted(f"workflow {w.id} changed at the same moment; read it again and retry",
                                  reason="CONCURRENT_CHANGE")
        now = utcnow()
        started = replace(w, teardown_status=IN_PROGRESS, teardown_error_message="", torn_down_by=principal.user,
                          teardown_start_time=now, teardown_completion_time=None, update_time=now,
                          version=w.version + 1)
        await uow.workflows.update(started, w.version)
        await self._workflow_event(uow, "workflow_teardown_started", started, principal.user)
        await self.schedule_teardown(uow, w.id, principal.user)
        return started

    async def schedule_teardown(self, uow, workflow_id: str, actor: str) -> None:
        """Destroys every resource whose dependents are destroyed; ends the
        teardown when all are."""
        w = await uow.workflows.get(workflow_id)
        if w is None or w.teardown_status != IN_PROGRESS:
            return
        steps = await uow.steps.of(w.id)
        if all(s.teardown_status in ("", DONE) for s in steps):
            now = utcnow()
            done = replace(w, teardown_status=DONE, teardown_completion_time=now, update_time=now,
                           version=w.version + 1)
            await uow.workflows.update(done, w.version)
            await self._workflow_event(uow, "workflow_torn_down", done, actor)
            return
        for st in teardown_ready(w, steps):
            running = replace(st, teardown_status=IN_PROGRESS, teardown_start_time=utcnow(), waiting_reason="",
                              version=st.version + 1)
            if not await uow.steps.update(running, st.version):
                continue
            await self._step_event(uow, "step_teardown_started", running, actor)
            uow.after_commit(lambda step_id=st.id, user=w.torn_down_by or actor: self.destroy_step(step_id, user))

    async def destroy_step(self, step_id: str, actor: str) -> None:
        """Asks the resource service to destroy the step's resource; the
        destroy job's completion event moves the teardown on."""
        async with self.uow_factory() as uow:
            st = await uow.steps.get(step_id)
        if st is None or st.teardown_status != IN_PROGRESS:
            return
        try:
            found = await self.remote.find_resource(st.resource_id)
            if found is None:
                await self.teardown_step_done(step_id, "", actor)
                return
            if found.state == "provision" and found.status not in ("queued", "in_progress", "approval_pending"):
                # Never provisioned. The resource service deletes its record
                # when no job ever ran for it (no state, no infrastructure);
                # otherwise it refuses, and the destroy below removes what its
                # state holds (a provisioning that failed or was interrupted).
                try:
                    await self.remote.delete_resource(actor, found.id)
                    await self.teardown_step_done(step_id, "", actor)
                    return
                except RemoteError as exc:
                    if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
            resource = await self.remote.destroy(actor, st.resource_id)
        except RemoteError as exc:
            resource = await self._resource_after_refusal(st, exc, actor)
            if resource is None:
                return
        except Unavailable as exc:  # the reconciler asks again
            log.warning("destroying the resource of step %s: %s; the reconciler retries", step_id, exc.message)
            return
        except Exception as exc:  # noqa: BLE001 - never leave a teardown step silently in_progress
            log.exception("destroying the resource of step %s failed", step_id)
            await self.teardown_step_failed(step_id, f"could not start the destroy: {type(exc).__name__}", actor)
            return
        if resource.status == "approval_pending":
            await self.step_waiting(step_id, awaiting_approval(resource.id, resource.approval_request_id,
                                                               destroy=True), actor)
        elif resource.state == "destroyed" and resource.status == "done":
            await self.teardown_step_done(step_id, resource.last_job_id, actor)

    async def _resource_after_refusal(self, st: Step, exc: RemoteError, actor: str) -> ResourceInfo | None:
        """A refused destroy may be one already under way or done (a repeat
        after a crash): then the teardown goes on; otherwise the step fails."""
        resource = await self.remote.find_resource(st.resource_id)
        if resource is None:
            await self.teardown_step_done(st.id, "", actor)
            return None
        if resource.state == "destroyed" or (resource.state == "destroy" and resource.status in (
                "queued", "in_progress", "approval_pending")):
            return resource
        await self.teardown_step_failed(st.id, f"could not start the destroy: {exc.details}", actor)
        return None

    async def teardown_step_done(self, step_id: str, job_id: str, actor: str, uow=None) -> None:
        async def apply(u) -> bool:
            st = await u.steps.get(step_id)
            if st is None or st.teardown_status != IN_PROGRESS:
                return False
            done = replace(st, teardown_status=DONE, teardown_job_id=job_id or st.teardown_job_id,
                           waiting_reason="", version=st.version + 1)
            if not await u.steps.update(done, st.version):
                return False
            await self._step_event(u, "step_torn_down", done, actor)
            await self.schedule_teardown(u, st.workflow_id, actor)
            return True
        await self._in_uow(uow, apply)

    async def teardown_step_failed(self, step_id: str, message: str, actor: str, job_id: str = "",
                                   uow=None) -> None:
        """The step and the teardown go to error; destroys under way finish,
        the rest waits for a retry."""
        async def apply(u) -> bool:
            st = await u.steps.get(step_id)
            if st is None or st.teardown_status != IN_PROGRESS:
                return False
            failed = replace(st, teardown_status=ERROR, teardown_error_message=message, waiting_reason="",
                             teardown_job_id=job_id or st.teardown_job_id, version=st.version + 1)
            if not await u.steps.update(failed, st.version):
                return False
            await self._step_event(u, "step_teardown_failed", failed, actor)
            w = await u.workflows.get(st.workflow_id)
            if w is not None and w.teardown_status == IN_PROGRESS:
                now = utcnow()
                errored = replace(w, teardown_status=ERROR, update_time=now, teardown_completion_time=now,
                                  teardown_error_message=f"destroying the resource of step {st.template_name} "
                                                         f"failed: {message}", version=w.version + 1)
                await u.workflows.update(errored, w.version)
                await self._workflow_event(u, "workflow_teardown_failed", errored, actor)
            return True
        await self._in_uow(uow, apply)

