"""Malformed requests over real gRPC get a clear status, and the server keeps serving.

Hypothesis generates bad requests (dtype strings, shapes that do not match their bytes,
NaN/Inf, zero or too many rows, oversized messages, missing or unknown inputs, unknown
fields, mutated request bytes) and sends them to one real TeacherServer on a loopback
port. Each must be refused with INVALID_ARGUMENT or RESOURCE_EXHAUSTED and a message,
never INTERNAL, UNKNOWN or a hang; after each example the server must still answer a
correct request as the in-process LocalTeacher does; at the end the server's own
request counter must agree with the statuses the client saw.

Three server bugs these found are pinned by explicit cases near the end (each on a
fresh server): a zero-size shape with huge dimensions, request bytes that do not parse,
and caller strings long enough to overflow gRPC's status header.
"""

from __future__ import annotations

import math
from collections import Counter

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ddistill.teacher.v1 import teacher_pb2 as pb
from services.teacher_server.client import LocalTeacher, RemoteTeacher
from services.teacher_server.codec import (
    DTYPES,
    FLOAT_DTYPES,
    MAX_NDIM,
    WireError,
    decode,
    decode_inputs,
    encode,
    encode_inputs,
    is_set,
)
from services.teacher_server.server import ServerConfig, TeacherServer
from services.teacher_server.validation import check_output_dtype

MAX_ROWS = 64  # small limits, so hitting them is cheap
MAX_MESSAGE_MB = 1
MiB = 1 << 20
TIMEOUT_S = 10  # a hang shows up as DEADLINE_EXCEEDED, which no test accepts
SERVICE = "/ddistill.teacher.v1.TeacherService"
OK = grpc.StatusCode.OK
INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
REQUESTS = {"Answer": pb.AnswerRequest, "AnswerVJP": pb.AnswerVJPRequest, "Predict": pb.PredictRequest}
REPLY_FIELDS = {
    "Answer": (pb.AnswerResponse, ("hidden", "prediction")),
    "AnswerVJP": (pb.AnswerVJPResponse, ("question_grad",)),
    "Predict": (pb.PredictResponse, ("question", "hidden", "prediction")),
}
# (method, tensor field) pairs, and how the server's messages name each field.
TENSOR_FIELDS = [
    ("Answer", "question"), ("AnswerVJP", "question"), ("AnswerVJP", "hidden_cotangent"),
    ("AnswerVJP", "prediction_cotangent"), ("Predict", "ids"),
]
FLOAT_FIELDS = [target for target in TENSOR_FIELDS if target[1] != "ids"]
LABEL = {"question": "question", "hidden_cotangent": "hidden_cotangent",
         "prediction_cotangent": "prediction_cotangent", "ids": "input 'ids'"}

# What the client saw, for the check against the server's own counter at the end.
SEEN: Counter[tuple[str, str]] = Counter()  # (method, status) of every call the module's server handled
BAD: Counter[str] = Counter()  # status of every malformed request sent to it
REFUSED_BY_GRPC: Counter[str] = Counter()  # oversized messages: gRPC refuses them before the service runs
STILL_VALID: Counter[str] = Counter()  # mutated requests that turned out valid (answered, and compared)
HEALTH_CHECKS: Counter[str] = Counter()  # correct requests sent after a bad one


def bounded(max_examples: int, *suppressed: HealthCheck):
    return settings(
        max_examples=max_examples, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, *suppressed],
    )


def small_config() -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, http_port=None, max_rows=MAX_ROWS,
                        max_message_mb=MAX_MESSAGE_MB, grpc_threads=4)


# -- requests ----------------------------------------------------------------------------------


def field_value(spec, field: str, rows: int, seed: int) -> torch.Tensor:
    """A valid value of one request field with ``rows`` rows."""
    gen = torch.Generator().manual_seed(seed)
    if field == "ids":
        return torch.randint(0, 100, (rows, 2), generator=gen)
    shape = {"question": spec.question_shape, "hidden_cotangent": (spec.hidden_size,),
             "prediction_cotangent": spec.prediction_shape}[field]
    return torch.randn(rows, *shape, generator=gen)


