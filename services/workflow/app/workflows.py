"""Workflows (workflows.md): one class made of the families of use cases, one
module each (see base.py for how scheduling works)."""
from __future__ import annotations

from services.workflow.app.create import CreateCases
from services.workflow.app.execution import Execution
from services.workflow.app.planning import Planning
from services.workflow.app.reconciliation import Reconciliation
from services.workflow.app.teardown import Teardown


class Workflows(CreateCases, Planning, Execution, Teardown, Reconciliation):
    """Create, update, plan, execute, advance, tear down and reconcile workflows."""
