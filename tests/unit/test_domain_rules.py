"""Pure domain rules of the executor, resource and workflow contexts."""
from __future__ import annotations

import io
import json
import zipfile

from services.executor.domain.model import (Redactor, integration_env, plan_state_meta, plan_summary_from_json,
                                            secret_env, stale_plan_reason, state_meta, valid_state_path)
from services.resource.domain.model import (DependencyConfig, DependencyTag, Resource, can_move,
                                            default_storage_path, inherited, type_problem)
from services.workflow.domain.model import (DONE, IN_PROGRESS, PENDING, Step, WiringRule, Workflow,
                                            plan_stays_approved, ready_steps, resolve_variables, teardown_order,
                                            teardown_ready)


def test_redactor_hides_every_secret_longest_first():
    redact = Redactor(["abc123", "abc123-long-secret", "x"])
    assert redact("token abc123-long-secret and abc123 and x") == "token *** and *** and x"


def test_credentials_become_provider_environment_variables():
    assert integration_env("aws", {"access_key_id": "A", "AWS_REGION": "eu"}) == \
        {"AWS_ACCESS_KEY_ID": "A", "AWS_REGION": "eu"}
    assert integration_env("azure", {"client_id": "c"}) == {"ARM_CLIENT_ID": "c"}
    assert integration_env("generic", {"MyKey": "v"}) == {"MyKey": "v"}
    assert secret_env("tf_var", {"token": "t"}) == {"TF_VAR_token": "t"}


def test_state_paths_stay_inside_their_storage():
    assert valid_state_path("team/vpc") and valid_state_path("a.b_c-d")
    for bad in ("/abs", "../up", "a/../b", "a//b", "", "a/"):
        assert not valid_state_path(bad), bad


def test_plan_summary_counts_like_terraform():
    plan = {"resource_changes": [
        {"address": "a", "change": {"actions": ["create"]}},
        {"address": "b", "change": {"actions": ["delete", "create"]}},
        {"address": "c", "change": {"actions": ["update"]}},
        {"address": "d", "change": {"actions": ["no-op"]}},
    ]}
    s = plan_summary_from_json(plan)
    assert (s.add, s.change, s.destroy) == (2, 1, 1) and [a for a, _ in s.resource_changes] == ["a", "b", "c"]


def test_the_state_table():
    assert can_move("provision", "provisioned") and can_move("provision", "provision")
    assert can_move("provisioned", "destroy") and can_move("destroy", "provisioned")
    assert can_move("destroyed", "provision")
    assert not can_move("provision", "destroy") and not can_move("destroyed", "provisioned")


def test_variable_types_are_checked_on_the_outer_type():
    assert type_problem("string", 5) == "must be of type string"
    assert type_problem("number", True) and not type_problem("number", 2.5)
    assert not type_problem("list(string)", ["a"]) and type_problem("map(string)", ["a"])
    assert not type_problem("", {"any": 1}) and not type_problem("object({a=string})", {"a": "b"})


def test_inheritance_is_the_union_of_inheritable_tags_and_configs():
    a = Resource(id="a", name="a", template_id="t", dependency_tags=[DependencyTag("team", "x", True),
                                                                     DependencyTag("own", "y", False)],
                 dependency_configs=[DependencyConfig("region", "eu", True)])
    b = Resource(id="b", name="b", template_id="t", dependency_tags=[DependencyTag("env", "prod", True)],
                 dependency_configs=[DependencyConfig("region", "us", True), DependencyConfig("size", 3, True)])
    tags, configs = inherited([a, b])
    assert {(t.name, t.value) for t in tags} == {("team", "x"), ("env", "prod")}
    assert {c.name: c.value for c in configs} == {"region": "eu", "size": 3}
    assert default_storage_path("vpc", "prod east/1") == "vpc/prod-east-1"


def test_variable_precedence_and_ready_queue():
    wiring = [WiringRule("vpc", "vpc_id", "eks", "vpc_id"), WiringRule("vpc", "vpc_id", "rds", "vpc_id")]
    vpc = Step("s1", "w", "vpc", "VPC", 0, status=DONE, outputs={"vpc_id": "vpc-1"})
    eks = Step("s2", "w", "eks", "EKS", 1, depends_on=["s1"], defaults={"vpc_id": "d", "size": 1},
               overrides={"size": 3})
    rds = Step("s3", "w", "rds", "RDS", 1, depends_on=["s1"], overrides={"vpc_id": "forced"})
    assert resolve_variables(eks, wiring, {"vpc": vpc}) == {"vpc_id": "vpc-1", "size": 3}
    assert resolve_variables(rds, wiring, {"vpc": vpc}) == {"vpc_id": "forced"}
    slow = Step("s4", "w", "slow", "SLOW", 1, depends_on=["s1"], status=IN_PROGRESS)
    leaf = Step("s5", "w", "leaf", "LEAF", 2, depends_on=["s2"])
    eks.status = DONE
    w = Workflow("w", "b", 1)
    # The leaf starts once its own dependency is done, whatever its level-mate does.
    assert [s.id for s in ready_steps(w, [vpc, eks, rds, slow, leaf])] == ["s3", "s5"]
    w.max_parallel_steps = 2
    assert [s.id for s in ready_steps(w, [vpc, eks, rds, slow, leaf])] == ["s3"]
    assert rds.status == PENDING
    # The level-by-level schedule (the benchmark's baseline): the leaf waits for its whole level.
    w.max_parallel_steps = 0
    assert [s.id for s in ready_steps(w, [vpc, eks, rds, slow, leaf], level_barrier=True)] == ["s3"]


