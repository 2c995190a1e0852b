"""Tests of the signed envelopes: round trips, tampering, wrong keys, unpicklable values."""

from __future__ import annotations

import copyreg
import dataclasses
import importlib.metadata
import socket
import struct
import sys
import threading
from typing import Any

import cloudpickle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from covalent_gcpbatch_array._core import envelopes
from covalent_gcpbatch_array._core.contract import TaskRef
from covalent_gcpbatch_array._core.envelopes import (
    ElectronOrigin,
    RuntimeVersions,
    TaskResult,
    decode_error,
    decode_input,
    decode_result,
    encode_error,
    encode_input,
    encode_result,
    new_job_key,
    parse_job_key,
)
from covalent_gcpbatch_array.exceptions import (
    ElectronInputError,
    ElectronResultError,
    RemoteTaskError,
    ResultIntegrityError,
    TaskEnvironmentError,
)

TASK = TaskRef("job-payload", 7)
ORIGIN = ElectronOrigin("dispatch-1", 12)


@pytest.fixture
def key() -> bytes:
    return new_job_key()


class Tripwire:
    """Unpickling this records it: proves whether a body was ever unpickled."""

    loads: list[str] = []

    def __init__(self, label: str) -> None:
        self.label = label

    def __reduce__(self) -> tuple[Any, ...]:
        return Tripwire._rebuild, (self.label,)

    @staticmethod
    def _rebuild(label: str) -> Tripwire:
        Tripwire.loads.append(label)
        return Tripwire(label)


@pytest.fixture
def tripwire() -> list[str]:
    Tripwire.loads = []
    return Tripwire.loads


class NeedsTwoArgs(Exception):
    """Pickles, but cannot be rebuilt: unpickling calls NeedsTwoArgs(message) only."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class HoldsALock(Exception):
    """Cannot be pickled at all: an attribute is a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


class TestKeys:
    def test_new_keys_are_random_and_32_bytes(self) -> None:
        keys = {new_job_key() for _ in range(50)}
        assert len(keys) == 50
        assert all(len(k) == envelopes.JOB_KEY_BYTES == 32 for k in keys)

    def test_hex_round_trip(self, key: bytes) -> None:
        assert parse_job_key(key.hex()) == key
        assert parse_job_key(f"  {key.hex().upper()}\n") == key

    @pytest.mark.parametrize("text", ["", "abc", "zz" * 32, "00" * 31, "00" * 33])
    def test_bad_hex_is_refused_without_echoing_it(self, text: str) -> None:
        with pytest.raises(ValueError, match="64 hex digits") as info:
            parse_job_key(text)
        if text:
            assert text not in str(info.value)

    def test_short_key_cannot_sign(self) -> None:
        with pytest.raises(ValueError, match="32 bytes"):
            encode_result(1, key=b"short", task=TASK)


