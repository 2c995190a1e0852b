"""Cloud Storage's request preconditions as the GCS proxy evaluates them (the proxy's answers
to the real client are in tests/test_gcs_proxy.py, TestPreconditions)."""

from __future__ import annotations

import anyio
import pytest

from covalent_gcpbatch_array.local.gcs import preconditions
from covalent_gcpbatch_array.local.gcs.preconditions import ObjectKey, ObjectState

LIVE = ObjectState(generation=7, metageneration=2)


@pytest.mark.parametrize(
    ("method", "conditions", "state", "status"),
    [
        ("POST", {"ifGenerationMatch": 0}, None, 0),  # create: nothing there
        ("POST", {"ifGenerationMatch": 0}, LIVE, 412),
        ("POST", {"ifGenerationMatch": 7}, LIVE, 0),
        ("POST", {"ifGenerationMatch": 7}, None, 412),
        ("DELETE", {"ifGenerationNotMatch": 7}, LIVE, 412),
        ("POST", {"ifGenerationNotMatch": 3}, None, 412),  # "if no live object exists, fails"
        ("PATCH", {"ifMetagenerationMatch": 2}, LIVE, 0),
        ("PATCH", {"ifMetagenerationMatch": 3}, LIVE, 412),
        ("POST", {"ifMetagenerationNotMatch": 2}, LIVE, 412),
        ("GET", {"ifGenerationNotMatch": 7}, LIVE, 304),  # a read's "NotMatch": Not Modified
        ("GET", {"ifMetagenerationNotMatch": 2}, LIVE, 304),
        ("GET", {"ifGenerationMatch": 8}, LIVE, 412),
        ("GET", {"ifGenerationMatch": 7, "ifMetagenerationMatch": 9}, LIVE, 412),  # all must hold
    ],
)
def test_failed_status(
    method: str, conditions: dict[str, int], state: ObjectState | None, status: int
) -> None:
    assert preconditions.failed_status(method, conditions, state) == status


def test_conditions_are_read_from_the_query_and_must_be_integers() -> None:
    query = "uploadType=media&name=a&ifGenerationMatch=0&ifMetagenerationNotMatch=3"
    assert preconditions.conditions_in(query) == {
        "ifGenerationMatch": 0,
        "ifMetagenerationNotMatch": 3,
    }
    with pytest.raises(ValueError, match="ifGenerationMatch"):
        preconditions.conditions_in("ifGenerationMatch=zero")


@pytest.mark.parametrize(
    ("method", "target", "upload_name", "key"),
    [
        ("GET", "/storage/v1/b/bk/o/a%2Fb?alt=json", None, ObjectKey("bk", "a/b")),
        ("GET", "/download/storage/v1/b/bk/o/a%2Fb?alt=media", None, ObjectKey("bk", "a/b")),
        ("DELETE", "/storage/v1/b/bk/o/x", None, ObjectKey("bk", "x")),
        (
            "POST",
            "/upload/storage/v1/b/bk/o?uploadType=media&name=a%2Fb",
            None,
            ObjectKey("bk", "a/b"),
        ),
        ("POST", "/upload/storage/v1/b/bk/o?uploadType=multipart", "m", ObjectKey("bk", "m")),
        ("POST", "/storage/v1/b/bk/o/x/rewriteTo/b/bk/o/y", None, None),
        ("GET", "/storage/v1/b/bk/o", None, None),  # a listing
    ],
)
def test_object_of(method: str, target: str, upload_name: str | None, key: ObjectKey) -> None:
    assert preconditions.object_of(method, target, upload_name) == key


@pytest.mark.parametrize(
    ("content_range", "final"),
    [
        ("bytes 0-9/10", True),
        ("bytes */0", True),
        ("bytes */10", False),  # a status query, also after the upload completed
        ("bytes 0-262143/*", False),
        ("", False),
    ],
)
def test_only_the_chunk_that_states_the_total_completes_a_resumable_upload(
    content_range: str, final: bool
) -> None:
    assert preconditions.is_final_chunk(content_range) is final


@pytest.mark.anyio
async def test_a_lock_is_dropped_once_no_request_holds_or_awaits_it() -> None:
    locks = preconditions.ObjectLocks()
    key = ObjectKey("bk", "x")
    order: list[str] = []

    async def hold(who: str, release: anyio.Event) -> None:
        async with locks.hold(key):
            order.append(who)
            await release.wait()

    first_done, second_done = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(hold, "first", first_done)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(hold, "second", second_done)
        await anyio.wait_all_tasks_blocked()
        assert order == ["first"] and len(locks) == 1  # the second waits on the same lock
        first_done.set()
        await anyio.wait_all_tasks_blocked()
        assert order == ["first", "second"]
        second_done.set()
    assert len(locks) == 0


@pytest.mark.parametrize(
    ("target", "refused"),
    [
        ("/storage/v1/b/bk/o/x/compose?ifGenerationMatch=0", True),
        ("/storage/v1/b/bk/o/x/rewriteTo/b/bk/o/y?ifSourceGenerationMatch=3", True),
        ("/storage/v1/b/bk/o/x?generation=5&ifMetagenerationMatch=1", True),
        ("/storage/v1/b/bk/o/x/compose", False),  # no condition: nothing to check
        ("/storage/v1/b/bk/o/x?ifGenerationMatch=5", False),
        ("/upload/storage/v1/b/bk/o?uploadType=media&name=x&ifGenerationMatch=0", False),
    ],
)
def test_conditions_it_cannot_check_are_refused_loudly(target: str, refused: bool) -> None:
    reason = preconditions.unsupported(target)
    assert (reason is not None) is refused
    assert reason is None or "not supported by the local cloud" in reason
