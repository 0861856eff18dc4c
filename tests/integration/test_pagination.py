"""Keyset pagination through gRPC: a listing read page by page while rows
are inserted and deleted never skips or repeats a row that was there all
along; a page token only continues the listing it came from; label filters
are exact, in SQL, and follow label changes."""
from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from tests.support.grpc_asserts import field_violations, rpc_error
from tests.support.platform import Platform


@pytest.fixture(params=["sqlite", "postgres"])
async def p(request, tmp_path, event_prefix, nats_url, postgres):
    """On SQLite files and on PostgreSQL databases (the keyset SQL differs in each)."""
    urls = {} if request.param == "sqlite" else {n: postgres.create() for n in ("resource", "workflow")}
    async with Platform(tmp_path, event_prefix, nats_url, database_urls=urls) as platform:
        yield platform


async def list_all(p, request: rp.ListResourcesRequest, between_pages=None) -> list[rp.Resource]:
    seen, token = [], ""
    while True:
        request.page_token = token
        page = await p.resource.ListResources(request, metadata=p.md)
        seen += page.resources
        if not (token := page.next_page_token):
            return seen
        if between_pages is not None:
            await between_pages()


async def test_pages_never_skip_or_repeat_a_row_while_rows_come_and_go(p):
    # Abstract resources: records only, no terraform, so hundreds are cheap.
    before = [await p.create("team", f"team-{n:03d}", labels=["even" if n % 2 == 0 else "odd"])
              for n in range(60)]
    rng = random.Random(3)
    deletable = [r for r in before[20:]]
    rng.shuffle(deletable)
    deleted, added = set(), []

    async def churn():  # between two pages: two new rows, one old row gone
        for _ in range(2):
            added.append(await p.create("team", f"late-{len(added):03d}"))
        if deletable:
            victim = deletable.pop()
            await p.resource.DeleteResource(rp.DeleteResourceRequest(id=victim.id), metadata=p.admin)
            deleted.add(victim.id)

    seen = await list_all(p, rp.ListResourcesRequest(page_size=7), churn)
    ids = [r.id for r in seen]
    assert len(ids) == len(set(ids)), "a row was repeated"
    stayed = {r.id for r in before} - deleted
    assert stayed <= set(ids), "a row that was there all along was skipped"
    keys = [(r.create_time.ToDatetime(), r.id) for r in seen]
    assert keys == sorted(keys), "oldest first, by (create_time, id)"
    assert {r.id for r in added} <= set(ids), "rows created behind the reading point still come"

    # Label filters: exact, in SQL, and following a label change.
    evens = await list_all(p, rp.ListResourcesRequest(page_size=9, label="even"))
    assert {r.id for r in evens} == {r.id for n, r in enumerate(before) if n % 2 == 0 and r.id not in deleted}
    relabel = next(r for n, r in enumerate(before) if n % 2 == 1 and r.id not in deleted)
    await p.resource.UpdateResource(rp.UpdateResourceRequest(resource=rp.Resource(id=relabel.id, labels=["even"]),
                                                             update_mask=["labels"]), metadata=p.md)
    evens = await list_all(p, rp.ListResourcesRequest(page_size=50, label="even"))
    assert relabel.id in {r.id for r in evens}
    odds = await list_all(p, rp.ListResourcesRequest(page_size=50, label="odd"))
    assert relabel.id not in {r.id for r in odds}


async def test_a_page_token_only_continues_its_own_listing(p):
    for n in range(5):
        await p.create("team", f"t-{n}", labels=["x"])
    first = await p.resource.ListResources(rp.ListResourcesRequest(page_size=2, label="x"), metadata=p.md)
    assert first.next_page_token
    other = await rpc_error(p.resource.ListResources(rp.ListResourcesRequest(
        page_size=2, label="y", page_token=first.next_page_token), metadata=p.md))
    assert other.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in field_violations(other)
    elsewhere = await rpc_error(p.workflow.ListWorkflows(wp.ListWorkflowsRequest(
        page_token=first.next_page_token), metadata=p.md))
    assert elsewhere.code() == grpc.StatusCode.INVALID_ARGUMENT
    same = await p.resource.ListResources(rp.ListResourcesRequest(page_size=2, label="x",
                                                                  page_token=first.next_page_token), metadata=p.md)
    assert not {r.id for r in same.resources} & {r.id for r in first.resources}


