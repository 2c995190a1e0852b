"""Security: tampering with the bucket is detected and nothing forged is ever unpickled; object
names come only from ids the executor made; the job's key stays out of logs, labels, error
messages, the bucket and the user's function.

The attacker here has what a bucket writer has (storage.objects.create/delete on the bucket,
through the real client) and knows the layout, but not the job's key.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import pytest
from electrons import (
    Outcome,
    Spec,
    check_exactly_one_outcome,
    check_infrastructure_error,
    check_user_error,
    check_value,
    executor_for,
    fan_out,
    new_token,
)

from covalent_gcpbatch_array._core.contract import TaskRef
from covalent_gcpbatch_array._core.envelopes import encode_error, encode_result
from covalent_gcpbatch_array.exceptions import ResultIntegrityError
from covalent_gcpbatch_array.local import LocalCloud

pytestmark = pytest.mark.slow

cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: Every object name the executor and the runner make, under a test's prefix.
OBJECT_NAME = re.compile(
    r"^(?P<prefix>[a-z0-9-]+)/cga-\d{8}-\d{6}-[0-9a-f]{10}/"
    r"(manifest\.json|lease|"
    r"tasks/\d+/(input\.pkl|result\.pkl|error\.pkl|stdout\.\d+|stderr\.\d+|cancelled))$"
)


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    with LocalCloud() as local_cloud:
        yield local_cloud


class Trap:
    """Unpickling it creates a file: proof that a forged object was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


class Attacker:
    """Someone who may write the bucket and knows the layout, but not the job's key."""

    def __init__(self, cloud: LocalCloud, prefix: str) -> None:
        self.bucket = cloud.storage_client().bucket(cloud.bucket_name)
        self.prefix = prefix

    def name(self, ref: tuple[str, int], file_name: str) -> str:
        return f"{self.prefix}/{ref[0]}/tasks/{ref[1]}/{file_name}"

    async def write(self, ref: tuple[str, int], file_name: str, data: bytes) -> None:
        blob = self.bucket.blob(self.name(ref, file_name))
        await anyio.to_thread.run_sync(blob.upload_from_string, data)

    async def read_when_there(self, ref: tuple[str, int], file_name: str) -> bytes:
        blob = self.bucket.blob(self.name(ref, file_name))
        with anyio.fail_after(60):
            while not await anyio.to_thread.run_sync(blob.exists):  # noqa: ASYNC110 (another process)
                await anyio.sleep(0.05)
        data: bytes = await anyio.to_thread.run_sync(blob.download_as_bytes)
        return data


def unique_prefix() -> str:
    return f"sec-{new_token()}"


def check_refused(outcome: Outcome, *fragments: str) -> None:
    cause = outcome.cause
    assert isinstance(cause, ResultIntegrityError), f"{outcome.describe()}: {cause!r}"
    assert "not unpickled" in str(cause)
    for fragment in fragments:
        assert fragment in str(cause), str(cause)


def touch_and_return(spec: Spec) -> str:
    Path(spec.param).touch()  # a side effect: shows that the function ran
    return f"{spec.token}:{spec.index}:{spec.index**2}"


