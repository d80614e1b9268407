"""Tensors on the wire: exact round trips and clear errors for malformed messages."""

import numpy as np
import pytest
import torch

from ddistill.teacher.v1 import teacher_pb2 as pb
from services.teacher_server.codec import DTYPES, WireError, decode, decode_inputs, encode, encode_inputs, is_set


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_round_trip_every_dtype(dtype):
    torch_dtype = DTYPES[dtype][1]
    source = (torch.randn(3, 5, 2) * 7)
    tensor = source.to(torch_dtype)
    message = encode(tensor)
    assert message.dtype == dtype and list(message.shape) == [3, 5, 2]
    assert len(message.data) == tensor.numel() * tensor.element_size()
    back = decode(message)
    assert back.dtype == torch_dtype and torch.equal(back, tensor)


def test_bytes_are_little_endian_c_order():
    message = encode(torch.tensor([[1.0, 2.0]], dtype=torch.float32))
    assert message.data == np.array([1.0, 2.0], dtype="<f4").tobytes()


def test_bfloat16_travels_as_its_bit_pattern():
    tensor = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    message = encode(tensor)
    assert len(message.data) == 6
    assert torch.equal(decode(message), tensor)


def test_encode_casts_and_accepts_numpy():
    message = encode(np.arange(6, dtype=np.float64).reshape(2, 3), "float16")
    assert message.dtype == "float16"
    assert torch.equal(decode(message), torch.arange(6, dtype=torch.float16).reshape(2, 3))


def test_decoded_tensor_is_writable_and_independent():
    message = encode(torch.ones(4))
    tensor = decode(message)
    tensor += 1  # would fail or corrupt the message if it were a read-only view
    assert torch.equal(decode(message), torch.ones(4))


def test_empty_tensor_round_trips():
    assert decode(encode(torch.zeros(0, 7))).shape == (0, 7)


@pytest.mark.parametrize(
    "message, fragment",
    [
        (pb.Tensor(dtype="float128", shape=[1], data=b"\0" * 16), "unknown dtype 'float128'"),
        (pb.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 20), "needs 24 bytes, got 20"),
        (pb.Tensor(dtype="float32", shape=[-1, 3], data=b""), "negative dimension"),
        (pb.Tensor(dtype="float32", shape=[1] * 9, data=b"\0" * 4), "9 dimensions"),
        (pb.Tensor(dtype="", shape=[1], data=b"\0" * 4), "unknown dtype ''"),
    ],
)
def test_malformed_tensors_name_the_problem(message, fragment):
    with pytest.raises(WireError, match="question") as info:
        decode(message, "question")
    assert fragment in str(info.value)


def test_is_set_tells_absent_fields_from_empty_tensors():
    request = pb.AnswerVJPRequest()
    assert not is_set(request.hidden_cotangent)
    request.hidden_cotangent.CopyFrom(encode(torch.zeros(0, 3)))
    assert is_set(request.hidden_cotangent)


def test_inputs_round_trip_texts_and_tensors():
    inputs = {"text": ["a", "bé"], "ids": torch.tensor([[1, 2], [3, 4]])}
    back = decode_inputs(encode_inputs(inputs))
    assert back["text"] == ["a", "bé"] and torch.equal(back["ids"], inputs["ids"])


def test_inputs_with_one_name_twice_are_rejected():
    message = encode_inputs({"x": ["a"]})
    message.tensors["x"].CopyFrom(encode(torch.zeros(1)))
    with pytest.raises(WireError, match="both as a tensor and as texts"):
        decode_inputs(message)