class TestRoundTrips:
    def test_input(self, key: bytes) -> None:
        offset = 5

        def add(a: int, b: int = 0) -> int:
            return a + b + offset

        data = encode_input(add, (1,), {"b": 2}, key=key, task=TASK, origin=ORIGIN)
        task_input = decode_input(data, key=key, task=TASK)
        assert task_input.fn(*task_input.args, **task_input.kwargs) == 8
        assert task_input.args == (1,)
        assert task_input.kwargs == {"b": 2}
        assert task_input.origin == ORIGIN
        assert task_input.versions == RuntimeVersions.current()

    @settings(max_examples=50, deadline=None)
    @given(
        value=st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
            lambda children: st.lists(children) | st.dictionaries(st.text(), children),
            max_leaves=20,
        )
    )
    def test_result(self, value: object) -> None:
        key = new_job_key()
        decoded = decode_result(encode_result(value, key=key, task=TASK), key=key, task=TASK)
        assert decoded.value == value

    def test_large_result(self, key: bytes) -> None:
        value = bytes(range(256)) * (40 * 4096)  # 40 MiB
        decoded = decode_result(encode_result(value, key=key, task=TASK), key=key, task=TASK)
        assert decoded.value == value

    def test_error_keeps_the_exception_and_its_traceback(self, key: bytes) -> None:
        exc = _raised(KeyError("missing"))
        failure = decode_error(encode_error(exc, key=key, task=TASK), key=key, task=TASK)
        assert type(failure.exception) is KeyError
        assert failure.exception.args == ("missing",)
        assert failure.type_name == "builtins.KeyError"
        assert failure.message == "'missing'"
        assert "_raised" in failure.traceback_text
        assert "KeyError: 'missing'" in failure.traceback_text
        assert failure.to_exception() is failure.exception

    def test_error_of_a_locally_defined_class_travels_by_value(self, key: bytes) -> None:
        class LocalError(ValueError):
            pass

        data = encode_error(_raised(LocalError("boom")), key=key, task=TASK)
        failure = decode_error(data, key=key, task=TASK)
        assert failure.exception is not None
        assert type(failure.exception).__name__ == "LocalError"
        assert isinstance(failure.exception, ValueError)
        assert str(failure.exception) == "boom"

    def test_explicit_traceback_text_is_kept(self, key: bytes) -> None:
        data = encode_error(RuntimeError("x"), key=key, task=TASK, traceback_text="remote tb")
        assert decode_error(data, key=key, task=TASK).traceback_text == "remote tb"

    @settings(max_examples=30, deadline=None)
    @given(stdout=st.binary(max_size=300), stderr=st.binary(max_size=300), value=st.binary())
    def test_result_carries_the_streams(self, stdout: bytes, stderr: bytes, value: bytes) -> None:
        key = new_job_key()
        data = encode_result(value, key=key, task=TASK, stdout=stdout, stderr=stderr)
        decoded = decode_result(data, key=key, task=TASK)
        assert decoded.value == value
        assert decoded.stdout == stdout.decode(errors="replace")
        assert decoded.stderr == stderr.decode(errors="replace")

    def test_error_carries_the_streams(self, key: bytes) -> None:
        data = encode_error(
            _raised(KeyError("k")), key=key, task=TASK, stdout=b"out\n", stderr="é\n".encode()
        )
        failure = decode_error(data, key=key, task=TASK)
        assert (failure.stdout, failure.stderr) == ("out\n", "é\n")
        assert type(failure.exception) is KeyError

    def test_envelope_without_stream_lengths_reads_as_quiet(self, key: bytes) -> None:
        # An envelope from a runner that kept its streams only as separate objects.
        data = envelopes._seal("result", TASK, key, {}, cloudpickle.dumps(42))
        assert decode_result(data, key=key, task=TASK) == TaskResult(42, "", "")

    def test_stream_lengths_past_the_body_are_refused(self, key: bytes) -> None:
        header = {"stdout_bytes": 10**6, "stderr_bytes": 0}
        data = envelopes._seal("result", TASK, key, header, cloudpickle.dumps(42))
        with pytest.raises(ResultIntegrityError, match="stream lengths"):
            decode_result(data, key=key, task=TASK)