def valid_request(method: str, spec, rows: int, seed: int):
    """A correct request with ``rows`` rows (0 or more than max_rows make it a bad one)."""
    if method == "Predict":
        return pb.PredictRequest(inputs=encode_inputs({"ids": field_value(spec, "ids", rows, seed)}))
    request = REQUESTS[method](question=encode(field_value(spec, "question", rows, seed)))
    if method == "AnswerVJP":
        encode(field_value(spec, "hidden_cotangent", rows, seed + 1), out=request.hidden_cotangent)
        encode(field_value(spec, "prediction_cotangent", rows, seed + 2), out=request.prediction_cotangent)
    return request


def with_tensor(method: str, field: str, tensor: pb.Tensor, spec, rows: int, seed: int):
    """A valid request whose ``field`` is replaced by ``tensor``."""
    request = valid_request(method, spec, rows, seed)
    target = request.inputs.tensors["ids"] if field == "ids" else getattr(request, field)
    target.CopyFrom(tensor)
    return request


def unknown_fields(fields: list[tuple[int, int, bytes]]) -> bytes:
    """Wire-format bytes of fields no schema here defines: (field number, wire type, payload)."""
    out = b""
    for number, wire_type, payload in fields:
        out += varint(number << 3 | wire_type)
        if wire_type == 0:
            out += varint(int.from_bytes(payload[:8], "little"))
        elif wire_type == 1:
            out += payload[:8].ljust(8, b"\0")
        elif wire_type == 5:
            out += payload[:4].ljust(4, b"\0")
        else:  # 2: length-delimited
            out += varint(len(payload)) + payload
    return out


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def mutate(payload: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(payload)
    for kind, where, value in edits:
        i = where % (len(data) + 1)
        if kind == "set" and i < len(data):
            data[i] = value
        elif kind == "insert":
            data.insert(i, value)
        elif kind == "delete":
            del data[i:i + 1 + value % 4]
        elif kind == "truncate":
            del data[i:]
    return bytes(data)


# -- the server, a raw client, and the reference ------------------------------------------------


class Wire:
    """Raw calls (bytes in, bytes out) to one server, tallied by status; plus the reference endpoints."""

    def __init__(self, port: int, teacher) -> None:
        target = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        )
        self.calls = {
            method: self.channel.unary_unary(f"{SERVICE}/{method}", request_serializer=None,
                                             response_deserializer=None)
            for method in REQUESTS
        }
        self.remote = RemoteTeacher(target, timeout_s=TIMEOUT_S)
        SEEN["Describe", "OK"] += 1
        self.local = LocalTeacher(teacher, max_rows=MAX_ROWS)
        self.spec = self.local.spec
        self._gen = torch.Generator().manual_seed(0)

    def send(self, method: str, request, *, service_sees_it: bool = True) -> tuple[grpc.StatusCode, str, bytes]:
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        code, details, reply = call(self.calls[method], payload)
        if service_sees_it:
            SEEN[method, code.name] += 1
        return code, details, reply

    def check_still_serving(self) -> None:
        """A correct request right after a bad one: answered, and equal to the in-process answer."""
        question = torch.randn(3, *self.spec.question_shape, generator=self._gen)
        got, want = self.remote.answer(question), self.local.answer(question)
        SEEN["Answer", "OK"] += 1
        HEALTH_CHECKS["Answer"] += 1
        assert torch.allclose(got.hidden, want.hidden, atol=1e-6)
        assert torch.allclose(got.prediction, want.prediction, atol=1e-6)

    def close(self) -> None:
        self.remote.close()
        self.channel.close()


