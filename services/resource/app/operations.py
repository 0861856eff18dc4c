"""Operations that run IaC jobs: provision, dry run, recreate, destroy, delete, the job submission and the outcome of a finished job."""
from __future__ import annotations

import json
import uuid
from dataclasses import replace

from services.common.auth import Principal, Role
from services.common.clients import RemoteError
from services.common.errors import Aborted, DomainError, FailedPrecondition, Unavailable, PreconditionViolation
from services.common.uow import utcnow
from services.resource.adapters.remote import JobInfo, JobSubmission, VersionInfo
from services.resource.domain.model import (dry_run_moved, dry_run_started, APPROVAL_PENDING, DESTROY, PENDING, DESTROYED, DONE, ERROR, IN_PROGRESS,
                                            OP_DESTROY, OP_PROVISION, OP_UPDATE, PROVISION, PROVISIONED, QUEUED,
                                            READY, REJECTED, TS_MERGED, UNKNOWN, Resource, Revision)
from services.resource.app.base import JobNotRecordedYet, LifecycleBase, _busy, _check_etag, _wrong_state, log


def _teardown_of_its_workflow(principal: Principal, r: Resource) -> bool:
    """The workflow service tearing down the workflow that created `r`: it
    may destroy with its state a resource never provisioned for which a job
    ran, and delete one for which none ever ran (beyond the product
    document's state table, which users keep), so a teardown leaves nothing
    behind. A destroy of the first kind withdrawn (cancelled, or its approval
    rejected) returns it to provision/error."""
    return principal.via == "workflow" and bool(r.workflow_id)


