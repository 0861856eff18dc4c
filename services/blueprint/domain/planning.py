"""Validation of a blueprint and the execution plan of its workflow: steps by
BFS level, each step's dependencies and the origin of each variable, and the
critical path. The workflow service executes exactly this plan."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from services.blueprint.domain.model import Blueprint, SourceCodeVersion, Template
from services.blueprint.domain.types import compatible, kind_of_type
from services.common.errors import FailedPrecondition, FieldViolation, InvalidArgument, PreconditionViolation

MASK = "***"


class Origin(enum.Enum):
    DEFAULT = 1
    WIRED = 2
    RUNTIME_INPUT = 3
    MODULE_DEFAULT = 4
    UNRESOLVED = 5


@dataclass
class PlannedVariable:
    name: str
    origin: Origin
    required: bool
    sensitive: bool = False
    value: Any = None
    source_template_id: str = ""
    source_output: str = ""


@dataclass
class PlannedStep:
    template_id: str
    template_name: str
    position: int
    depends_on: list[str]
    variables: list[PlannedVariable]
    external: bool = False


@dataclass
class Warning:
    template_id: str
    variable: str
    message: str


@dataclass
class Plan:
    steps: list[PlannedStep]
    critical_path: list[str]
    warnings: list[Warning] = field(default_factory=list)


def dependency_graph(blueprint: Blueprint, templates: dict[str, Template]) -> nx.DiGraph:
    """Edges upstream -> downstream: every wiring rule, and every template
    hierarchy link (parent template -> child template) within the blueprint."""
    graph = nx.DiGraph()
    members = blueprint.template_ids()
    graph.add_nodes_from(members)
    for rule in blueprint.wiring_rules:
        if rule.source_template_id in graph and rule.target_template_id in graph:
            graph.add_edge(rule.source_template_id, rule.target_template_id)
    for tid in members:
        template = templates.get(tid)
        for parent in (template.parent_template_ids if template else []):
            if parent in graph:
                graph.add_edge(parent, tid)
    return graph


def _label(tid: str, templates: dict[str, Template]) -> str:
    t = templates.get(tid)
    return f"{t.name} ({tid})" if t else tid


def validate(blueprint: Blueprint, templates: dict[str, Template], versions: dict[str, SourceCodeVersion]) -> None:
    """Raises InvalidArgument with every problem at once, then
    FailedPrecondition for disabled templates. `versions` maps each template
    of the blueprint to the source code version it will use."""
    v: list[FieldViolation] = []
    if not blueprint.name.strip():
        v.append(FieldViolation("blueprint.name", "must not be empty"))
    if not blueprint.templates:
        v.append(FieldViolation("blueprint.templates", "a blueprint needs at least one template"))
    seen: set[str] = set()
    for i, entry in enumerate(blueprint.templates):
        path = f"blueprint.templates[{i}]"
        tid = entry.template_id
        if tid in seen:
            v.append(FieldViolation(f"{path}.template_id", f"template {tid} is listed twice"))
        seen.add(tid)
        if tid not in templates:
            v.append(FieldViolation(f"{path}.template_id", f"unknown template {tid!r}"))
            continue
        version = versions.get(tid)
        if version is None:
            v.append(FieldViolation(f"{path}.source_code_version_id",
                                    f"no source code version {entry.source_code_version_id!r} for template "
                                    f"{_label(tid, templates)}" if entry.source_code_version_id else
                                    f"template {_label(tid, templates)} has no default source code version"))
            continue
        for name in entry.default_variables:
            if version.variable(name) is None:
                v.append(FieldViolation(f"{path}.default_variables.{name}",
                                        f"template {_label(tid, templates)} has no variable {name!r}"))
        for name in entry.runtime_inputs:
            if version.variable(name) is None:
                v.append(FieldViolation(f"{path}.runtime_inputs",
                                        f"template {_label(tid, templates)} has no variable {name!r}"))

    wired: dict[tuple[str, str], int] = {}
    for i, rule in enumerate(blueprint.wiring_rules):
        path = f"blueprint.wiring_rules[{i}]"
        src_ok = tgt_ok = True
        for side, tid in (("source_template_id", rule.source_template_id),
                          ("target_template_id", rule.target_template_id)):
            if tid not in seen:
                v.append(FieldViolation(f"{path}.{side}", f"template {tid!r} is not part of the blueprint"))
                if side == "source_template_id":
                    src_ok = False
                else:
                    tgt_ok = False
        output = variable = None
        if src_ok and (sv := versions.get(rule.source_template_id)) is not None:
            output = sv.output(rule.source_output)
            if output is None:
                v.append(FieldViolation(f"{path}.source_output",
                                        f"template {_label(rule.source_template_id, templates)} has no output "
                                        f"{rule.source_output!r}"))
        if tgt_ok and (tv := versions.get(rule.target_template_id)) is not None:
            variable = tv.variable(rule.target_variable)
            if variable is None:
                v.append(FieldViolation(f"{path}.target_variable",
                                        f"template {_label(rule.target_template_id, templates)} has no variable "
                                        f"{rule.target_variable!r}"))
        key = (rule.target_template_id, rule.target_variable)
        if key in wired:
            v.append(FieldViolation(f"{path}.target_variable",
                                    f"variable {rule.target_variable!r} of {_label(key[0], templates)} is already "
                                    f"wired by wiring_rules[{wired[key]}]"))
        else:
            wired[key] = i
        if output is not None and variable is not None and \
                not compatible(output.kind, kind_of_type(variable.type)):
            v.append(FieldViolation(f"{path}.target_variable",
                                    f"output {rule.source_output!r} is a {output.kind} but variable "
                                    f"{rule.target_variable!r} is {variable.type}"))
        if rule.source_template_id == rule.target_template_id and src_ok:
            v.append(FieldViolation(path, f"template {_label(rule.source_template_id, templates)} is wired to itself"))

    graph = dependency_graph(blueprint, templates)
    graph.remove_edges_from(list(nx.selfloop_edges(graph)))
    for cycle in itertools.islice(nx.simple_cycles(graph), 10):
        names = " -> ".join(_label(t, templates) for t in [*cycle, cycle[0]])
        v.append(FieldViolation("blueprint.wiring_rules", f"dependency cycle: {names}"))
    if v:
        raise InvalidArgument(f"blueprint is invalid: {len(v)} problem(s): " + "; ".join(x.description for x in v[:3]),
                              v)

    disabled = [tid for tid in blueprint.template_ids() if not templates[tid].enabled]
    if disabled:
        raise FailedPrecondition(
            "disabled templates cannot be used in blueprints: " + ", ".join(_label(t, templates) for t in disabled),
            [PreconditionViolation("TEMPLATE_DISABLED", f"templates/{t}", f"template {_label(t, templates)} is disabled")
             for t in disabled],
            reason="TEMPLATE_DISABLED")


def plan(blueprint: Blueprint, templates: dict[str, Template], versions: dict[str, SourceCodeVersion]) -> Plan:
    """The execution plan of a valid blueprint."""
    graph = dependency_graph(blueprint, templates)
    position = {tid: level for level, generation in enumerate(nx.topological_generations(graph)) for tid in generation}
    wiring = {(r.target_template_id, r.target_variable): r for r in blueprint.wiring_rules}
    order = {tid: i for i, tid in enumerate(blueprint.template_ids())}
    steps: list[PlannedStep] = []
    warnings: list[Warning] = []
    for entry in sorted(blueprint.templates, key=lambda e: (position[e.template_id], order[e.template_id])):
        tid = entry.template_id
        version = versions[tid]
        planned = []
        for var in version.variables:
            rule = wiring.get((tid, var.name))
            if rule is not None:
                pv = PlannedVariable(var.name, Origin.WIRED, var.required, var.sensitive,
                                     source_template_id=rule.source_template_id, source_output=rule.source_output)
            elif var.name in entry.default_variables:
                pv = PlannedVariable(var.name, Origin.DEFAULT, var.required, var.sensitive,
                                     value=MASK if var.sensitive else entry.default_variables[var.name])
            elif var.name in entry.runtime_inputs:
                pv = PlannedVariable(var.name, Origin.RUNTIME_INPUT, var.required, var.sensitive)
            elif var.has_default:
                pv = PlannedVariable(var.name, Origin.MODULE_DEFAULT, var.required, var.sensitive,
                                     value=MASK if var.sensitive else var.default)
            else:
                pv = PlannedVariable(var.name, Origin.UNRESOLVED, var.required, var.sensitive)
                if var.required and not entry.external:
                    warnings.append(Warning(tid, var.name,
                                            f"required variable {var.name!r} of {_label(tid, templates)} has no "
                                            "default, no wiring and is not a runtime input"))
            planned.append(pv)
        steps.append(PlannedStep(
            template_id=tid, template_name=templates[tid].name, position=position[tid],
            depends_on=sorted(graph.predecessors(tid), key=order.get), variables=planned, external=entry.external))
    return Plan(steps=steps, critical_path=nx.dag_longest_path(graph), warnings=warnings)