def call(method, payload: bytes) -> tuple[grpc.StatusCode, str, bytes]:
    try:
        return OK, "", method(payload, timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        return err.code(), err.details() or "", b""


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # client, server and reference share two cores
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(mlp_teacher):
    with TeacherServer(mlp_teacher, small_config()) as server:
        yield server


@pytest.fixture(scope="module")
def wire(server, mlp_teacher):
    wire = Wire(server.port, mlp_teacher)
    yield wire
    wire.close()


def refused(wire: Wire, method: str, request, *fragments: str, codes=(INVALID,), refused_by_grpc=False) -> None:
    """Send one malformed request: refused with one of ``codes``, a message naming ``fragments``;
    then the server still answers correctly."""
    code, details, _ = wire.send(method, request, service_sees_it=not refused_by_grpc)
    BAD[code.name] += 1
    if refused_by_grpc:
        REFUSED_BY_GRPC[code.name] += 1
    assert code in codes, f"{method}: {code.name}: {details}"
    assert details.strip(), f"{method}: {code.name} without a message"
    for fragment in fragments:
        assert fragment in details, f"{method}: {fragment!r} not in {details!r}"
    wire.check_still_serving()


def in_process(local: LocalTeacher, method: str, request) -> list[torch.Tensor] | Exception:
    """What the in-process adapter makes of the same request: its outputs (cast to the
    requested output dtype, as the server sends them), or the error it raises."""
    try:
        if method == "Predict":
            out_dtype = check_output_dtype(request.output_dtype, "float32")
            outputs = list(vars(local.predict(decode_inputs(request.inputs))).values())
        else:
            question = decode(request.question, "question")
            inputs = decode_inputs(request.inputs)
            out_dtype = check_output_dtype(request.output_dtype, request.question.dtype)
            if method == "Answer":
                outputs = list(vars(local.answer(question, inputs)).values())
            else:
                cotangents = [decode(t, name) if is_set(t) else None for name, t in (
                    ("hidden_cotangent", request.hidden_cotangent),
                    ("prediction_cotangent", request.prediction_cotangent))]
                outputs = [local.answer_vjp(question, inputs, *cotangents)]
    except WireError as err:  # InvalidRequest, TooManyRows, malformed tensors
        return err
    return [t.to(DTYPES[out_dtype][1]) for t in outputs]


def assert_reply_matches(method: str, reply: bytes, expected: list[torch.Tensor]) -> None:
    message_type, fields = REPLY_FIELDS[method]
    message = message_type.FromString(reply)
    for field, want in zip(fields, expected, strict=True):
        got = decode(getattr(message, field), field)
        assert got.dtype == want.dtype and got.shape == want.shape, field
        assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-5, equal_nan=True), field


# -- properties ----------------------------------------------------------------------------------

rows_st = st.integers(1, 8)
seeds = st.integers(0, 2**31)
methods = st.sampled_from(sorted(REQUESTS))
any_text = st.text(st.characters(codec="utf-8"), max_size=40)  # short: see test_long_strings_...


@bounded(60)
@given(target=st.sampled_from(TENSOR_FIELDS), dtype=st.one_of(any_text, st.sampled_from(sorted(DTYPES))),
       rows=rows_st, seed=seeds)
def test_wrong_tensor_dtype_is_invalid_argument(wire, target, dtype, rows, seed):
    method, field = target
    accepted = ("int64",) if field == "ids" else FLOAT_DTYPES
    assume(dtype not in accepted)
    good = field_value(wire.spec, field, rows, seed)
    # A known dtype travels with the right byte count, so only the dtype is wrong.
    data = encode(good, dtype).data if dtype in DTYPES else encode(good).data
    tensor = pb.Tensor(dtype=dtype, shape=good.shape, data=data)
    refused(wire, method, with_tensor(method, field, tensor, wire.spec, rows, seed), LABEL[field], "dtype")


@bounded(30)
@given(method=methods, dtype=st.one_of(any_text, st.sampled_from(sorted(DTYPES))), rows=rows_st, seed=seeds)
def test_unknown_output_dtype_is_invalid_argument(wire, method, dtype, rows, seed):
    assume(dtype not in (*FLOAT_DTYPES, ""))  # "": the default
    request = valid_request(method, wire.spec, rows, seed)
    request.output_dtype = dtype
    refused(wire, method, request, "output_dtype")


