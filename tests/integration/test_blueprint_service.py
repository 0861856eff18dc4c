"""BlueprintService through gRPC: templates, source code versions read from
real git repositories, blueprints with wiring validation and the plan preview.
Runs on SQLite and on PostgreSQL with real NATS."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf import struct_pb2

from infrakitchen.blueprint.v1 import blueprint_pb2 as pb
from infrakitchen.blueprint.v1 import blueprint_pb2_grpc
from infrakitchen.events.v1 import events_pb2
from services.blueprint.__main__ import DEFINITION
from services.common.auth import Role
from tests.support.gitrepos import ModuleRepo, git
from tests.support.grpc_asserts import field_violations, precondition_violations, reason, rpc_error
from tests.support.inprocess import InProcessService

BROKEN_HCL = 'variable "x" {\n  type = string\n'  # unterminated block


@pytest.fixture
def repo(tmp_path):
    r = ModuleRepo(tmp_path / "modules")
    r.add_examples()
    r.write("broken/main.tf", BROKEN_HCL)
    r.write("empty/README.md", "no terraform here")
    r.commit("modules", tag="v1.0.0")
    return r


@pytest.fixture
async def svc(database_url, event_prefix, nats_url, tmp_path):
    async with InProcessService(DEFINITION, database_url, event_prefix, nats_url, tmp_path / "data") as s:
        s.stub = blueprint_pb2_grpc.BlueprintServiceStub(s.channel)
        s.md = s.metadata(Role.WRITE, "alice")
        s.admin = s.metadata(Role.ADMIN, "root")
        yield s


async def make_template(svc, key, parents=(), **kw) -> pb.Template:
    return await svc.stub.CreateTemplate(pb.CreateTemplateRequest(template=pb.Template(
        key=key, name=key.upper(), enabled=kw.pop("enabled", True), parent_template_ids=list(parents), **kw)),
        metadata=svc.md)


async def make_version(svc, template_id, repo, path, ref="v1.0.0", **kw) -> pb.SourceCodeVersion:
    return await svc.stub.CreateSourceCodeVersion(pb.CreateSourceCodeVersionRequest(
        template_id=template_id, source=pb.ModuleSource(repository_url=repo.url, ref=ref, path=path), **kw),
        metadata=svc.md)


def struct(**values) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


# --- templates -----------------------------------------------------------------

async def test_template_crud_with_etag_and_idempotent_create(svc):
    req = pb.CreateTemplateRequest(request_id="req-1", template=pb.Template(
        key="vpc", name="VPC", description="network", labels=["net"], enabled=True))
    first = await svc.stub.CreateTemplate(req, metadata=svc.md)
    again = await svc.stub.CreateTemplate(req, metadata=svc.md)
    assert again.id == first.id and first.creator == "alice" and first.etag
    assert (await svc.stub.GetTemplate(pb.GetTemplateRequest(id=first.id), metadata=svc.md)).key == "vpc"

    err = await rpc_error(svc.stub.CreateTemplate(pb.CreateTemplateRequest(template=pb.Template(
        key="vpc", name="Other")), metadata=svc.md))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS

    disabled = await svc.stub.UpdateTemplate(pb.UpdateTemplateRequest(
        template=pb.Template(id=first.id, enabled=False, etag=first.etag), update_mask=["enabled"]), metadata=svc.md)
    assert disabled.enabled is False and disabled.name == "VPC" and disabled.etag != first.etag
    # One etag format in every service: a quoted number; the former "v<n>" still counts.
    assert disabled.etag == '"2"' and first.etag == '"1"'
    legacy = await svc.stub.UpdateTemplate(pb.UpdateTemplateRequest(
        template=pb.Template(id=first.id, description="still network", etag="v2"), update_mask=["description"]),
        metadata=svc.md)
    assert legacy.etag == '"3"'

    stale = await rpc_error(svc.stub.UpdateTemplate(pb.UpdateTemplateRequest(
        template=pb.Template(id=first.id, name="New", etag=first.etag)), metadata=svc.md))
    assert stale.code() == grpc.StatusCode.ABORTED
    immutable = await rpc_error(svc.stub.UpdateTemplate(pb.UpdateTemplateRequest(
        template=pb.Template(id=first.id, key="other")), metadata=svc.md))
    assert immutable.code() == grpc.StatusCode.INVALID_ARGUMENT and "template.key" in field_violations(immutable)

    missing = await rpc_error(svc.stub.GetTemplate(pb.GetTemplateRequest(id="nope"), metadata=svc.md))
    assert missing.code() == grpc.StatusCode.NOT_FOUND

    denied = await rpc_error(svc.stub.DeleteTemplate(pb.DeleteTemplateRequest(id=first.id), metadata=svc.md))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED  # delete needs admin
    await svc.stub.DeleteTemplate(pb.DeleteTemplateRequest(id=first.id), metadata=svc.admin)
    gone = await rpc_error(svc.stub.GetTemplate(pb.GetTemplateRequest(id=first.id), metadata=svc.md))
    assert gone.code() == grpc.StatusCode.NOT_FOUND


async def test_template_validation_reports_every_field(svc):
    err = await rpc_error(svc.stub.CreateTemplate(pb.CreateTemplateRequest(template=pb.Template(
        key="Bad Key!", name="")), metadata=svc.md))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err)) == {"template.key", "template.name"}
    err = await rpc_error(svc.stub.CreateTemplate(pb.CreateTemplateRequest(template=pb.Template(
        key="eks", name="EKS", parent_template_ids=["no-such-template"])), metadata=svc.md))
    assert "template.parent_template_ids[0]" in field_violations(err)
    listed = await svc.stub.ListTemplates(pb.ListTemplatesRequest(), metadata=svc.md)
    assert list(listed.templates) == [], "a refused create stores nothing"


async def test_template_hierarchy_cannot_become_cyclic(svc):
    vpc = await make_template(svc, "vpc")
    eks = await make_template(svc, "eks", parents=[vpc.id])
    err = await rpc_error(svc.stub.UpdateTemplate(pb.UpdateTemplateRequest(
        template=pb.Template(id=vpc.id, parent_template_ids=[eks.id])), metadata=svc.md))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cyclic" in field_violations(err)["template.parent_template_ids"]


async def test_list_templates_pages_and_filters(svc):
    for i in range(5):
        await make_template(svc, f"t{i}", labels=["even"] if i % 2 == 0 else [], enabled=i != 4)
    page1 = await svc.stub.ListTemplates(pb.ListTemplatesRequest(page_size=2), metadata=svc.md)
    page2 = await svc.stub.ListTemplates(pb.ListTemplatesRequest(page_size=2, page_token=page1.next_page_token),
                                         metadata=svc.md)
    page3 = await svc.stub.ListTemplates(pb.ListTemplatesRequest(page_size=2, page_token=page2.next_page_token),
                                         metadata=svc.md)
    keys = [t.key for p in (page1, page2, page3) for t in p.templates]
    assert keys == ["t0", "t1", "t2", "t3", "t4"] and page3.next_page_token == ""
    even = await svc.stub.ListTemplates(pb.ListTemplatesRequest(label="even"), metadata=svc.md)
    assert [t.key for t in even.templates] == ["t0", "t2", "t4"]
    enabled = await svc.stub.ListTemplates(pb.ListTemplatesRequest(enabled=pb.ENABLED_FILTER_DISABLED),
                                           metadata=svc.md)
    assert [t.key for t in enabled.templates] == ["t4"]
    bad = await rpc_error(svc.stub.ListTemplates(pb.ListTemplatesRequest(page_token="garbage"), metadata=svc.md))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in field_violations(bad)
    # Label filters page too (a page of one label, then the next).
    first = await svc.stub.ListTemplates(pb.ListTemplatesRequest(label="even", page_size=2), metadata=svc.md)
    rest = await svc.stub.ListTemplates(pb.ListTemplatesRequest(label="even", page_size=2,
                                                                page_token=first.next_page_token), metadata=svc.md)
    assert [t.key for t in first.templates] + [t.key for t in rest.templates] == ["t0", "t2", "t4"]


async def test_batch_get_returns_every_template_in_order_or_names_the_missing_one(svc):
    made = [await make_template(svc, f"b{i}") for i in range(3)]
    ids = [made[2].id, made[0].id, made[1].id]
    got = await svc.stub.BatchGetTemplates(pb.BatchGetTemplatesRequest(ids=ids), metadata=svc.md)
    assert [t.id for t in got.templates] == ids
    missing = await rpc_error(svc.stub.BatchGetTemplates(pb.BatchGetTemplatesRequest(ids=[made[0].id, "nope"]),
                                                         metadata=svc.md))
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "nope" in missing.details()
    too_many = await rpc_error(svc.stub.BatchGetTemplates(pb.BatchGetTemplatesRequest(ids=["x"] * 1001),
                                                          metadata=svc.md))
    assert too_many.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- source code versions ----------------------------------------------------------

async def test_source_code_version_reads_variables_and_outputs(svc, repo):
    rds = await make_template(svc, "rds")
    v = await make_version(svc, rds.id, repo, "rds")
    assert v.commit == git(repo.path, "rev-parse", "v1.0.0^{commit}")
    assert v.is_default, "the first version of a template is its default"
    variables = {x.name: x for x in v.variables}
    assert set(variables) == {"identifier", "vpc_id", "engine", "instance_class", "master_password"}
    assert variables["identifier"].required and not variables["identifier"].has_default
    assert variables["identifier"].type == "string" and variables["identifier"].description
    assert variables["engine"].has_default and variables["engine"].default.string_value == "postgres"
    assert not variables["engine"].required
    assert variables["master_password"].sensitive
    assert variables["master_password"].default.string_value == "***", "sensitive defaults are masked"
    outputs = {o.name: o for o in v.outputs}
    assert set(outputs) == {"db_id", "endpoint", "connection_string"}
    assert outputs["connection_string"].sensitive and not outputs["db_id"].sensitive


async def test_source_code_version_pins_branch_tag_and_commit(svc, repo):
    vpc = await make_template(svc, "vpc")
    tagged = await make_version(svc, vpc.id, repo, "vpc")
    repo.write("vpc/extra.tf", 'variable "added_later" {\n  default = 1\n}\n')
    head = repo.commit("add a variable")
    on_branch = await make_version(svc, vpc.id, repo, "vpc", ref="main")
    by_commit = await make_version(svc, vpc.id, repo, "vpc", ref=head[:12])
    assert on_branch.commit == by_commit.commit == head != tagged.commit
    assert "added_later" in {x.name for x in on_branch.variables}
    assert "added_later" not in {x.name for x in tagged.variables}


@pytest.mark.parametrize("source, field, words", [
    ({"repository_url": "file:///no/such/repo", "path": "vpc"}, "source.repository_url", "cannot read repository"),
    ({"ref": "v9.9.9", "path": "vpc"}, "source.ref", "unknown ref"),
    ({"path": "nowhere"}, "source.path", "does not exist"),
    ({"path": "empty"}, "source.path", "no .tf files"),
    ({"path": "broken"}, "source.path", "main.tf: invalid HCL"),
    ({"path": "../outside"}, "source.path", "inside the repository"),
])
async def test_unreadable_source_is_invalid_argument_and_stores_nothing(svc, repo, source, field, words):
    vpc = await make_template(svc, "vpc")
    src = pb.ModuleSource(repository_url=source.get("repository_url", repo.url), ref=source.get("ref", "v1.0.0"),
                          path=source["path"])
    err = await rpc_error(svc.stub.CreateSourceCodeVersion(pb.CreateSourceCodeVersionRequest(
        template_id=vpc.id, source=src), metadata=svc.md))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in field_violations(err)[field]
    listed = await svc.stub.ListSourceCodeVersions(pb.ListSourceCodeVersionsRequest(template_id=vpc.id),
                                                   metadata=svc.md)
    assert list(listed.source_code_versions) == []


async def test_files_outside_the_checkout_are_never_read_nor_echoed(svc, tmp_path):
    """A module file (or folder) that is a symlink to a file of the machine
    (the deployment's auth secret) is refused naming the path; an HCL error
    names file and line, never the text."""
    canary = "7cd7-canary-secret-value"
    (tmp_path / "auth-secret").write_text(f"{canary}\n")
    repo = ModuleRepo(tmp_path / "leaky")
    (repo.path / "leak").mkdir()
    (repo.path / "leak" / "main.tf").symlink_to(tmp_path / "auth-secret")
    (repo.path / "outside").symlink_to(tmp_path)
    repo.write("noisy/main.tf", f'variable "x" {{\n  default = 1\n}}\n{canary} = = =\n')
    repo.commit("leaks", tag="v1")
    vpc = await make_template(svc, "vpc")
    for path, words in (("leak", "main.tf in 'leak' is a symbolic link that leads outside the repository"),
                        ("outside", "leads outside the repository"), ("noisy", "main.tf: invalid HCL at line 4")):
        err = await rpc_error(svc.stub.CreateSourceCodeVersion(pb.CreateSourceCodeVersionRequest(
            template_id=vpc.id, source=pb.ModuleSource(repository_url=repo.url, ref="v1", path=path)),
            metadata=svc.md))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in field_violations(err)["source.path"]
        assert canary not in err.details() and canary not in str(field_violations(err))


async def test_repository_credentials_never_appear_in_errors(svc):
    vpc = await make_template(svc, "vpc")
    err = await rpc_error(svc.stub.CreateSourceCodeVersion(pb.CreateSourceCodeVersionRequest(
        template_id=vpc.id, source=pb.ModuleSource(repository_url="https://bob:hunter2@127.0.0.1:1/x.git",
                                                   ref="main")), metadata=svc.md))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hunter2" not in err.details() and "hunter2" not in str(field_violations(err))


async def test_variable_configuration_and_default_version(svc, repo):
    vpc = await make_template(svc, "vpc")
    first = await make_version(svc, vpc.id, repo, "vpc", variable_configs=[
        pb.VariableConfig(name="name", frozen=True, unique=True),
        pb.VariableConfig(name="cidr_block", default=struct_pb2.Value(string_value="10.1.0.0/16"))])
    variables = {x.name: x for x in first.variables}
    assert variables["name"].frozen and variables["name"].unique and variables["name"].required
    assert variables["cidr_block"].default.string_value == "10.1.0.0/16"

    second = await make_version(svc, vpc.id, repo, "vpc", is_default=True)
    assert second.is_default
    assert not (await svc.stub.GetSourceCodeVersion(pb.GetSourceCodeVersionRequest(id=first.id),
                                                    metadata=svc.md)).is_default

    updated = await svc.stub.UpdateSourceCodeVersion(pb.UpdateSourceCodeVersionRequest(
        id=second.id, etag=second.etag, variable_configs=[pb.VariableConfig(name="name", sensitive=True)]),
        metadata=svc.md)
    assert {x.name: x for x in updated.variables}["name"].sensitive
    err = await rpc_error(svc.stub.UpdateSourceCodeVersion(pb.UpdateSourceCodeVersionRequest(
        id=second.id, variable_configs=[pb.VariableConfig(name="nope", frozen=True)]), metadata=svc.md))
    assert "variable_configs[0].name" in field_violations(err)
    stale = await rpc_error(svc.stub.UpdateSourceCodeVersion(pb.UpdateSourceCodeVersionRequest(
        id=second.id, etag=second.etag, description="x"), metadata=svc.md))
    assert stale.code() == grpc.StatusCode.ABORTED


# --- blueprints ------------------------------------------------------------------

async def test_production_environment_preview(svc, repo):
    ids = await _register_async(svc, repo)
    preview = await svc.stub.PreviewBlueprint(pb.PreviewBlueprintRequest(id=ids["blueprint"]), metadata=svc.md)
    steps = {s.template_id: s for s in preview.steps}
    assert steps[ids["vpc"]].position == 0
    assert steps[ids["eks"]].position == 1 and steps[ids["rds"]].position == 1
    assert list(steps[ids["eks"]].depends_on_template_ids) == [ids["vpc"]]
    assert [s.template_id for s in preview.steps][0] == ids["vpc"]
    eks_vars = {v.name: v for v in steps[ids["eks"]].variables}
    assert eks_vars["vpc_id"].origin == pb.VARIABLE_ORIGIN_WIRED
    assert (eks_vars["subnet_ids"].source_template_id, eks_vars["subnet_ids"].source_output) == \
        (ids["vpc"], "private_subnet_ids")
    assert eks_vars["cluster_name"].origin == pb.VARIABLE_ORIGIN_DEFAULT
    assert eks_vars["cluster_name"].value.string_value == "production-eks"
    assert eks_vars["node_count"].origin == pb.VARIABLE_ORIGIN_MODULE_DEFAULT
    rds_vars = {v.name: v for v in steps[ids["rds"]].variables}
    assert rds_vars["master_password"].value.string_value == "***"
    assert len(preview.critical_path_template_ids) == 2 and preview.critical_path_template_ids[0] == ids["vpc"]
    assert list(preview.warnings) == []


async def _register_async(svc, repo) -> dict[str, str]:
    """The example blueprint, created through the async stub (same requests as examples.register)."""
    ids = {}
    vpc = await make_template(svc, "vpc")
    eks = await make_template(svc, "eks", parents=[vpc.id])
    rds = await make_template(svc, "rds", parents=[vpc.id])
    ids.update(vpc=vpc.id, eks=eks.id, rds=rds.id)
    for key in ("vpc", "eks", "rds"):
        ids[f"{key}_version"] = (await make_version(svc, ids[key], repo, key)).id
    b = await svc.stub.CreateBlueprint(pb.CreateBlueprintRequest(blueprint=pb.Blueprint(
        name="Production Environment",
        templates=[pb.BlueprintTemplate(template_id=vpc.id, default_variables=struct(name="production")),
                   pb.BlueprintTemplate(template_id=eks.id, default_variables=struct(cluster_name="production-eks")),
                   pb.BlueprintTemplate(template_id=rds.id, default_variables=struct(identifier="production-db"))],
        wiring_rules=[
            pb.WiringRule(source_template_id=vpc.id, source_output="vpc_id", target_template_id=eks.id,
                          target_variable="vpc_id"),
            pb.WiringRule(source_template_id=vpc.id, source_output="private_subnet_ids", target_template_id=eks.id,
                          target_variable="subnet_ids"),
            pb.WiringRule(source_template_id=vpc.id, source_output="vpc_id", target_template_id=rds.id,
                          target_variable="vpc_id")])), metadata=svc.md)
    ids["blueprint"] = b.id
    ids["etag"] = b.etag
    return ids


async def test_every_blueprint_problem_is_reported_at_once(svc, repo):
    ids = await _register_async(svc, repo)
    vpc, eks, rds = ids["vpc"], ids["eks"], ids["rds"]
    bad = pb.Blueprint(
        name="Broken",
        templates=[pb.BlueprintTemplate(template_id=vpc), pb.BlueprintTemplate(template_id=eks),
                   pb.BlueprintTemplate(template_id=rds, default_variables=struct(no_such_var="x")),
                   pb.BlueprintTemplate(template_id="ghost")],
        wiring_rules=[
            pb.WiringRule(source_template_id=vpc, source_output="no_such_output", target_template_id=eks,
                          target_variable="vpc_id"),
            pb.WiringRule(source_template_id=vpc, source_output="vpc_id", target_template_id=eks,
                          target_variable="no_such_variable"),
            pb.WiringRule(source_template_id=vpc, source_output="vpc_id", target_template_id=eks,
                          target_variable="vpc_id"),  # vpc_id of EKS wired twice
            pb.WiringRule(source_template_id=vpc, source_output="private_subnet_ids", target_template_id=rds,
                          target_variable="vpc_id"),  # list into string
            pb.WiringRule(source_template_id=eks, source_output="cluster_id", target_template_id=vpc,
                          target_variable="name"),  # EKS -> VPC closes a cycle
        ])
    err = await rpc_error(svc.stub.CreateBlueprint(pb.CreateBlueprintRequest(blueprint=bad), metadata=svc.md))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    v = field_violations(err)
    assert "unknown template 'ghost'" in v["blueprint.templates[3].template_id"]
    assert "no_such_var" in v["blueprint.templates[2].default_variables.no_such_var"]
    assert "no output 'no_such_output'" in v["blueprint.wiring_rules[0].source_output"]
    assert "no variable 'no_such_variable'" in v["blueprint.wiring_rules[1].target_variable"]
    assert "already wired by wiring_rules[0]" in v["blueprint.wiring_rules[2].target_variable"]
    assert "is a list but variable 'vpc_id' is string" in v["blueprint.wiring_rules[3].target_variable"]
    assert "dependency cycle" in v["blueprint.wiring_rules"] and "VPC" in v["blueprint.wiring_rules"] \
        and "EKS" in v["blueprint.wiring_rules"]
    listed = await svc.stub.ListBlueprints(pb.ListBlueprintsRequest(), metadata=svc.md)
    assert [b.name for b in listed.blueprints] == ["Production Environment"], "nothing stored"


async def test_disabled_template_cannot_join_a_blueprint(svc, repo):
    vpc = await make_template(svc, "vpc", enabled=False)
    await make_version(svc, vpc.id, repo, "vpc")
    err = await rpc_error(svc.stub.CreateBlueprint(pb.CreateBlueprintRequest(blueprint=pb.Blueprint(
        name="x", templates=[pb.BlueprintTemplate(template_id=vpc.id)])), metadata=svc.md))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and reason(err) == "TEMPLATE_DISABLED"
    assert precondition_violations(err)[0][1] == f"templates/{vpc.id}" and "VPC" in err.details()


async def test_unresolved_required_variable_is_a_preview_warning_not_an_error(svc, repo):
    vpc = await make_template(svc, "vpc")
    await make_version(svc, vpc.id, repo, "vpc")
    b = await svc.stub.CreateBlueprint(pb.CreateBlueprintRequest(blueprint=pb.Blueprint(
        name="bare", templates=[pb.BlueprintTemplate(template_id=vpc.id)])), metadata=svc.md)
    preview = await svc.stub.PreviewBlueprint(pb.PreviewBlueprintRequest(id=b.id), metadata=svc.md)
    assert [(w.template_id, w.variable) for w in preview.warnings] == [(vpc.id, "name")]
    b2 = await svc.stub.CreateBlueprint(pb.CreateBlueprintRequest(blueprint=pb.Blueprint(
        name="with input", templates=[pb.BlueprintTemplate(template_id=vpc.id, runtime_inputs=["name"])])),
        metadata=svc.md)
    preview2 = await svc.stub.PreviewBlueprint(pb.PreviewBlueprintRequest(id=b2.id), metadata=svc.md)
    assert list(preview2.warnings) == []
    assert {v.name: v.origin for v in preview2.steps[0].variables}["name"] == pb.VARIABLE_ORIGIN_RUNTIME_INPUT


async def test_blueprint_revisions_etag_and_delete_guards(svc, repo):
    ids = await _register_async(svc, repo)
    bp = await svc.stub.GetBlueprint(pb.GetBlueprintRequest(id=ids["blueprint"]), metadata=svc.md)
    assert bp.revision == 1
    updated = await svc.stub.UpdateBlueprint(pb.UpdateBlueprintRequest(
        blueprint=pb.Blueprint(id=bp.id, description="now with a description", etag=bp.etag)), metadata=svc.md)
    assert updated.revision == 2 and updated.description == "now with a description"
    assert len(updated.templates) == 3, "fields outside the update are kept"
    old = await svc.stub.GetBlueprint(pb.GetBlueprintRequest(id=bp.id, revision=1), metadata=svc.md)
    assert old.revision == 1 and old.description == ""
    stale = await rpc_error(svc.stub.UpdateBlueprint(pb.UpdateBlueprintRequest(
        blueprint=pb.Blueprint(id=bp.id, description="lost update", etag=bp.etag)), metadata=svc.md))
    assert stale.code() == grpc.StatusCode.ABORTED

    in_use = await rpc_error(svc.stub.DeleteTemplate(pb.DeleteTemplateRequest(id=ids["eks"]), metadata=svc.admin))
    assert in_use.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("BLUEPRINT_USES_TEMPLATE", f"blueprints/{bp.id}") in [v[:2] for v in precondition_violations(in_use)]
    assert "Production Environment" in in_use.details()
    version_in_use = await rpc_error(svc.stub.DeleteSourceCodeVersion(pb.DeleteSourceCodeVersionRequest(
        id=ids["eks_version"]), metadata=svc.admin))
    assert version_in_use.code() == grpc.StatusCode.FAILED_PRECONDITION

    await svc.stub.DeleteBlueprint(pb.DeleteBlueprintRequest(id=bp.id), metadata=svc.admin)
    await svc.stub.DeleteTemplate(pb.DeleteTemplateRequest(id=ids["eks"]), metadata=svc.admin)
    parent = await rpc_error(svc.stub.DeleteTemplate(pb.DeleteTemplateRequest(id=ids["vpc"]), metadata=svc.admin))
    assert parent.code() == grpc.StatusCode.FAILED_PRECONDITION and "RDS" in parent.details()


async def test_catalog_changes_are_published_as_events(svc, repo, nats_url):
    bus = svc.runtime.bus
    sub = await bus.js.pull_subscribe(bus.names.subject("ik.blueprint.>"), durable="test-reader",
                                      stream=bus.names.context_stream("blueprint"))
    ids = await _register_async(svc, repo)
    msgs = []
    while len(msgs) < 7:
        msgs += await sub.fetch(7 - len(msgs), timeout=10)
    envelopes = [events_pb2.Envelope.FromString(m.data) for m in msgs]
    assert [e.type for e in envelopes] == ["ik.blueprint.template.created"] * 3 + \
        ["ik.blueprint.source_code_version.created"] * 3 + ["ik.blueprint.blueprint.created"]
    assert envelopes[-1].blueprint_created.blueprint_id == ids["blueprint"]
    assert envelopes[-1].correlation.blueprint_id == ids["blueprint"] and envelopes[0].actor == "alice"
