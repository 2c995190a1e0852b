"""The monitored resources Batch's task log entries carry, and their labels.

Batch logs a job's task output on the ``batch.googleapis.com/Job`` resource; jobs it logged
before that carry the older ``generic_task`` resource. This module has no heavy imports, so
``LocalCloud`` can check a ``log_resource_type`` without loading the emulator.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GENERIC_TASK", "JOB_RESOURCE", "RESOURCE_TYPES", "monitored_resource"]

#: The monitored resource type of Batch's task logs, and the one it used before.
JOB_RESOURCE = "batch.googleapis.com/Job"
GENERIC_TASK = "generic_task"
RESOURCE_TYPES = (JOB_RESOURCE, GENERIC_TASK)


def monitored_resource(
    resource_type: str, project: str, location: str, job_uid: str, task_id: str
) -> dict[str, Any]:
    """The ``resource`` of a task log entry, with the labels its type has."""
    if resource_type == GENERIC_TASK:
        labels = {
            "project_id": project,
            "location": location,
            "namespace": "",
            "job": job_uid,
            "task_id": f"task/{task_id}/0/0",
        }
    else:
        labels = {"resource_container": project, "location": location, "job_id": job_uid}
    return {"type": resource_type, "labels": labels}