async def test_concurrent_writers_and_a_reader_agree(p):
    """Writers insert while a reader pages: every row present before the
    reader started is read exactly once."""
    start = [await p.create("team", f"base-{n:02d}") for n in range(30)]
    stop = asyncio.Event()

    async def writer(tag: str):
        n = 0
        while not stop.is_set():
            await p.create("team", f"{tag}-{n:03d}")
            n += 1

    writers = [asyncio.create_task(writer(t)) for t in ("a", "b")]
    try:
        seen = await list_all(p, rp.ListResourcesRequest(page_size=4), lambda: asyncio.sleep(0.01))
    finally:
        stop.set()
        await asyncio.gather(*writers)
    ids = [r.id for r in seen]
    assert len(ids) == len(set(ids)) and {r.id for r in start} <= set(ids)


async def test_lists_can_go_newest_first_and_refuse_an_order_they_do_not_sort_by(p):
    for n in range(5):
        await p.create("team", f"ordered-{n}", labels=["ordered"])
    oldest = [r.name for r in await list_all(p, rp.ListResourcesRequest(page_size=2, label="ordered"))]
    newest = [r.name for r in await list_all(p, rp.ListResourcesRequest(page_size=2, label="ordered",
                                                                         order_by="create_time desc"))]
    assert oldest == [f"ordered-{n}" for n in range(5)] and newest == oldest[::-1]
    everything = [r.id for r in await list_all(p, rp.ListResourcesRequest(page_size=3, order_by="Create_Time  DESC"))]
    assert everything == [r.id for r in await list_all(p, rp.ListResourcesRequest(page_size=3))][::-1]
    # A token continues its own order only; an order we do not sort by is a field violation.
    first = await p.resource.ListResources(rp.ListResourcesRequest(page_size=2, order_by="create_time desc"),
                                           metadata=p.md)
    mixed = await rpc_error(p.resource.ListResources(rp.ListResourcesRequest(
        page_size=2, page_token=first.next_page_token), metadata=p.md))
    assert mixed.code() == grpc.StatusCode.INVALID_ARGUMENT
    for call in (p.resource.ListResources(rp.ListResourcesRequest(order_by="name"), metadata=p.md),
                 p.workflow.ListWorkflows(wp.ListWorkflowsRequest(order_by="x" * 500), metadata=p.md)):
        bad = await rpc_error(call)
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and set(field_violations(bad)) == {"order_by"}
        assert "x" * 100 not in bad.details()


async def test_lists_take_an_aip160_filter_beside_their_typed_fields(p):
    for n in range(4):
        await p.create("team", f"filtered-{n}", labels=["blue" if n % 2 else "green"])
    blue = await list_all(p, rp.ListResourcesRequest(page_size=1, filter='label = "blue"'))
    assert [r.name for r in blue] == ["filtered-1", "filtered-3"]
    both = await list_all(p, rp.ListResourcesRequest(filter="label = green AND state = PROVISIONED"))
    assert [r.name for r in both] == ["filtered-0", "filtered-2"]
    none = await list_all(p, rp.ListResourcesRequest(filter="label = green AND state = resource_state_destroyed"))
    assert none == []
    # A token continues its own filter only.
    first = await p.resource.ListResources(rp.ListResourcesRequest(page_size=1, filter="label = blue"), metadata=p.md)
    other = await rpc_error(p.resource.ListResources(rp.ListResourcesRequest(
        page_size=1, filter="label = green", page_token=first.next_page_token), metadata=p.md))
    assert other.code() == grpc.StatusCode.INVALID_ARGUMENT
    for call in (p.resource.ListResources(rp.ListResourcesRequest(filter="owner = bob"), metadata=p.md),
                 p.resource.ListResources(rp.ListResourcesRequest(label="blue", filter="label = green"), metadata=p.md),
                 p.workflow.ListWorkflows(wp.ListWorkflowsRequest(filter="status = SIDEWAYS"), metadata=p.md)):
        bad = await rpc_error(call)
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and set(field_violations(bad)) == {"filter"}
    assert (await p.workflow.ListWorkflows(wp.ListWorkflowsRequest(filter="status = DONE"), metadata=p.md)).workflows \
        == []