dims = st.one_of(st.integers(0, 16), st.integers(-(2**63), -1), st.integers(2**31, 2**63 - 1))


@bounded(80)
@given(target=st.sampled_from(TENSOR_FIELDS), dtype=st.sampled_from(sorted(DTYPES)),
       shape=st.lists(dims, max_size=MAX_NDIM + 2), n_bytes=st.integers(0, 2048), rows=rows_st, seed=seeds)
def test_shape_that_does_not_match_its_bytes_is_invalid_argument(wire, target, dtype, shape, n_bytes, rows, seed):
    """Negative dims, too many dims, huge dims, or a byte length that is not prod(shape) * itemsize."""
    method, field = target
    itemsize = DTYPES[dtype][0].itemsize
    assume(len(shape) > MAX_NDIM or min(shape, default=0) < 0 or math.prod(shape) * itemsize != n_bytes)
    tensor = pb.Tensor(dtype=dtype, shape=shape, data=bytes(n_bytes))
    refused(wire, method, with_tensor(method, field, tensor, wire.spec, rows, seed), LABEL[field])


@bounded(60)
@given(target=st.sampled_from(FLOAT_FIELDS), dtype=st.sampled_from(FLOAT_DTYPES),
       value=st.sampled_from([math.nan, math.inf, -math.inf]),
       spots=st.lists(st.integers(0, 10**6), min_size=1, max_size=4), rows=rows_st, seed=seeds)
def test_nan_or_inf_in_questions_and_cotangents_is_invalid_argument(wire, target, dtype, value, spots, rows, seed):
    method, field = target
    good = field_value(wire.spec, field, rows, seed)
    flat = good.reshape(-1).clone()
    flat[[spot % flat.numel() for spot in spots]] = value
    tensor = encode(flat.view_as(good), dtype)
    refused(wire, method, with_tensor(method, field, tensor, wire.spec, rows, seed), LABEL[field], "NaN or Inf")


@bounded(30)
@given(method=methods, rows=st.one_of(st.just(0), st.integers(MAX_ROWS + 1, 3 * MAX_ROWS)), seed=seeds)
def test_zero_rows_is_invalid_and_too_many_rows_is_resource_exhausted(wire, method, rows, seed):
    request = valid_request(method, wire.spec, rows, seed)
    if rows == 0:
        refused(wire, method, request, "no rows")
    else:
        refused(wire, method, request, f"{rows} rows", f"at most {MAX_ROWS}", codes=(EXHAUSTED,))


@bounded(8)
@given(method=methods, extra=st.integers(1, 2 * MiB), rows=rows_st, seed=seeds)
def test_oversized_message_is_resource_exhausted(wire, method, extra, rows, seed):
    """Over max_message_mb: gRPC itself refuses it, before the service sees it."""
    request = valid_request(method, wire.spec, rows, seed)
    size = MAX_MESSAGE_MB * MiB + extra
    request.inputs.tensors["padding"].CopyFrom(pb.Tensor(dtype="uint8", shape=[size], data=bytes(size)))
    refused(wire, method, request, codes=(EXHAUSTED,), refused_by_grpc=True)


@bounded(40)
@given(method=methods, name=any_text.filter(lambda n: n != "ids"), as_text=st.booleans(),
       drop_ids=st.booleans(), rows=rows_st, seed=seeds)
def test_unknown_input_name_is_invalid_argument(wire, method, name, as_text, drop_ids, rows, seed):
    request = valid_request(method, wire.spec, rows, seed)
    if drop_ids:
        request.inputs.tensors.pop("ids", None)  # only Predict has them
    if as_text:
        request.inputs.texts[name].values.extend(["x"] * rows)
    else:
        encode(torch.zeros(rows, 3), out=request.inputs.tensors[name])
    refused(wire, method, request, "unknown input")


