"""Workflows (workflows.md): one class made of the families of use cases, one
module each (see base.py for how scheduling works)."""
from __future__ import annotations

from services.workflow.app.control import Control
from services.workflow.app.create import CreateCases
from services.workflow.app.execution import Execution
from services.workflow.app.planning import Planning
from services.workflow.app.reconciliation import Reconciliation
from services.workflow.app.teardown import Teardown


class Workflows(CreateCases, Planning, Execution, Control, Teardown, Reconciliation):
    """Create, update, plan, execute, advance, cancel, retry, tear down, expire and reconcile workflows."""