class TestForgedResults:
    @pytest.mark.anyio
    @pytest.mark.parametrize(
        ("forgery", "file_name", "message"),
        [
            ("raw pickle", "result.pkl", "not an envelope written by covalent-gcpbatch-array"),
            ("envelope with a guessed key", "result.pkl", "failed its HMAC-SHA256 check"),
            ("envelope with a guessed key", "error.pkl", "failed its HMAC-SHA256 check"),
        ],
    )
    async def test_a_forged_outcome_is_refused_and_never_unpickled(
        self, cloud: LocalCloud, tmp_path: Path, forgery: str, file_name: str, message: str
    ) -> None:
        trap, release = tmp_path / "trap", tmp_path / "release"
        prefix = unique_prefix()
        attacker = Attacker(cloud, prefix)
        token = new_token()
        specs = [Spec(0, token), Spec(1, token, "wait_file", str(release)), Spec(2, token)]

        async def attack(handles: dict[int, tuple[str, int]]) -> None:
            ref = handles[1]
            task = TaskRef(*ref)
            if forgery == "raw pickle":
                data = pickle.dumps(Trap(str(trap)))
            elif file_name == "result.pkl":
                data = encode_result(Trap(str(trap)), key=os.urandom(32), task=task)
            else:
                data = encode_error(
                    RuntimeError("forged"), key=os.urandom(32), task=task, traceback_text=""
                )
                data = data.replace(b"forged", b"FORGED")  # any bytes the attacker likes
            await attacker.write(ref, file_name, data)
            release.touch()

        fan = await fan_out(cloud, specs, bucket_prefix=prefix, while_running=attack)
        check_exactly_one_outcome(fan)
        check_refused(fan[1], message)
        check_value(fan[0])
        check_value(fan[2])
        assert not trap.exists(), "a forged object was unpickled"

    @pytest.mark.anyio
    async def test_a_job_mates_genuine_result_copied_over_is_refused(
        self, cloud: LocalCloud, tmp_path: Path
    ) -> None:
        # Signed with the right key, but for task 0: the header binds it to its place.
        release = tmp_path / "release"
        prefix = unique_prefix()
        attacker = Attacker(cloud, prefix)
        token = new_token()
        specs = [Spec(0, token), Spec(1, token, "wait_file", str(release))]

        async def attack(handles: dict[int, tuple[str, int]]) -> None:
            genuine = await attacker.read_when_there(handles[0], "result.pkl")
            await attacker.write(handles[1], "result.pkl", genuine)
            release.touch()

        fan = await fan_out(
            cloud, specs, bucket_prefix=prefix, keep_objects=True, while_running=attack
        )
        check_exactly_one_outcome(fan)
        check_value(fan[0])
        check_refused(fan[1], "signed for another place", "it was copied or swapped")

    @pytest.mark.anyio
    async def test_a_genuine_result_of_another_job_is_refused(
        self, cloud: LocalCloud, tmp_path: Path
    ) -> None:
        prefix = unique_prefix()
        attacker = Attacker(cloud, prefix)
        token = new_token()
        first = await fan_out(cloud, [Spec(0, token)], bucket_prefix=prefix, keep_objects=True)
        first_ref = next(iter(first.by_task()))
        genuine = await attacker.read_when_there(first_ref, "result.pkl")
        release = tmp_path / "release"

        async def attack(handles: dict[int, tuple[str, int]]) -> None:
            await attacker.write(handles[0], "result.pkl", genuine)
            release.touch()

        fan = await fan_out(
            cloud,
            [Spec(0, token, "wait_file", str(release))],
            bucket_prefix=prefix,
            while_running=attack,
        )
        check_refused(fan[0], "failed its HMAC-SHA256 check", "another job's key")


class TestTamperedInputs:
    @pytest.mark.anyio
    @pytest.mark.parametrize(
        ("tampering", "message"),
        [
            ("one byte changed", "failed its HMAC-SHA256 check"),
            ("replaced by a raw pickle", "not an envelope written by covalent-gcpbatch-array"),
        ],
    )
    async def test_the_task_refuses_a_tampered_input_and_runs_nothing(
        self, cloud: LocalCloud, tmp_path: Path, tampering: str, message: str
    ) -> None:
        trap, ran = tmp_path / "trap", tmp_path / "ran"
        prefix = unique_prefix()
        attacker = Attacker(cloud, prefix)
        token = new_token()
        specs = [Spec(0, token, param=str(tmp_path / "ran-0")), Spec(1, token, param=str(ran))]

        async def attack(handles: dict[int, tuple[str, int]]) -> None:
            # The batch window (3 s) is still open: the job, and so the task, comes later.
            genuine = await attacker.read_when_there(handles[1], "input.pkl")
            if tampering == "one byte changed":
                middle = len(genuine) // 2
                forged = genuine[:middle] + bytes([genuine[middle] ^ 1]) + genuine[middle + 1 :]
            else:
                forged = pickle.dumps(Trap(str(trap)))
            await attacker.write(handles[1], "input.pkl", forged)

        fan = await fan_out(
            cloud,
            specs,
            fn=touch_and_return,
            bucket_prefix=prefix,
            batch_window=3,
            retries=2,
            while_running=attack,
        )
        check_exactly_one_outcome(fan)
        check_value(fan[0])
        check_refused(fan[1], "the input object of task", message)
        assert not ran.exists(), "the function ran on a tampered input"
        assert not trap.exists(), "a forged input was unpickled"
        assert (tmp_path / "ran-0").exists()


def hostile_value(spec: Spec) -> Any:
    return {"name": "../../../escape", "path": f"gs://other-bucket/{spec.param}", "i": spec.index}


