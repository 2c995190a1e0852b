"""Response field masks as the Batch emulator applies them (syntax, checking, trimming)."""

from __future__ import annotations

from typing import Any

import pytest
from google.cloud import batch_v1
from google.protobuf.descriptor import Descriptor

from covalent_gcpbatch_array.local.api_errors import ApiError
from covalent_gcpbatch_array.local.field_mask import FieldMask, field_mask_text

TASKS: Descriptor = batch_v1.ListTasksResponse.pb().DESCRIPTOR
JOB: Descriptor = batch_v1.Job.pb().DESCRIPTOR

EVENT = {"type": "STATUS_CHANGED", "eventTime": "2026-01-01T00:00:00Z", "taskState": "RUNNING"}
LISTING: dict[str, Any] = {
    "tasks": [
        {
            "name": f"j/taskGroups/group0/tasks/{index}",
            "status": {"state": state, "statusEvents": [EVENT]},
        }
        for index, state in enumerate(["SUCCEEDED", "FAILED"])
    ],
    "nextPageToken": "2",
}
JOB_JSON: dict[str, Any] = {
    "name": "projects/p/locations/l/jobs/j",
    "uid": "j-1",
    "status": {
        "state": "RUNNING",
        "statusEvents": [EVENT],
        "taskGroups": {"group0": {"counts": {"RUNNING": "2"}, "instances": []}},
    },
    "labels": {"created-by": "covalent-gcpbatch-array", "team": "x"},
}


def trimmed(text: str, body: dict[str, Any], message: Descriptor = TASKS) -> dict[str, Any]:
    mask = FieldMask.parse(text, message)
    return body if mask is None else mask.apply(body)


def names_and_states() -> dict[str, Any]:
    return {
        "tasks": [
            {"name": t["name"], "status": {"state": t["status"]["state"]}} for t in LISTING["tasks"]
        ],
        "nextPageToken": "2",
    }


class TestSyntax:
    @pytest.mark.parametrize(
        "text",
        [
            "tasks.name,tasks.status.state,nextPageToken",
            "tasks/name,tasks/status/state,nextPageToken",
            "tasks(name,status.state),nextPageToken",
            "tasks(name,status(state)),nextPageToken",
            " tasks( name , status.state ) , next_page_token ",
            "tasks.name,tasks.status.state,nextPageToken,unreachable",
        ],
    )
    def test_spellings_of_the_same_mask(self, text: str) -> None:
        assert trimmed(text, LISTING) == names_and_states()

    @pytest.mark.parametrize(
        "text", ["", "  ", "*", "tasks,*", "tasks(*),nextPageToken,unreachable"]
    )
    def test_masks_that_keep_everything(self, text: str) -> None:
        assert trimmed(text, LISTING) == LISTING

    def test_a_path_stopping_at_a_message_keeps_all_of_it(self) -> None:
        assert trimmed("tasks.status", LISTING) == {
            "tasks": [{"status": task["status"]} for task in LISTING["tasks"]]
        }

    def test_the_wider_of_two_overlapping_paths_wins(self) -> None:
        assert trimmed("tasks.status.state,tasks.status", LISTING) == trimmed(
            "tasks.status", LISTING
        )
        assert trimmed("tasks.status,tasks.status.state", LISTING) == trimmed(
            "tasks.status", LISTING
        )

    def test_absent_fields_stay_absent(self) -> None:
        assert trimmed("nextPageToken,unreachable", {"tasks": []}) == {}

    @pytest.mark.parametrize(
        "text", ["tasks(name", "tasks..name", "tasks.name)", ",", "tasks;name", "a(b)c"]
    )
    def test_malformed_masks_are_400(self, text: str) -> None:
        with pytest.raises(ApiError) as info:
            FieldMask.parse(text, TASKS)
        assert info.value.code == 400
        assert info.value.field == "fields"
        assert repr(text.strip()) in info.value.message


class TestChecking:
    @pytest.mark.parametrize(
        ("text", "bad_path"),
        [
            ("tasks.nmae", "tasks.nmae"),
            ("tasks(name,status.sate)", "tasks.status.sate"),
            ("nextPageToken,job", "job"),
            ("tasks.name.first", "tasks.name"),
        ],
    )
    def test_a_path_naming_no_field_is_400_naming_it(self, text: str, bad_path: str) -> None:
        with pytest.raises(ApiError) as info:
            FieldMask.parse(text, TASKS)
        assert info.value.code == 400
        assert repr(bad_path) in info.value.message

    def test_a_wildcard_inside_a_path_is_refused_not_widened(self) -> None:
        with pytest.raises(ApiError, match="not supported by the local cloud"):
            FieldMask.parse("tasks.*.state", TASKS)

    def test_no_path_into_a_timestamp(self) -> None:
        with pytest.raises(ApiError, match="eventTime"):
            FieldMask.parse("tasks.status.statusEvents.eventTime.seconds", TASKS)

    def test_map_keys_and_paths_into_map_values(self) -> None:
        assert trimmed("status(state,taskGroups.group0.counts)", JOB_JSON, JOB) == {
            "status": {"state": "RUNNING", "taskGroups": {"group0": {"counts": {"RUNNING": "2"}}}}
        }
        assert trimmed("labels.team,name", JOB_JSON, JOB) == {
            "labels": {"team": "x"},
            "name": JOB_JSON["name"],
        }
        with pytest.raises(ApiError, match=r"status\.taskGroups\.group0\.nope"):
            FieldMask.parse("status.taskGroups.group0.nope", JOB)

    def test_snake_case_names_become_json_names(self) -> None:
        mask = FieldMask.parse("status.status_events,status.task_groups", JOB)
        assert mask is not None
        assert mask.selection == {"status": {"statusEvents": None, "taskGroups": None}}


class TestWhereTheMaskComesFrom:
    @pytest.mark.parametrize(
        ("headers", "query", "expected"),
        [
            ({"x-goog-fieldmask": "a"}, {"$fields": "b"}, "a"),
            ({}, {"$fields": "b", "fields": "c"}, "b"),
            ({}, {"fields": "c"}, "c"),
            ({}, {}, ""),
        ],
    )
    def test_header_then_dollar_fields_then_fields(
        self, headers: dict[str, str], query: dict[str, str], expected: str
    ) -> None:
        assert field_mask_text(headers, query) == expected