@bounded(15)
@given(form=st.sampled_from(["missing", "as texts", "as both"]), rows=rows_st, seed=seeds)
def test_missing_or_misfiled_ids_are_invalid_argument(wire, form, rows, seed):
    request = valid_request("Predict", wire.spec, rows, seed)
    if form != "as both":
        del request.inputs.tensors["ids"]
    if form != "missing":
        request.inputs.texts["ids"].values.extend(["1 2"] * rows)
    expected = {"missing": "missing input 'ids'", "as texts": "must be a tensor",
                "as both": "both as a tensor and as texts"}[form]
    refused(wire, "Predict", request, expected)


field_numbers = st.one_of(st.integers(16, 18999), st.integers(20000, 2**29 - 1))  # 19000-19999: reserved
extra_fields = st.lists(st.tuples(field_numbers, st.sampled_from([0, 1, 2, 5]), st.binary(max_size=32)),
                        min_size=1, max_size=5)


@bounded(30)
@given(method=methods, top=extra_fields, nested=extra_fields, rows=rows_st, seed=seeds)
def test_unknown_fields_are_ignored(wire, method, top, nested, rows, seed):
    """Unknown fields, at the top level and inside a tensor, change nothing (forward compatibility)."""
    request = valid_request(method, wire.spec, rows, seed)
    request.MergeFromString(unknown_fields(top))
    inner = request.inputs.tensors["ids"] if method == "Predict" else request.question
    inner.MergeFromString(unknown_fields(nested))
    code, details, reply = wire.send(method, request)
    assert code == OK, f"{method}: {code.name}: {details}"
    assert_reply_matches(method, reply, in_process(wire.local, method, request))
    wire.check_still_serving()


offsets = st.one_of(st.integers(0, 24), st.integers(0, 10**6))  # half of them in the header: dtype, shape
edits = st.lists(st.tuples(st.sampled_from(["set", "insert", "delete", "truncate"]), offsets, st.integers(0, 255)),
                 min_size=1, max_size=3)


# Most edits leave bytes that do not parse, which this test skips (another tests them): expected
# filtering, which Hypothesis's health check would otherwise fail on in some test orders.
@bounded(120, HealthCheck.filter_too_much)
@given(method=methods, edits=edits, rows=st.integers(1, 4), seed=seeds)
def test_mutated_request_bytes_get_the_in_process_verdict(wire, method, edits, rows, seed):
    """Bytes of a valid request, edited: refused when the in-process adapter refuses them, else the same answer."""
    payload = mutate(valid_request(method, wire.spec, rows, seed).SerializeToString(), edits)
    try:
        request = REQUESTS[method].FromString(payload)
    except DecodeError:
        assume(False)  # bytes that do not parse: test_unparsable_request_bytes_are_invalid_argument
    expected = in_process(wire.local, method, request)
    if isinstance(expected, Exception):
        refused(wire, method, payload, codes=(INVALID, EXHAUSTED))
        return
    code, details, reply = wire.send(method, payload)
    STILL_VALID[method] += 1
    assert code == OK, f"{method}: {code.name}: {details} (the in-process adapter accepts it)"
    assert_reply_matches(method, reply, expected)
    wire.check_still_serving()


# -- server bugs found by the properties above (each on a fresh server, outside the tally) --------


@pytest.fixture
def fresh_server(mlp_teacher):
    with TeacherServer(mlp_teacher, small_config()) as server:
        yield server


