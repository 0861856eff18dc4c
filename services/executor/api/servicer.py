"""gRPC servicer of ExecutorService: parses, authorises, calls one use case in
a unit of work, converts the result."""
from __future__ import annotations

from google.protobuf import empty_pb2

from infrakitchen.executor.v1 import executor_pb2 as pb
from infrakitchen.executor.v1 import executor_pb2_grpc
from services.common.auth import current_principal
from services.common.filters import enum_word, merged, parse_filter, text, words_of
from services.common.errors import FieldViolation, InvalidArgument
from services.common.values import to_timestamp
from services.executor.adapters.terraform import current_state_meta
from services.executor.api import convert
from services.executor.app import credentials, jobs
from services.executor.domain.model import RUNNING

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExecutorService"].full_name

# Lines and status written by this process wake a stream at once
# (services.common.changes); the poll finds those of a job another executor
# process runs.
LOG_POLL_SECONDS = 0.5
INTEGRATION_MASK = ("name", "description", "credentials", "max_concurrent_jobs")



# What ListJobs' `filter` may name, and how each value is read.
FILTERS = {"resource_id": text, "workflow_id": text,
           "status": enum_word(words_of(convert.STATUS, pb.JobStatus, "JOB_STATUS_"), "JOB_STATUS_")}

