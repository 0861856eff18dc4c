"""Bounds of requests (services.common.limits), forged page tokens and the
size of error details, without a server."""
from __future__ import annotations

import base64
import math

import pytest
from google.protobuf import struct_pb2

from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from services.common import errors, limits
from services.common.grpc_errors import to_grpc_status
from services.common.interceptors import Undecodable, _lenient
from services.common.paging import next_page_token, page_window


def fields(exc: errors.InvalidArgument) -> dict[str, str]:
    return {v.field: v.description for v in exc.violations}


def test_a_huge_user_name_is_refused_without_echoing_it():
    with pytest.raises(errors.InvalidArgument) as err:
        limits.check_request(rp.AddResourceOwnerRequest(id="r", user="u" * 1_200_000))
    assert fields(err.value) == {"user": "is longer than 1024 characters"}
    assert "uuu" not in str(err.value) and len(to_grpc_status(err.value).details) < 2000


def test_nested_strings_lists_and_structs_are_bounded():
    request = wp.CreateWorkflowRequest(blueprint_id="b", integration_ids=["i"] * (limits.MAX_LIST + 1))
    request.variable_overrides.add(template_id="t" * 2000)
    with pytest.raises(errors.InvalidArgument) as err:
        limits.check_request(request)
    assert fields(err.value) == {"integration_ids": f"has more than {limits.MAX_LIST} items",
                                 "variable_overrides[0].template_id": "is longer than 1024 characters"}
    nul = rp.CreateResourceRequest(resource=rp.Resource(name="a\x00b"))
    with pytest.raises(errors.InvalidArgument) as err:
        limits.check_request(nul)
    assert fields(err.value) == {"resource.name": "contains a NUL character"}
    big = rp.CreateResourceRequest(resource=rp.Resource(name="x"))
    big.resource.variables.update({"blob": "z" * (limits.MAX_STRUCT_BYTES + 1)})
    with pytest.raises(errors.InvalidArgument) as err:
        limits.check_request(big)
    assert fields(err.value) == {"resource.variables": "is larger than 256 KiB"}


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_and_values_without_a_kind_are_refused(number):
    request = wp.CreateWorkflowRequest(blueprint_id="b")
    o = request.variable_overrides.add(template_id="vpc")
    o.variables.update({"count": number, "ok": 1})
    o.variables.fields["empty"].CopyFrom(struct_pb2.Value())  # what a client that misspelled the kind sends
    o.variables.fields["nested"].struct_value.fields["deep"].list_value.values.add()
    with pytest.raises(errors.InvalidArgument) as err:
        limits.check_request(request)
    got = fields(err.value)
    assert got["variable_overrides[0].variables.count"] == "must be a finite number (not NaN or Infinity)"
    assert got["variable_overrides[0].variables.empty"].startswith("has no value")
    assert got["variable_overrides[0].variables.nested.deep[0]"].startswith("has no value")
    assert "variable_overrides[0].variables.ok" not in got


def test_a_valid_request_passes_and_map_values_have_their_own_bound():
    ok = rp.CreateResourceRequest(resource=rp.Resource(name="vpc", labels=["a", "b"], description="d" * 5000))
    ok.resource.variables.update({"cidr": "10.0.0.0/16", "n": 3, "l": [1, "x", {"a": None}]})
    limits.check_request(ok)
    from infrakitchen.executor.v1 import executor_pb2 as ep
    limits.check_request(ep.CreateIntegrationRequest(credentials={"KEY": "k" * 5000}))
    with pytest.raises(errors.InvalidArgument):
        limits.check_request(ep.CreateIntegrationRequest(credentials={"K" * 2000: "v"}))


@pytest.mark.parametrize("token", ["o:" + "9" * 30, "o:99999999999", "o:-1", "x:1", "o:²", "[]", "{}",
                                   '{"v": 2, "k": "x", "s": "0"}', '{"v": 2, "k": [{"t": "not a time"}], "s": "0"}',
                                   '{"v": 2, "k": [[1]], "s": "0"}'])
def test_forged_page_tokens_are_invalid_argument(token):
    with pytest.raises(errors.InvalidArgument) as err:
        page_window(10, base64.urlsafe_b64encode(token.encode()).decode(), {"list": "x"})
    assert fields(err.value) == {"page_token": "is not a token from a previous List response"}


def test_a_page_token_is_bound_to_its_listing():
    import datetime as dt
    key = (dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone.utc), "id-1")
    token = next_page_token(key, {"list": "resources", "label": "a"})
    assert page_window(10, token, {"list": "resources", "label": "a"}) == (list(key), 10)
    with pytest.raises(errors.InvalidArgument) as err:
        page_window(10, token, {"list": "resources", "label": "b"})
    assert "another listing" in fields(err.value)["page_token"]


def test_undecodable_request_bytes_become_a_sentinel_not_an_exception():
    decode = _lenient(rp.GetResourceRequest.FromString)
    assert isinstance(decode(b"\xff\xff\xff\xff"), Undecodable)
    assert decode(rp.GetResourceRequest(id="x").SerializeToString()).id == "x"


def test_error_details_stay_small_whatever_the_message():
    err = errors.InvalidArgument("m" * 100_000, [errors.FieldViolation("f" * 10_000, "d" * 10_000)] * 500)
    status = to_grpc_status(err)
    assert len(status.details) <= 1000 and sum(len(v) for _, v in status.trailing_metadata) < 16 * 1024 // 2
    nf = to_grpc_status(errors.NotFound("template", "t" * 200_000))
    assert sum(len(v) for _, v in nf.trailing_metadata) < 4000


@pytest.mark.parametrize("url", ["fd::17", "ext::sh -c id", "/etc", "../repo", "-u", "", "file:///x\n",
                                 "https://host/x y"])
def test_only_supported_repository_urls_are_accepted(url):
    from services.common.git import check_repository_url
    assert check_repository_url(url) is not None


@pytest.mark.parametrize("url", ["file:///srv/modules", "https://git.example.com/mods.git",
                                 "ssh://git@host/mods.git", "git@github.example:team/mods.git", "git://host/mods"])
def test_supported_repository_urls_pass(url):
    from services.common.git import check_repository_url
    assert check_repository_url(url) is None


async def test_git_dies_with_the_process_that_started_it(tmp_path):
    """A git started by a service is killed by the kernel when the service dies."""
    import os
    import signal
    import subprocess
    import sys
    import time
    # A git that hangs: reading a config include from a fifo nobody writes.
    fifo = tmp_path / "hang"
    os.mkfifo(fifo)
    script = ("import asyncio\nfrom services.common import git\n"
              f"asyncio.run(git._git('-c', 'include.path={fifo}', 'status', timeout=60))\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 10
    child = None
    while child is None and time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout.split()
        child = int(out[0]) if out else None
        time.sleep(0.05)
    assert child is not None, "git did not start"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("git outlived the process that started it")