def raw_call(server, method: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        method_call = channel.unary_unary(f"{SERVICE}/{method}", request_serializer=None,
                                          response_deserializer=None)
        code, details, _ = call(method_call, payload)
    return code, details


def assert_served_after(server, teacher) -> None:
    remote = RemoteTeacher(f"127.0.0.1:{server.port}", timeout_s=TIMEOUT_S)
    question = torch.randn(2, *teacher.spec.question_shape)
    assert torch.allclose(remote.answer(question).hidden, LocalTeacher(teacher).answer(question).hidden, atol=1e-6)
    remote.close()


@pytest.mark.parametrize("method, field, shape", [
    ("Answer", "question", [0, 2**63 - 1]),
    ("Answer", "question", [2**40, 2**40, 0]),
    ("AnswerVJP", "hidden_cotangent", [0, 2**62]),
    ("Predict", "ids", [0, 2**62]),
])
def test_zero_size_tensor_with_huge_dims_is_invalid_argument(fresh_server, mlp_teacher, method, field, shape):
    tensor = pb.Tensor(dtype="int64" if field == "ids" else "float32", shape=shape)  # no data: prod(shape) is 0
    request = with_tensor(method, field, tensor, mlp_teacher.spec, 2, 0)
    code, details = raw_call(fresh_server, method, request.SerializeToString())
    assert_served_after(fresh_server, mlp_teacher)
    assert code == INVALID, f"{code.name}: {details}"
    assert LABEL[field] in details


@pytest.mark.parametrize("method, payload", [
    ("Answer", b"\xff"),  # wire type 7 does not exist
    ("Answer", b"\x0a\x05\x0a\x03\xff\xfe\xfd"),  # question.dtype is not UTF-8
    ("AnswerVJP", b"\x0a\x01"),  # a length-delimited field cut short
    ("Predict", b"\x0a\x10\x0a\x0e\x0a\x03ids"),  # a map entry cut short
])
def test_unparsable_request_bytes_are_invalid_argument(fresh_server, mlp_teacher, method, payload):
    with pytest.raises(DecodeError):
        REQUESTS[method].FromString(payload)
    code, details = raw_call(fresh_server, method, payload)
    assert_served_after(fresh_server, mlp_teacher)
    assert code == INVALID, f"{code.name}: {details}"


@pytest.mark.parametrize("method, where, text, fragment", [
    ("Answer", "output_dtype", "\u00e9" * 3000, "output_dtype"),
    ("Predict", "input name", "\u2603" * 2000, "unknown input"),
    ("Answer", "question dtype", "x" * 20000, "unknown dtype"),
])
def test_long_strings_in_a_bad_request_still_get_a_clear_message(fresh_server, mlp_teacher, method, where, text,
                                                                 fragment):
    request = valid_request(method, mlp_teacher.spec, 2, 0)
    if where == "output_dtype":
        request.output_dtype = text
    elif where == "input name":
        request.inputs.texts[text].values.extend(["x", "y"])
    else:
        request.question.dtype = text
    code, details = raw_call(fresh_server, method, request.SerializeToString())
    assert_served_after(fresh_server, mlp_teacher)
    assert code == INVALID, f"{code.name}: {details}"
    assert fragment in details


# -- the tally -----------------------------------------------------------------------------------


def test_server_counter_agrees_with_what_the_client_saw(server, wire, capsys):
    """Every status the client saw is in the server's teacher_requests_total, and nothing else.

    Last in the file so that its summary covers the module; it holds whatever ran before it."""
    wire.check_still_serving()
    counted = {
        (sample.labels["method"], sample.labels["code"]): sample.value
        for metric in server.metrics.requests.collect() for sample in metric.samples
        if sample.name.endswith("_total") and sample.value
    }
    assert counted == dict(SEEN)
    assert not {code for _, code in SEEN} - {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
    n_bad = sum(BAD.values())
    with capsys.disabled():
        print(
            f"\nbad-input cases tried: {n_bad} (INVALID_ARGUMENT {BAD['INVALID_ARGUMENT']}, RESOURCE_EXHAUSTED "
            f"{BAD['RESOURCE_EXHAUSTED']}; {sum(REFUSED_BY_GRPC.values())} of them oversized, refused by gRPC "
            f"before the service); mutated requests still valid and answered: {sum(STILL_VALID.values())}; "
            f"correct answers after a bad request, equal to LocalTeacher's: {HEALTH_CHECKS['Answer']}; server counter: "
            + ", ".join(f"{m} {c} {int(v)}" for (m, c), v in sorted(counted.items()))
        )