class TestObjectNames:
    @pytest.mark.anyio
    async def test_names_come_only_from_ids_the_executor_made(self, cloud: LocalCloud) -> None:
        prefix = unique_prefix()
        client = cloud.storage_client()
        before = {blob.name for blob in client.list_blobs(cloud.bucket_name)}
        token = new_token()
        specs = [Spec(i, token, param=f"../../{i}/result.pkl") for i in range(3)]
        fan = await fan_out(
            cloud,
            specs,
            fn=hostile_value,
            bucket_prefix=prefix,
            keep_objects=True,
            dispatch_id="../../../etc/passwd?x=/tasks/0/result.pkl",
        )
        check_exactly_one_outcome(fan)
        for outcome in fan:
            check_value(outcome, hostile_value(outcome.spec))
        created = {blob.name for blob in client.list_blobs(cloud.bucket_name)} - before
        assert created, "keep_objects kept nothing"
        for name in created:
            match = OBJECT_NAME.match(name)
            assert match and match["prefix"] == prefix, f"unexpected object {name!r}"

    @pytest.mark.anyio
    @pytest.mark.parametrize(
        "handle",
        [
            {"job_id": "../../escape", "task_index": 0},
            {"job_id": "cga-20260101-000000-0123456789", "task_index": -1},
            {"job_id": "cga-20260101-000000-0123456789", "task_index": "0/../../x"},
            {"job_id": "Cga-Upper", "task_index": 0},
        ],
    )
    async def test_cancel_refuses_a_handle_it_did_not_make(
        self, cloud: LocalCloud, handle: dict[str, Any]
    ) -> None:
        client = cloud.storage_client()
        before = {blob.name for blob in client.list_blobs(cloud.bucket_name)}
        with pytest.raises(ValueError, match="invalid"):
            await executor_for(cloud).cancel({}, handle)
        assert {blob.name for blob in client.list_blobs(cloud.bucket_name)} == before


def reads_the_environment(spec: Spec) -> dict[str, Any]:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('CGA_HMAC_KEY', 'absent'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {"own": os.environ.get("CGA_HMAC_KEY", "absent"), "child": child.stdout.strip()}


class TestNoSecretsLeak:
    @pytest.mark.anyio
    async def test_the_users_function_and_its_children_do_not_see_the_key(
        self, cloud: LocalCloud
    ) -> None:
        fan = await fan_out(cloud, [Spec(0, new_token())], fn=reads_the_environment)
        check_value(fan[0], {"own": "absent", "child": "absent"})

    @pytest.mark.anyio
    async def test_the_key_is_nowhere_but_in_the_job_definition(
        self, cloud: LocalCloud, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        prefix = unique_prefix()
        token = new_token()
        release = tmp_path / "release"
        specs = [
            Spec(0, token),
            Spec(1, token, "raise"),
            Spec(2, token, "crash_until", 9),
            Spec(3, token, "wait_file", str(release)),
        ]
        attacker = Attacker(cloud, prefix)

        async def forge(handles: dict[int, tuple[str, int]]) -> None:
            await attacker.write(handles[3], "result.pkl", b"not an envelope")
            release.touch()

        fan = await fan_out(
            cloud,
            specs,
            bucket_prefix=prefix,
            keep_objects=True,
            labels={"team": "science"},
            while_running=forge,
        )
        check_exactly_one_outcome(fan)
        check_value(fan[0])
        check_user_error(fan[1])
        check_infrastructure_error(fan[2], "code 17")
        check_refused(fan[3])
        (job_id,) = {job for job, _ in fan.by_task()}

        job = await anyio.to_thread.run_sync(
            functools.partial(
                cloud.batch_client().get_job,
                name=f"projects/{cloud.project_id}/locations/{cloud.region}/jobs/{job_id}",
            )
        )
        key = job.task_groups[0].task_spec.environment.variables["CGA_HMAC_KEY"]
        assert len(key) == 64
        secrets = (key, key.upper(), bytes.fromhex(key).decode("latin-1"))

        def assert_clean(what: str, text: str) -> None:
            for secret in secrets:
                assert secret not in text, f"the job's key is in {what}"

        assert_clean("the labels", repr(dict(job.labels)))
        labels = dict(job.labels)
        assert labels == {
            "team": "science",
            "created-by": "covalent-gcpbatch-array",
            "cga-version": labels["cga-version"],
            "cga-flush-reason": labels["cga-flush-reason"],
            "batch-job-id": job.name.rsplit("/", 1)[1],  # Batch's own predefined label
        }
        assert_clean("the executor's logs", caplog.text)
        for outcome in fan:
            assert_clean(f"{outcome.describe()}'s streams", outcome.stdout + outcome.stderr)
            error: BaseException | None = outcome.error
            while error is not None:
                assert_clean(f"{outcome.describe()}'s error", f"{error!s} {error!r}")
                error = error.__cause__ or error.__context__
        for blob in cloud.storage_client().list_blobs(cloud.bucket_name, prefix=prefix):
            assert_clean(
                f"gs://{cloud.bucket_name}/{blob.name}", blob.download_as_bytes().decode("latin-1")
            )
        # The local cloud's own logs and every task attempt's output (what Batch sends to Cloud
        # Logging); the job definition itself is not among them.
        for path in cloud.workdir.rglob("*"):
            if path.is_file():
                assert_clean(str(path), path.read_bytes().decode("latin-1"))
        gc.collect()
