"""The blueprint context's model: templates, source code versions (a
template pinned to a module in git, with the module's variables and
outputs) and blueprints (templates + wiring rules + defaults). Pure Python."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass
class Template:
    id: str
    key: str
    name: str
    description: str = ""
    labels: list[str] = field(default_factory=list)
    enabled: bool = True
    abstract: bool = False
    parent_template_ids: list[str] = field(default_factory=list)
    creator: str = ""
    create_time: dt.datetime | None = None
    update_time: dt.datetime | None = None
    version: int = 1
    retry_policy: dict = field(default_factory=dict)  # services.common.retry.RetryPolicy as JSON

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


@dataclass(frozen=True)
class ModuleSource:
    repository_url: str
    ref: str
    path: str = ""


@dataclass
class Variable:
    """A module variable as declared in its .tf files, with the platform
    team's configuration applied."""

    name: str
    type: str = ""  # HCL type expression; "" means any
    description: str = ""
    has_default: bool = False
    default: Any = None
    sensitive: bool = False
    required: bool = True
    frozen: bool = False
    unique: bool = False


@dataclass(frozen=True)
class Output:
    name: str
    description: str = ""
    sensitive: bool = False
    # What the value expression is known to produce: "string", "number",
    # "bool", "list", "map", or "" when it cannot be told from the code.
    kind: str = ""


@dataclass(frozen=True)
class VariableConfig:
    """A platform team's override of one variable; None leaves it as declared."""

    name: str
    frozen: bool | None = None
    unique: bool | None = None
    sensitive: bool | None = None
    required: bool | None = None
    has_default: bool = False
    default: Any = None


@dataclass
class SourceCodeVersion:
    id: str
    template_id: str
    source: ModuleSource
    commit: str
    declared_variables: list[Variable]
    outputs: list[Output]
    variable_configs: list[VariableConfig] = field(default_factory=list)
    description: str = ""
    is_default: bool = False
    creator: str = ""
    create_time: dt.datetime | None = None
    update_time: dt.datetime | None = None
    version: int = 1

    @property
    def etag(self) -> str:
        return f'"{self.version}"'

    @property
    def variables(self) -> list[Variable]:
        """Declared variables with the configuration applied."""
        configs = {c.name: c for c in self.variable_configs}
        result = []
        for var in self.declared_variables:
            c = configs.get(var.name)
            if c is not None:
                var = replace(
                    var,
                    frozen=var.frozen if c.frozen is None else c.frozen,
                    unique=var.unique if c.unique is None else c.unique,
                    sensitive=var.sensitive if c.sensitive is None else c.sensitive,
                    required=var.required if c.required is None else c.required,
                )
                if c.has_default:
                    var = replace(var, has_default=True, default=c.default,
                                  required=False if c.required is None else c.required)
            result.append(var)
        return result

    def variable(self, name: str) -> Variable | None:
        return next((v for v in self.variables if v.name == name), None)

    def output(self, name: str) -> Output | None:
        return next((o for o in self.outputs if o.name == name), None)


@dataclass(frozen=True)
class WiringRule:
    source_template_id: str
    source_output: str
    target_template_id: str
    target_variable: str

    def describe(self) -> str:
        return f"{self.source_template_id}.{self.source_output} -> {self.target_template_id}.{self.target_variable}"


@dataclass
class BlueprintTemplate:
    template_id: str
    source_code_version_id: str = ""
    default_variables: dict[str, Any] = field(default_factory=dict)
    external: bool = False
    runtime_inputs: list[str] = field(default_factory=list)


@dataclass
class Blueprint:
    id: str
    name: str
    description: str = ""
    labels: list[str] = field(default_factory=list)
    templates: list[BlueprintTemplate] = field(default_factory=list)
    wiring_rules: list[WiringRule] = field(default_factory=list)
    revision: int = 1
    creator: str = ""
    create_time: dt.datetime | None = None
    update_time: dt.datetime | None = None

    @property
    def etag(self) -> str:
        return f'"{self.revision}"'

    def template_ids(self) -> list[str]:
        return [t.template_id for t in self.templates]

    def entry(self, template_id: str) -> BlueprintTemplate | None:
        return next((t for t in self.templates if t.template_id == template_id), None)