class Operations(LifecycleBase):
    # --- provision, dry run, recreate ---------------------------------------------

    async def provision(self, uow, principal: Principal, id_: str, etag: str = "", reviewed=None) -> Resource:
        r = await self.get(uow, id_)
        _check_etag(r, etag)
        self._needs_iac(r, "provision")
        if r.busy:
            raise _busy(r, "provision")
        if r.state != PROVISION or r.status not in (READY, ERROR, UNKNOWN, PENDING):
            raise _wrong_state(r, "provision", "state provision with status ready or error")
        if await self._parents_on_their_way(uow, r, principal.user):
            # Waits for its prerequisite: starts when the last parent is provisioned.
            return await self._save(uow, r, replace(r, status=PENDING, error_message=""), principal.user,
                                    "provision_pending")
        await self._parents_provisioned(uow, r, principal.user)
        if reviewed is not None:
            # A workflow step's plan, applied exactly. Checked first: it raises
            # unless the flow is off or an approved workflow plan covers it.
            approved = await self.check_reviewed_plan(uow, principal, r, reviewed)
            return await self._start(uow, principal.user, r, OP_PROVISION, "provision", reviewed.plan_job_id,
                                     approved=approved)
        return await self._start_or_ask(uow, principal, r, OP_PROVISION, "provision")

    async def recreate(self, uow, principal: Principal, id_: str, etag: str = "") -> Resource:
        r = await self.get(uow, id_)
        _check_etag(r, etag)
        self._needs_iac(r, "recreate")
        if not ((r.state == DESTROYED and r.status == DONE) or (r.state == PROVISION and r.status == REJECTED)):
            raise _wrong_state(r, "recreate", "destroyed/done or provision/rejected")
        waiting = await self._parents_on_their_way(uow, r, principal.user)
        if not waiting:
            await self._parents_provisioned(uow, r, principal.user)
        # The document: recreate increments the revision. A destroyed resource
        # gets it when the new apply succeeds (it was provisioned before); one
        # whose first provisioning was rejected gets it here.
        revision = r.revision if r.ever_provisioned else r.revision + 1
        ready = await self._save(uow, r, replace(r, state=PROVISION, status=PENDING if waiting else READY,
                                                 error_message="", revision=revision), principal.user, "recreate")
        if waiting:  # starts when the last parent is provisioned
            return ready
        return await self._start_or_ask(uow, principal, ready, OP_PROVISION, "recreate")

    async def dry_run(self, uow, principal: Principal, id_: str) -> Resource:
        r = await self.get(uow, id_)
        self._needs_iac(r, "dry-run")
        if r.busy:
            raise _busy(r, "dry-run")
        if r.state not in (PROVISION, PROVISIONED):
            raise _wrong_state(r, "dry-run", "state provision or provisioned")
        version = await self._version(r.source_code_version_id)
        job_id = await self.remote.submit_job(self._submission(r, version, "plan", f"dryrun-{uuid.uuid4()}"),
                                              principal.user)
        after = await self._save(uow, r, replace(r, plan_job_id=job_id,
                                                 last_dry_run=dry_run_started(job_id, utcnow())),
                                 principal.user, "dry_run", events=(), extra={"job_id": job_id})
        return after

    def _needs_iac(self, r: Resource, action: str) -> None:
        if r.abstract:
            raise FailedPrecondition(f"resource {r.name} is abstract: it has no infrastructure to {action}",
                                     [PreconditionViolation("ABSTRACT_RESOURCE", f"resources/{r.id}",
                                                            "abstract resources are records only")])

    async def _parents_on_their_way(self, uow, r: Resource, actor: str) -> bool:
        """True when some parent is not provisioned yet but is being provisioned
        (and every other parent is provisioned or on its way too)."""
        waiting = False
        for parent in (await uow.resources.get_many(r.parent_ids)).values():
            parent = await self.settle(uow, parent, actor)
            if parent.state == PROVISIONED:
                continue
            if parent.state == PROVISION and parent.status in (QUEUED, IN_PROGRESS, APPROVAL_PENDING, PENDING):
                waiting = True
                continue
            return False
        return waiting

    async def _start_waiting_children(self, uow, parent: Resource, actor: str) -> None:
        """A parent finished provisioning (or failed): children waiting for it
        start (or fail too)."""
        for child in await uow.resources.children(parent.id):
            if child.status != PENDING or child.state != PROVISION:
                continue
            if parent.state != PROVISIONED:
                await self._save(uow, child, replace(child, status=ERROR,
                                                     error_message=f"parent {parent.name} failed to provision"),
                                 actor, "provision_failed")
                continue
            parents = await uow.resources.get_many(child.parent_ids)
            parents[parent.id] = parent
            if all(p.state == PROVISIONED for p in parents.values()):
                await self._start_or_ask(uow, Principal(actor, Role.WRITE), child, OP_PROVISION, "provision")

    async def _parents_provisioned(self, uow, r: Resource, actor: str) -> None:
        problems = []
        for parent in (await uow.resources.get_many(r.parent_ids)).values():
            parent = await self.settle(uow, parent, actor)
            if parent.state != PROVISIONED:
                problems.append(PreconditionViolation("PARENT_NOT_PROVISIONED", f"resources/{parent.id}",
                                                      f"{parent.name} is {parent.state}/{parent.status}"))
        if problems:
            raise FailedPrecondition(f"the parents of {r.name} must be provisioned first", problems)

    async def _start_or_ask(self, uow, principal: Principal, r: Resource, operation: str, action: str,
                            plan: JobInfo | None = None) -> Resource:
        """With the approval flow on, the operation waits for an owner's
        decision; otherwise its job starts (after commit)."""
        if await self.approval_flow_on(uow):
            return await self._save(uow, r, replace(r, status=APPROVAL_PENDING, pending_operation=operation,
                                                    error_message=""),
                                    principal.user, f"{action}_requested", plan=plan)
        return await self._start(uow, principal.user, r, operation, action)

    async def _start(self, uow, actor: str, r: Resource, operation: str, action: str,
                     reviewed_plan_job_id: str = "", approved: bool = False) -> Resource:
        """`approved`: an owner approved the operation (or an approved
        workflow plan covers it); otherwise its submission checks the approval
        flow again (see submit)."""
        if operation == OP_PROVISION:
            # A provisioning applies a saved plan only when a workflow step
            # hands it one (a dry run's plan_job_id is not an approval to apply it).
            r = replace(r, plan_job_id=reviewed_plan_job_id)
        queued = await self._save(uow, r, self._queued(r, operation, approved), actor, action)
        self._submit_after_commit(uow, queued, actor)
        return queued

    @staticmethod
    def _queued(r: Resource, operation: str, approved: bool = False) -> Resource:
        """The resource waiting for the job of `operation` (submitted after commit)."""
        return replace(r, state=DESTROY if operation == OP_DESTROY else r.state, status=QUEUED,
                       pending_operation=operation, operation_approved=approved, job_request_id=str(uuid.uuid4()),
                       last_job_id="", error_message="")

    def _submit_after_commit(self, uow, queued: Resource, actor: str) -> None:
        uow.after_commit(lambda: self.submit(queued.id, queued.job_request_id, actor, queued))

    def _submission(self, r: Resource, version: VersionInfo | None, action: str, request_id: str,
                    variables: dict | None = None, temporary_state_id: str = "") -> JobSubmission:
        return JobSubmission(
            action=action, version=version, variables=dict(r.variables if variables is None else variables),
            sensitive_variables=[n for n in r.sensitive_variables if n in (variables or r.variables)],
            integration_ids=r.integration_ids, secret_ids=r.secret_ids, storage_id=r.storage_id,
            state_path=r.storage_path, resource_id=r.id, revision=r.revision, workflow_id=r.workflow_id,
            step_id=r.step_id, temporary_state_id=temporary_state_id or r.temporary_state_id, request_id=request_id,
            template_id=r.template_id)

    async def submit(self, resource_id: str, request_id: str, actor: str, queued: Resource | None = None) -> None:
        """Submits the job of a queued resource (idempotent by request id) and
        records its id. On failure the resource shows the error instead of
        staying queued. `queued` is the resource as just committed, if the
        caller has it."""
        r = queued
        if r is None:
            async with self.uow_factory() as uow:
                r = await uow.resources.get(resource_id)
        if r is None or r.job_request_id != request_id or r.last_job_id:
            return
        # A submission right after the commit that queued the operation: that
        # transaction read the approval flow. A later one (the reconciler's,
        # after the executor was unreachable) reads it again here.
        delayed = queued is None
        if delayed and not r.operation_approved and r.pending_operation in (OP_PROVISION, OP_DESTROY) \
                and await self._ask_instead_of_submitting(resource_id, request_id, actor):
            return
        try:
            # An approved update, and a workflow step's provisioning with a
            # reviewed plan, apply exactly that plan; everything else runs the
            # source code version as it is now.
            reviewed = r.plan_job_id if r.pending_operation in (OP_UPDATE, OP_PROVISION) else ""
            version = None if reviewed else await self._version(r.source_code_version_id)
            action = "destroy" if r.pending_operation == OP_DESTROY else "apply"
            submission = self._submission(r, version, action, request_id)
            submission.plan_job_id = reviewed
            job_id = await self.remote.submit_job(submission, actor)
            error = ""
        except Unavailable as exc:
            # The executor is down or restarting: the resource stays queued and
            # the reconciler submits again (the request id makes it one job).
            log.warning("submitting the job of resource %s: %s; the reconciler retries", resource_id, exc.message)
            return
        except DomainError as exc:
            job_id, error = "", f"could not start the job: {exc.message}"
        except RemoteError as exc:  # the executor refused it: say why, with its field violations
            job_id, error = "", f"could not start the job: {exc.describe()}"
        except Exception as exc:  # noqa: BLE001 - the resource must not stay queued silently
            log.exception("submitting the job of resource %s failed", resource_id)
            job_id, error = "", f"could not start the job: {type(exc).__name__}"
        for _ in range(5):  # a job event may be changing the resource at the same moment
            async with self.uow_factory() as uow:
                current = await uow.resources.get(resource_id)
                if current is None or current.job_request_id != request_id or current.last_job_id:
                    return
                if job_id:
                    after = replace(current, last_job_id=job_id,
                                    last_job_action="destroy" if current.pending_operation == OP_DESTROY else "apply")
                    await self._save(uow, current, after, actor, "job_submitted", events=(), extra={"job_id": job_id})
                else:
                    await self._failed_to_start(uow, current, error, actor, events=("resource_failed",))
                try:
                    await uow.commit()
                    return
                except Aborted:
                    continue

    async def _failed_to_start(self, uow, current: Resource, error: str, actor: str,
                               events: tuple[str, ...]) -> Resource:
        """The queued operation ends before any job ran: the resource shows why."""
        after = replace(current, status=ERROR, error_message=error, job_request_id="", pending_operation="",
                        operation_approved=False, plan_job_id="")
        return await self._save(uow, current, after, actor, "job_failed_to_start", events=events)

    async def _ask_instead_of_submitting(self, resource_id: str, request_id: str, actor: str) -> bool:
        """The approval flow was turned on after the operation was queued
        (it was off then) and before its job was submitted, e.g. while the
        executor was unreachable and the reconciler submits it later: no job
        starts without an owner's approval, so the operation waits for one.
        (An update merged its temporary state before queueing; it is
        submitted as queued: see docs/architecture.md, Security model.)"""
        async with self.uow_factory() as uow:
            if not await self.approval_flow_on(uow):
                return False
            current = await uow.resources.get(resource_id)
            if current is None or current.job_request_id != request_id or current.last_job_id:
                return True  # submitted or changed meanwhile: nothing to submit from here
            if current.plan_job_id:  # a workflow step's reviewed plan, checked while the flow was off
                waiting = await self._failed_to_start(
                    uow, current, "the approval flow was turned on after the step's plan was checked; plan and "
                                  "approve the workflow again", actor,
                    events=("resource_status_changed", "resource_failed"))
            else:
                waiting = replace(current, status=APPROVAL_PENDING, job_request_id="", error_message="")
                await self._save(uow, current, waiting, actor, f"{current.pending_operation}_requested")
            try:
                await uow.commit()
            except Aborted:
                return True  # changed at the same moment; the reconciler looks again
        log.info("resource %s: the approval flow was turned on before its job was submitted; it is now %s",
                 resource_id, waiting.status)
        return True

    async def _version(self, id_: str) -> VersionInfo:
        version = await self.remote.version(id_)
        if version is None:
            raise FailedPrecondition(f"source code version {id_} no longer exists", [PreconditionViolation(
                "VERSION_MISSING", f"source_code_versions/{id_}", "pick another source code version")])
        return version

    # --- job outcomes ----------------------------------------------------------------

    async def on_job_event(self, uow, job: JobInfo, resource_id: str, temporary_state_id: str, actor: str) -> None:
        if job.action == "plan":
            await self._on_dry_run_event(uow, job, resource_id, temporary_state_id)
            return
        r = await uow.resources.get(resource_id)
        if r is None:
            return
        if not r.last_job_id and r.job_request_id and r.status in (QUEUED, IN_PROGRESS):
            raise JobNotRecordedYet(f"resource {r.id} has not recorded its job yet")
        if r.last_job_id != job.id:
            return  # an older job's event
        if job.status == "running":
            if r.status == QUEUED:
                await self._save(uow, r, replace(r, status=IN_PROGRESS), actor, "job_started")
            return
        if job.status in ("succeeded", "failed", "cancelled", "timed_out"):
            await self.apply_job_outcome(uow, r, job, actor)

    async def _on_dry_run_event(self, uow, job: JobInfo, resource_id: str, temporary_state_id: str) -> None:
        """A plan job moved: the dry run of the temporary state or resource
        that asked for it shows its status, and its counts once it succeeded."""
        now = utcnow()
        counts = (job.plan_add, job.plan_change, job.plan_destroy)
        if temporary_state_id:
            t = await uow.temporary_states.get(temporary_state_id)
            if t is None or t.dry_run_job_id != job.id or t.dry_run.get("status") == job.status:
                return
            moved = dry_run_moved(t.dry_run or dry_run_started(job.id, now), job.status, counts,
                                  job.error_message, now)
            await uow.temporary_states.update(replace(
                t, dry_run=moved, plan_add=moved["plan_add"], plan_change=moved["plan_change"],
                plan_destroy=moved["plan_destroy"], update_time=now, version=t.version + 1), t.version)
            return
        r = await uow.resources.get(resource_id)
        if r is None or r.last_dry_run.get("job_id") != job.id or r.last_dry_run.get("status") == job.status:
            return
        moved = dry_run_moved(r.last_dry_run, job.status, counts, job.error_message, now)
        # The resource's own state is untouched: only its record of the dry run moves.
        await uow.resources.update(replace(r, last_dry_run=moved, update_time=now, version=r.version + 1),
                                   r.version)

    async def apply_job_outcome(self, uow, r: Resource, job: JobInfo, actor: str) -> Resource | None:
        """Applies a finished job to the resource exactly once."""
        if r.last_job_id != job.id or r.status not in (QUEUED, IN_PROGRESS):
            return None
        operation = r.pending_operation
        base = replace(r, pending_operation="", operation_approved=False, job_request_id="", plan_job_id="")
        if job.status != "succeeded":
            message = job.error_message or f"the {job.action} job ended {job.status}"
            failed = await self._save(uow, r, replace(base, status=ERROR, error_message=message), actor,
                                      f"{operation}_failed", events=("resource_status_changed", "resource_failed"))
            if operation == OP_PROVISION:
                await self._start_waiting_children(uow, failed, actor)
            return failed
        if operation == OP_DESTROY:
            return await self._save(uow, r, replace(base, state=DESTROYED, status=DONE, outputs=[],
                                                    error_message=""),
                                    actor, "destroyed", events=("resource_status_changed", "resource_destroyed"))
        revision = r.revision + 1 if (operation == OP_UPDATE or r.ever_provisioned) else r.revision
        after = replace(base, state=PROVISIONED, status=DONE, outputs=list(job.outputs), revision=revision,
                        ever_provisioned=True, error_message="", temporary_state_id="")
        # The guarded write of the resource comes first: a concurrent applier
        # loses there, before it has written anything else (see settle).
        event = "resource_updated" if operation == OP_UPDATE else "resource_provisioned"
        done = await self._save(uow, r, after, actor, "updated" if operation == OP_UPDATE else "provisioned",
                                events=("resource_status_changed", event))
        if operation == OP_UPDATE and r.temporary_state_id:
            t = await uow.temporary_states.get(r.temporary_state_id)
            if t is not None:
                await uow.temporary_states.update(replace(t, status=TS_MERGED, update_time=utcnow(),
                                                          version=t.version + 1), t.version)
        await uow.revisions.add(Revision(r.id, revision, after.source_code_version_id, after.masked_variables(),
                                         after.masked_outputs(), job.id, actor, utcnow()))
        if operation == OP_PROVISION:
            await self._start_waiting_children(uow, done, actor)
        return done

    # --- destroy, delete ----------------------------------------------------------------

    async def destroy(self, uow, principal: Principal, id_: str, etag: str = "") -> Resource:
        r = await self.get(uow, id_)
        _check_etag(r, etag)
        self._needs_iac(r, "destroy")
        # Its job may have ended a moment ago, its event not applied here yet
        # (a workflow's teardown right after the workflow ended): settled first.
        r = await self.settle(uow, r, principal.user)
        if r.busy:
            raise _busy(r, "destroy")
        if not (r.state == PROVISIONED or (r.state == DESTROY and r.status in (READY, ERROR, UNKNOWN))
                or (r.provisioning_left_state and _teardown_of_its_workflow(principal, r))):
            raise _wrong_state(r, "destroy", "state provisioned")
        await self._guard_dependents(uow, r, principal.user)
        if r.state != DESTROY:
            # A failed or interrupted provisioning may have created part of its
            # infrastructure: the destroy job removes what its state holds.
            r = await self._save(uow, r, replace(r, state=DESTROY, status=READY, error_message=""), principal.user,
                                 "destroy_requested")
        return await self._start_or_ask(uow, principal, r, OP_DESTROY, "destroy")

    async def _guard_dependents(self, uow, r: Resource, actor: str) -> None:
        """The product document's "Dependencies exist" error: every child not
        destroyed is listed (id, name, state). A child whose destroy job may
        have just finished is settled with the executor first, so a parent
        destroyed right after its last child's completion event (a workflow
        teardown does exactly that) is not refused (DESIGN §3)."""
        blocking = []
        for child in await uow.resources.children(r.id):
            if child.state != DESTROYED:
                child = await self.settle(uow, child, actor)
            if child.state != DESTROYED:
                blocking.append(child)
        if blocking:
            dependencies = [{"resource_id": c.id, "resource_name": c.name, "state": c.state} for c in blocking]
            raise FailedPrecondition(
                "Cannot destroy resource: Dependencies exist",
                [PreconditionViolation("DEPENDENCY_EXISTS", f"resources/{c.id}", f"{c.name} is {c.state}")
                 for c in blocking],
                reason="DEPENDENCIES_EXIST", metadata={"dependencies": json.dumps(dependencies)})

    async def cancel_destroy(self, uow, principal: Principal, id_: str) -> Resource:
        r = await self.get(uow, id_)
        if r.state != DESTROY or r.status not in (READY, ERROR, APPROVAL_PENDING, REJECTED, UNKNOWN):
            raise _wrong_state(r, "cancel the destroy of", "state destroy, not running")
        return await self._save(uow, r, replace(self._destroy_withdrawn(r), error_message=""), principal.user,
                                "destroy_cancelled")

    async def delete(self, uow, principal: Principal, id_: str, etag: str = "") -> None:
        r = await self.get(uow, id_)
        _check_etag(r, etag)
        if not r.abstract and not (r.state == DESTROYED and r.status == DONE) \
                and not (r.never_ran and _teardown_of_its_workflow(principal, r)):
            raise _wrong_state(r, "delete", "destroyed/done")
        problems = [PreconditionViolation("CHILD_EXISTS", f"resources/{c.id}", f"{c.name} still has it as parent")
                    for c in await uow.resources.children(r.id)]
        problems += [PreconditionViolation("TEMPORARY_STATE_OPEN", f"temporary_states/{t.id}",
                                           f"temporary state {t.id} is {t.status}; submit or discard it")
                     for t in await uow.temporary_states.open_for(r.id)]
        if problems:
            raise FailedPrecondition(f"cannot delete resource {r.name} yet", problems)
        await uow.resources.delete(r.id)
        await self._audit(uow, principal.user, "delete", r, None)
        await self._emit(uow, "resource_deleted", r, principal.user)
        if not r.abstract:
            uow.after_commit(lambda: self._release(r))

    async def _release(self, r: Resource) -> None:
        try:
            await self.remote.release_state_path(r.storage_id, r.storage_path, r.id)
        except Exception as exc:  # noqa: BLE001 - a leftover claim only blocks reuse of the path
            log.warning("could not release storage path %s of deleted resource %s: %s", r.storage_path, r.id, exc)