class TestUnpicklable:
    def test_unpicklable_argument_is_named(self, key: bytes) -> None:
        with pytest.raises(ElectronInputError) as info, socket.socket() as sock:
            encode_input(len, (1, sock), {}, key=key, task=TASK, origin=ORIGIN)
        message = str(info.value)
        assert "electron 12 of dispatch dispatch-1" in message
        assert "positional argument 1" in message
        assert isinstance(info.value.__cause__, TypeError)

    def test_unpicklable_keyword_argument_is_named(self, key: bytes) -> None:
        with pytest.raises(ElectronInputError, match="keyword argument 'lock'"):
            encode_input(len, (), {"lock": threading.Lock()}, key=key, task=TASK, origin=ORIGIN)

    def test_unpicklable_function_is_named(self, key: bytes) -> None:
        lock = threading.Lock()

        def uses_lock() -> bool:
            return lock.locked()

        with pytest.raises(ElectronInputError, match="the function cannot be pickled"):
            encode_input(uses_lock, (), {}, key=key, task=TASK, origin=ORIGIN)

    def test_unpicklable_result(self, key: bytes) -> None:
        with pytest.raises(ElectronResultError, match="result of task 7 of job job-payload"):
            encode_result((x for x in range(3)), key=key, task=TASK)

    @pytest.mark.parametrize(
        ("exc", "type_name"),
        [(NeedsTwoArgs("half", 2), "NeedsTwoArgs"), (HoldsALock("locked"), "HoldsALock")],
    )
    def test_exception_that_cannot_travel_becomes_a_record(
        self, key: bytes, exc: Exception, type_name: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Whether an exception travels is decided by its round trip in the task's process. Once
        # covalent is imported, dask's distributed has run tblib.pickling_support.install(),
        # which registers a reducer (copyreg) for every exception class defined by then and
        # makes NeedsTwoArgs rebuildable; the runner's process has none (it does not import covalent).
        monkeypatch.delitem(copyreg.dispatch_table, type(exc), raising=False)
        failure = decode_error(encode_error(_raised(exc), key=key, task=TASK), key=key, task=TASK)
        assert failure.exception is None
        assert failure.type_name == f"{__name__}.{type_name}"
        assert failure.message == str(exc)
        assert f"{type_name}: {exc}" in failure.traceback_text
        rebuilt = failure.to_exception()
        assert isinstance(rebuilt, RemoteTaskError)
        assert (rebuilt.type_name, rebuilt.message) == (failure.type_name, str(exc))
        # The record itself must survive pickling: Covalent stores it.
        assert cloudpickle.loads(cloudpickle.dumps(rebuilt)).traceback_text == (
            failure.traceback_text
        )

    def test_exception_whose_str_fails(self, key: bytes) -> None:
        class BadStr(Exception):
            def __str__(self) -> str:
                raise RuntimeError("no")

        failure = decode_error(encode_error(BadStr(), key=key, task=TASK), key=key, task=TASK)
        assert "str() of the exception raised RuntimeError" in failure.message

    def test_result_class_missing_on_the_reading_side(
        self, key: bytes, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        module = type(sys)("cga_only_in_the_image")
        exec("class Thing:\n    pass\n", module.__dict__)
        monkeypatch.setitem(sys.modules, "cga_only_in_the_image", module)
        data = encode_result(module.Thing(), key=key, task=TASK)
        monkeypatch.delitem(sys.modules, "cga_only_in_the_image")
        with pytest.raises(
            ElectronResultError, match="cannot be unpickled on the Covalent"
        ) as info:
            decode_result(data, key=key, task=TASK)
        assert isinstance(info.value.__cause__, ModuleNotFoundError)

    def test_exception_class_missing_on_the_reading_side(
        self, key: bytes, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The class pickles by reference (importable here); then its module disappears.
        module = type(sys)("cga_vanishing_module")
        exec("class GoneError(Exception):\n    pass\n", module.__dict__)
        monkeypatch.setitem(sys.modules, "cga_vanishing_module", module)
        data = encode_error(_raised(module.GoneError("bye")), key=key, task=TASK)
        monkeypatch.delitem(sys.modules, "cga_vanishing_module")
        failure = decode_error(data, key=key, task=TASK)
        assert failure.exception is None
        assert isinstance(failure.to_exception(), RemoteTaskError)
        assert failure.type_name == "cga_vanishing_module.GoneError"


def _regions(data: bytes) -> dict[str, range]:
    (header_length,) = struct.unpack_from(">I", data, 4)
    header_end = 8 + header_length
    return {
        "magic": range(0, 4),
        "length": range(4, 8),
        "header": range(8, header_end),
        "body": range(header_end, len(data) - 32),
        "mac": range(len(data) - 32, len(data)),
    }


class TestTampering:
    def _input(self, key: bytes) -> bytes:
        return encode_input(
            Tripwire("fn"), (Tripwire("arg"),), {}, key=key, task=TASK, origin=ORIGIN
        )

    def test_every_region_is_covered(self, key: bytes, tripwire: list[str]) -> None:
        data = self._input(key)
        tripwire.clear()
        regions = _regions(data)
        assert all(len(r) > 0 for r in regions.values())
        for name, region in regions.items():
            for position in (region.start, (region.start + region.stop) // 2, region.stop - 1):
                altered = bytearray(data)
                altered[position] ^= 0x01
                with pytest.raises(ResultIntegrityError, match="not unpickled"):
                    decode_input(bytes(altered), key=key, task=TASK)
                assert tripwire == [], f"flipping a bit in the {name} unpickled something"
        decode_input(data, key=key, task=TASK)
        assert tripwire == ["fn", "arg"], "the tripwire must fire when a body is unpickled"

    @pytest.mark.parametrize("cut", [0, 1, 8, 39, -1, -32])
    def test_truncated_or_extended(self, key: bytes, tripwire: list[str], cut: int) -> None:
        data = self._input(key)
        tripwire.clear()
        for altered in (data[:cut], data + b"\0"):
            with pytest.raises(ResultIntegrityError):
                decode_input(altered, key=key, task=TASK)
        assert tripwire == []

    def test_wrong_key(self, key: bytes, tripwire: list[str]) -> None:
        data = self._input(key)
        tripwire.clear()
        with pytest.raises(ResultIntegrityError, match="HMAC-SHA256"):
            decode_input(data, key=new_job_key(), task=TASK)
        assert tripwire == []

    def test_raw_pickle_is_refused(self, key: bytes, tripwire: list[str]) -> None:
        with pytest.raises(ResultIntegrityError, match="not an envelope"):
            decode_result(cloudpickle.dumps(Tripwire("raw")), key=key, task=TASK)
        assert tripwire == []

    @pytest.mark.parametrize(
        "other", [TaskRef("job-payload", 8), TaskRef("job-other", 7)], ids=["index", "job"]
    )
    def test_object_copied_to_another_task(
        self, key: bytes, tripwire: list[str], other: TaskRef
    ) -> None:
        data = encode_result(Tripwire("result"), key=key, task=TASK)
        with pytest.raises(ResultIntegrityError, match="copied or swapped"):
            decode_result(data, key=key, task=other)
        assert tripwire == []

    def test_error_presented_as_result(self, key: bytes, tripwire: list[str]) -> None:
        data = encode_error(RuntimeError("x"), key=key, task=TASK)
        with pytest.raises(ResultIntegrityError, match="error of task 7"):
            decode_result(data, key=key, task=TASK)
        result = encode_result(Tripwire("r"), key=key, task=TASK)
        with pytest.raises(ResultIntegrityError, match="result of task 7"):
            decode_error(result, key=key, task=TASK)
        assert tripwire == []


class TestVersions:
    def _input(self, key: bytes, versions: RuntimeVersions) -> bytes:
        return encode_input(
            Tripwire("fn"), (), {}, key=key, task=TASK, origin=ORIGIN, versions=versions
        )

    @pytest.mark.parametrize(
        "field", ["python", "covalent"], ids=["python differs", "covalent differs"]
    )
    def test_mismatch_is_refused_before_unpickling(
        self, key: bytes, tripwire: list[str], field: str
    ) -> None:
        here = RuntimeVersions.current()
        server = dataclasses.replace(here, **{field: "9.99"})
        data = self._input(key, server)
        tripwire.clear()
        with pytest.raises(TaskEnvironmentError) as info:
            decode_input(data, key=key, task=TASK)
        message = str(info.value)
        assert getattr(server, field) in message
        assert getattr(here, field) in message
        assert "electron 12 of dispatch dispatch-1" in message
        assert "runner_image/README.md" in message
        assert tripwire == []

    def test_versions_are_looked_up_once_per_process(self, monkeypatch: pytest.MonkeyPatch) -> None:
        here = RuntimeVersions.current()

        def read_again(name: str) -> str:
            raise AssertionError(f"package metadata of {name} read again")

        monkeypatch.setattr(importlib.metadata, "version", read_again)
        assert RuntimeVersions.current() == here

    def test_other_cloudpickle_version_is_accepted(self, key: bytes) -> None:
        here = RuntimeVersions.current()
        data = self._input(key, dataclasses.replace(here, cloudpickle="0.0.1"))
        assert decode_input(data, key=key, task=TASK).versions.cloudpickle == "0.0.1"

    def test_body_that_cannot_load_here(self, key: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
        module = type(sys)("cga_image_lacks_this")
        exec("def fn():\n    return 1\n", module.__dict__)
        monkeypatch.setitem(sys.modules, "cga_image_lacks_this", module)
        data = encode_input(module.fn, (), {}, key=key, task=TASK, origin=ORIGIN)
        monkeypatch.delitem(sys.modules, "cga_image_lacks_this")
        with pytest.raises(TaskEnvironmentError, match="cga_image_lacks_this") as info:
            decode_input(data, key=key, task=TASK)
        assert isinstance(info.value.__cause__, ModuleNotFoundError)