class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, runtime):
        self.uow = runtime.uow
        self.changes = runtime.changes
        self.default_timeout = runtime.executor_config.default_timeout
        self.config = runtime.executor_config
        self.workers = runtime.workers
        self.resource_users = runtime.resource_users
        terraform = runtime.workers.terraform
        self.current_state = lambda storage, path: current_state_meta(terraform, storage, path)

    # --- jobs --------------------------------------------------------------

    async def SubmitJob(self, request, context):
        if request.validate_only:  # every check of a submission, then nothing kept
            async with self.uow() as uow:
                job, _ = await jobs.submit_job(uow, current_principal(), convert.job_from_submit(request),
                                               self.default_timeout, current_state=self.current_state)
                await uow.rollback()
            return convert.job_to_pb(job)
        # An idle worker of this process takes the job as it is stored; else the work queue does.
        turn = self.workers.reserve(request.correlation.workflow_id)
        try:
            async with self.uow() as uow:
                job, created = await jobs.submit_job(
                    uow, current_principal(), convert.job_from_submit(request), self.default_timeout,
                    request.request_id, start_as=(self.config.worker_id, self.config.lease) if turn else None,
                    current_state=self.current_state)
                await uow.commit()
        except BaseException:
            if turn is not None:
                turn.give_back()
            raise
        if turn is not None:
            # Only a job stored running on this worker is started here: one an
            # integration's cap kept queued waits on the work queue like any other.
            if created and job.status == RUNNING and job.worker == self.config.worker_id:
                self.workers.start_claimed(turn, job)
            else:
                turn.give_back()
        return convert.job_to_pb(job)

    async def GetJob(self, request, context):
        async with self.uow() as uow:
            return convert.job_to_pb(await jobs.get_job(uow, request.id))

    async def ListJobs(self, request, context):
        async with self.uow() as uow:
            filters = merged(dict(resource_id=request.resource_id, workflow_id=request.workflow_id,
                                  status=convert.STATUS.get(request.status, "")), parse_filter(request.filter, FILTERS))
            found, token = await jobs.list_jobs(uow, request.page_size, request.page_token, filters["resource_id"],
                                                filters["workflow_id"], filters["status"], request.order_by)
        return pb.ListJobsResponse(jobs=[convert.job_to_pb(j) for j in found], next_page_token=token)

    async def CancelJob(self, request, context):
        async with self.uow() as uow:
            job = await jobs.cancel_job(uow, current_principal(), request.id)
            await uow.commit()
        return convert.job_to_pb(job)

    async def StreamJobLogs(self, request, context):
        """Replays what was written after `after_line`, then follows (the
        lines are read from the database, so any executor process can serve
        any job's stream) until the job has ended and every line was sent."""
        after = max(request.after_line, 0)
        async with self.uow() as uow:
            await jobs.get_job(uow, request.job_id)
        with self.changes.watch(request.job_id) as watch:
            while True:
                seen = watch.changes  # before the read: a commit during it wakes the next wait at once
                async with self.uow() as uow:
                    rows = await uow.logs.after(request.job_id, after)
                    status = (await uow.jobs.get(request.job_id)).status if not rows else None
                if rows:
                    after = rows[-1].number
                    yield pb.StreamJobLogsResponse(lines=[
                        pb.LogLine(number=r.number, time=to_timestamp(r.time), stream=r.stream, text=r.text)
                        for r in rows])
                    continue
                if status in ("succeeded", "failed", "cancelled", "timed_out"):
                    # A line written just before the status changed is read above
                    # on the next pass; read once more so none is missed.
                    async with self.uow() as uow:
                        rows = await uow.logs.after(request.job_id, after)
                    if rows:
                        continue
                    yield pb.StreamJobLogsResponse(final_status=convert.STATUS_PB[status])
                    return
                await watch.after(seen, LOG_POLL_SECONDS)

    async def GetJobSensitiveOutputs(self, request, context):
        async with self.uow() as uow:
            job = await jobs.get_job(uow, request.job_id)
        return pb.GetJobSensitiveOutputsResponse(outputs=convert.outputs_pb(job.outputs, reveal=True))

    # --- integrations ------------------------------------------------------

    async def CreateIntegration(self, request, context):
        async with self.uow() as uow:
            i = await credentials.create_integration(
                uow, current_principal(), convert.integration_from_pb(request.integration, request.credentials),
                request.request_id)
            await uow.commit()
        return convert.integration_to_pb(i)

    async def GetIntegration(self, request, context):
        async with self.uow() as uow:
            return convert.integration_to_pb(await credentials.get_integration(uow, request.id))

    async def ListIntegrations(self, request, context):
        async with self.uow() as uow:
            found, token = await credentials.list_integrations(uow, request.page_size, request.page_token)
        return pb.ListIntegrationsResponse(integrations=[convert.integration_to_pb(i) for i in found],
                                           next_page_token=token)

    async def UpdateIntegration(self, request, context):
        i = request.integration
        if bad := [f for f in request.update_mask if f not in INTEGRATION_MASK]:
            raise InvalidArgument("invalid integration update", [FieldViolation(
                f"update_mask[{f}]", f"only {', '.join(INTEGRATION_MASK)} change") for f in bad[:10]])
        async with self.uow() as uow:
            updated = await credentials.update_integration(
                uow, current_principal(), i.id, i.etag, i.name or None, i.description or None,
                dict(request.credentials),
                i.max_concurrent_jobs if "max_concurrent_jobs" in request.update_mask else None)
            await uow.commit()
        return convert.integration_to_pb(updated)

    async def DeleteIntegration(self, request, context):
        async with self.uow() as uow:
            await credentials.delete_integration(uow, current_principal(), request.id, request.etag,
                                                 self.resource_users)
            await uow.commit()
        return empty_pb2.Empty()

    # --- secrets -----------------------------------------------------------

    async def CreateSecret(self, request, context):
        async with self.uow() as uow:
            x = await credentials.create_secret(uow, current_principal(),
                                                convert.secret_from_pb(request.secret, request.values),
                                                request.request_id)
            await uow.commit()
        return convert.secret_to_pb(x)

    async def GetSecret(self, request, context):
        async with self.uow() as uow:
            return convert.secret_to_pb(await credentials.get_secret(uow, request.id))

    async def ListSecrets(self, request, context):
        async with self.uow() as uow:
            found, token = await credentials.list_secrets(uow, request.page_size, request.page_token)
        return pb.ListSecretsResponse(secrets=[convert.secret_to_pb(x) for x in found], next_page_token=token)

    async def UpdateSecret(self, request, context):
        x = request.secret
        async with self.uow() as uow:
            updated = await credentials.update_secret(uow, current_principal(), x.id, x.etag,
                                                      x.description or None, dict(request.values))
            await uow.commit()
        return convert.secret_to_pb(updated)

    async def DeleteSecret(self, request, context):
        async with self.uow() as uow:
            await credentials.delete_secret(uow, current_principal(), request.id, request.etag,
                                            self.resource_users)
            await uow.commit()
        return empty_pb2.Empty()

    # --- storages ----------------------------------------------------------

    async def CreateStorage(self, request, context):
        async with self.uow() as uow:
            x = await credentials.create_storage(uow, current_principal(), convert.storage_from_pb(request.storage),
                                                 request.request_id)
            await uow.commit()
        return convert.storage_to_pb(x)

    async def GetStorage(self, request, context):
        async with self.uow() as uow:
            return convert.storage_to_pb(await credentials.get_storage(uow, request.id))

    async def ListStorages(self, request, context):
        async with self.uow() as uow:
            found, token = await credentials.list_storages(uow, request.page_size, request.page_token)
        return pb.ListStoragesResponse(storages=[convert.storage_to_pb(x) for x in found], next_page_token=token)

    async def DeleteStorage(self, request, context):
        async with self.uow() as uow:
            await credentials.delete_storage(uow, current_principal(), request.id, request.etag)
            await uow.commit()
        return empty_pb2.Empty()

    async def ClaimStatePath(self, request, context):
        async with self.uow() as uow:
            c = await credentials.claim(uow, request.storage_id, request.state_path, request.resource_id)
            await uow.commit()
        return pb.StatePathClaim(storage_id=c.storage_id, state_path=c.state_path, resource_id=c.resource_id,
                                 create_time=to_timestamp(c.create_time))

    async def ReleaseStatePath(self, request, context):
        async with self.uow() as uow:
            await credentials.release(uow, request.storage_id, request.state_path, request.resource_id)
            await uow.commit()
        return empty_pb2.Empty()


def register(server, runtime) -> list[str]:
    executor_pb2_grpc.add_ExecutorServiceServicer_to_server(ExecutorServicer(runtime), server)
    return [SERVICE_NAME]