def test_teardown_goes_in_reverse_dependency_order():
    vpc = Step("s1", "w", "vpc", "VPC", 0, resource_id="r1")
    eks = Step("s2", "w", "eks", "EKS", 1, depends_on=["s1"], resource_id="r2")
    rds = Step("s3", "w", "rds", "RDS", 1, depends_on=["s1"], resource_id="r3")
    app = Step("s4", "w", "app", "APP", 2, depends_on=["s2", "s3"], resource_id="r4")
    order = teardown_order([vpc, eks, rds, app])
    assert [(i.step.id, i.level) for i in order] == [("s4", 0), ("s2", 1), ("s3", 1), ("s1", 2)]
    assert [d.id for d in order[-1].blocked_by] == ["s2", "s3"]
    # Without the app (destroyed already), EKS and RDS have no dependents left.
    assert [(i.step.id, i.level) for i in teardown_order([vpc, eks, rds])] == [("s2", 0), ("s3", 0), ("s1", 1)]

    w = Workflow("w", "b", 1)
    for s in (vpc, eks, rds, app):
        s.teardown_status = PENDING
    assert [s.id for s in teardown_ready(w, [vpc, eks, rds, app])] == ["s4"]
    app.teardown_status = DONE
    eks.teardown_status = IN_PROGRESS
    # The VPC waits for both of its dependents; RDS need not wait for EKS.
    assert [s.id for s in teardown_ready(w, [vpc, eks, rds, app])] == ["s3"]
    w.max_parallel_steps = 1
    assert teardown_ready(w, [vpc, eks, rds, app]) == []


def test_a_plans_inputs_digest_is_keyed_so_readers_cannot_test_guesses_of_secrets():
    from services.workflow.domain.model import inputs_hash
    variables = {"name": "db", "password": "hunter2"}
    digest = inputs_hash("v1", variables, b"service-key")
    assert digest == inputs_hash("v1", dict(reversed(list(variables.items()))), b"service-key")
    assert digest != inputs_hash("v1", variables, b"another-key"), "without the key a guess cannot be checked"
    assert digest != inputs_hash("v1", {**variables, "password": "hunter3"}, b"service-key")
    assert digest != inputs_hash("v2", variables, b"service-key")


# --- saved plans and the state they were made against -----------------------------------------

def test_a_saved_plan_fits_only_the_state_it_was_made_against():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("tfplan", b"...")
        z.writestr("tfstate", json.dumps({"version": 4, "serial": 7, "lineage": "L1", "resources": []}))
    assert plan_state_meta(buffer.getvalue()) == (7, "L1")
    assert plan_state_meta(b"not a zip") == (0, "")
    assert state_meta(b"") == (0, "") and state_meta("[1]") == (0, "") and state_meta("{") == (0, "")
    assert stale_plan_reason((7, "L1"), (7, "L1")) == ""
    assert stale_plan_reason((7, "L1"), (8, "L1")) == "the state moved since the plan (serial 7, now 8)"
    assert "another lineage" in stale_plan_reason((7, "L1"), (7, "L2"))
    # Made against no state: any state that appeared since makes it stale (terraform would not notice).
    assert stale_plan_reason((0, ""), (1, "L3")) == "the state moved since the plan (serial 0, now 1)"


def test_a_plan_made_during_the_execution_goes_on_alone_only_when_deferred_and_only_creating():
    creates = [["null_resource.a", "create"], ["null_resource.b", "create"]]
    assert plan_stays_approved({"deferred": True, "changes": creates, "replan_reason": "its inputs are known"})
    assert plan_stays_approved({"deferred": True, "changes": [], "replan_reason": "its inputs are known"})
    assert not plan_stays_approved({"deferred": True, "changes": [*creates, ["null_resource.c", "replace"]]})
    assert not plan_stays_approved({"deferred": True, "changes": [["null_resource.c", "delete"]]})
    assert not plan_stays_approved({"deferred": True, "changes": [["null_resource.c", "update"]]})
    # A stale plan asks again, whatever it does; a step that was planned (not deferred) too.
    assert not plan_stays_approved({"deferred": True, "changes": creates, "replan_reason": "STALE_PLAN: serial"})
    assert not plan_stays_approved({"deferred": False, "changes": creates})


def test_retry_patterns_match_in_linear_time_whatever_the_pattern():
    import time

    from services.common.retry import RetryPolicy, retry_problems
    # `(a+)+$` on "aaa…b" backtracks exponentially in Python's re (30 characters take minutes);
    # matched by RE2 on a 64 KiB message it answers at once.
    policy = RetryPolicy(max_attempts=2, transient_patterns=("(a+)+$", "RATE limit"))
    started = time.monotonic()
    assert policy.transient("a" * 100_000 + "b") == ""
    assert time.monotonic() - started < 2
    assert policy.transient("Error: rate limit exceeded") == "RATE limit"
    assert RetryPolicy().transient("Error: 429 Too Many Requests") != ""
    assert [v.field for v in retry_problems(RetryPolicy(transient_patterns=(r"(a)\1", "(?=x)", "ok")), "p")] == \
        ["p.transient_patterns[0]", "p.transient_patterns[1]"]
