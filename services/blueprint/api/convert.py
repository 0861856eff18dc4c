"""proto <-> domain for the blueprint service."""
from __future__ import annotations

from infrakitchen.common.v1 import retry_pb2
from services.common.retry import RetryPolicy

from infrakitchen.blueprint.v1 import blueprint_pb2 as pb
from services.blueprint.domain import planning
from services.blueprint.domain.model import (Blueprint, BlueprintTemplate, ModuleSource, SourceCodeVersion,
                                             Template, VariableConfig, WiringRule)
from services.common.values import from_struct, from_value, to_struct, to_timestamp, to_value


def populated(message, allowed: tuple[str, ...]) -> list[str]:
    """AIP-134: without an update_mask, update the fields the request populates."""
    return [field.name for field, _ in message.ListFields() if field.name in allowed]


def template_from_pb(m: pb.Template) -> Template:
    policy = RetryPolicy(m.retry_policy.max_attempts, m.retry_policy.initial_backoff.ToNanoseconds() / 1e9,
                         tuple(m.retry_policy.transient_patterns))
    return Template(id=m.id, key=m.key, name=m.name, description=m.description, labels=list(m.labels),
                    enabled=m.enabled, abstract=m.abstract, parent_template_ids=list(m.parent_template_ids),
                    retry_policy=policy.to_json())


def retry_policy_pb(d: dict) -> retry_pb2.RetryPolicy:
    policy = RetryPolicy.from_json(d)
    out = retry_pb2.RetryPolicy(max_attempts=policy.max_attempts, transient_patterns=list(policy.transient_patterns))
    out.initial_backoff.FromNanoseconds(int(policy.initial_backoff * 1e9))
    return out


def template_to_pb(t: Template) -> pb.Template:
    return pb.Template(id=t.id, key=t.key, name=t.name, description=t.description, labels=t.labels,
                       enabled=t.enabled, abstract=t.abstract, parent_template_ids=t.parent_template_ids,
                       creator=t.creator, create_time=to_timestamp(t.create_time),
                       update_time=to_timestamp(t.update_time), etag=t.etag,
                       retry_policy=retry_policy_pb(t.retry_policy))


def source_from_pb(m: pb.ModuleSource) -> ModuleSource:
    return ModuleSource(repository_url=m.repository_url.strip(), ref=m.ref.strip(), path=m.path.strip())


def config_from_pb(m: pb.VariableConfig) -> VariableConfig:
    def opt(name):
        return getattr(m, name) if m.HasField(name) else None
    return VariableConfig(name=m.name, frozen=opt("frozen"), unique=opt("unique"), sensitive=opt("sensitive"),
                          required=opt("required"), has_default=m.HasField("default"),
                          default=from_value(m.default) if m.HasField("default") else None)


def version_to_pb(v: SourceCodeVersion) -> pb.SourceCodeVersion:
    configured = {c.name for c in v.variable_configs if c.has_default}
    return pb.SourceCodeVersion(
        id=v.id, template_id=v.template_id,
        source=pb.ModuleSource(repository_url=v.source.repository_url, ref=v.source.ref, path=v.source.path),
        commit=v.commit, description=v.description, is_default=v.is_default, creator=v.creator,
        create_time=to_timestamp(v.create_time), update_time=to_timestamp(v.update_time), etag=v.etag,
        variables=[pb.Variable(
            name=x.name, type=x.type, description=x.description, has_default=x.has_default,
            default=to_value(planning.MASK if x.sensitive else x.default) if x.has_default else None,
            sensitive=x.sensitive, required=x.required, frozen=x.frozen, unique=x.unique,
            platform_default=x.name in configured)
            for x in v.variables],
        outputs=[pb.Output(name=o.name, description=o.description, sensitive=o.sensitive) for o in v.outputs])


def blueprint_from_pb(m: pb.Blueprint) -> Blueprint:
    return Blueprint(
        id=m.id, name=m.name.strip(), description=m.description, labels=list(m.labels),
        templates=[BlueprintTemplate(template_id=t.template_id, source_code_version_id=t.source_code_version_id,
                                     default_variables=from_struct(t.default_variables), external=t.external,
                                     runtime_inputs=list(t.runtime_inputs)) for t in m.templates],
        wiring_rules=[WiringRule(r.source_template_id, r.source_output, r.target_template_id, r.target_variable)
                      for r in m.wiring_rules])


def blueprint_to_pb(b: Blueprint) -> pb.Blueprint:
    return pb.Blueprint(
        id=b.id, name=b.name, description=b.description, labels=b.labels, revision=b.revision,
        creator=b.creator, create_time=to_timestamp(b.create_time), update_time=to_timestamp(b.update_time),
        etag=b.etag,
        templates=[pb.BlueprintTemplate(template_id=t.template_id, source_code_version_id=t.source_code_version_id,
                                        default_variables=to_struct(t.default_variables), external=t.external,
                                        runtime_inputs=t.runtime_inputs) for t in b.templates],
        wiring_rules=[pb.WiringRule(source_template_id=r.source_template_id, source_output=r.source_output,
                                    target_template_id=r.target_template_id, target_variable=r.target_variable)
                      for r in b.wiring_rules])


def plan_to_pb(b: Blueprint, plan: planning.Plan) -> pb.PreviewBlueprintResponse:
    return pb.PreviewBlueprintResponse(
        blueprint_id=b.id, revision=b.revision, critical_path_template_ids=plan.critical_path,
        warnings=[pb.PreviewWarning(template_id=w.template_id, variable=w.variable, message=w.message)
                  for w in plan.warnings],
        steps=[pb.PlannedStep(
            template_id=s.template_id, template_name=s.template_name, position=s.position,
            depends_on_template_ids=s.depends_on, external=s.external,
            variables=[pb.PlannedVariable(
                name=v.name, origin=pb.VariableOrigin.Value(f"VARIABLE_ORIGIN_{v.origin.name}"),
                source_template_id=v.source_template_id, source_output=v.source_output, required=v.required,
                value=to_value(v.value) if v.origin in (planning.Origin.DEFAULT, planning.Origin.MODULE_DEFAULT)
                else None)
                for v in s.variables]) for s in plan.steps])
