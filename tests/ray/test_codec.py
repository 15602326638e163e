"""The bodies ``pyrys serve`` reads and answers: .npy, .npz and JSON, never pickle, bad ones refused by name."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from pyrys import InputError
from pyrys.ray.codec import JSON, NPY, NPZ, decode, encode, named_leaves


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npz(*arrays, **named) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays, **named)
    return buffer.getvalue()


def test_an_npy_body_is_the_one_input_and_keeps_its_dtype():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    request = decode(_npy(x))
    assert request.form == NPY and len(request.inputs) == 1
    assert request.inputs[0].dtype == torch.float32 and np.array_equal(request.inputs[0].numpy(), x)
    request.inputs[0].add_(1)  # writable: torch does not warn, the body's bytes are not shared


def test_an_npz_body_gives_the_inputs_in_the_order_they_were_written():
    ids, mask = np.arange(6).reshape(1, 6), np.ones((1, 6), dtype=np.int64)
    assert [t.tolist() for t in decode(_npz(ids=ids, mask=mask)).inputs] == [ids.tolist(), mask.tolist()]
    assert [t.tolist() for t in decode(_npz(mask, ids)).inputs] == [mask.tolist(), ids.tolist()]
    assert decode(_npz(ids)).form == NPZ


def test_fortran_order_and_big_endian_arrays_arrive_as_the_same_values():
    x = np.asfortranarray(np.random.default_rng(0).random((3, 5)).astype(">f4"))
    (tensor,) = decode(_npy(x)).inputs
    assert tensor.dtype == torch.float32 and np.array_equal(tensor.numpy(), x.astype(np.float32))


def test_json_numbers_take_the_inputs_dtypes():
    (x,) = decode(b"[[1, 2], [3, 4]]", [torch.float32]).inputs
    assert x.dtype == torch.float32 and x.tolist() == [[1, 2], [3, 4]]
    ids, mask = decode(json.dumps({"inputs": [[[5, 6]], [[1, 0]]]}).encode(), [torch.int64, torch.int64]).inputs
    assert ids.dtype == mask.dtype == torch.int64 and ids.tolist() == [[5, 6]]
    assert decode(b"[1.5]").inputs[0].dtype == torch.float64  # no dtype known: numpy's


@pytest.mark.parametrize("body, dtypes, says", [
    (b"hello", [], "expected a body in .npy"),
    (b"", [], "got 0 bytes"),
    (b"[1, 2", [], "JSON body cannot be read"),
    (b"[[1, 2], [3]]", [], "rectangular nested list"),
    (b'["a", "b"]', [], "rectangular nested list of numbers"),
    (b'{"x": [1]}', [], '{"inputs": [first, second, ...]}'),
    (b'{"inputs": []}', [], '{"inputs": [first, second, ...]}'),
    (b"[1.5, 2]", [torch.int64], "must hold values of torch.int64"),
    (b"\x93NUMPY\x01\x00garbage", [], ".npy body cannot be read"),
    (b"PK\x03\x04garbage", [], ".npz body cannot be read"),
])
def test_a_bad_body_is_an_input_error_saying_what_was_expected(body, dtypes, says):
    with pytest.raises(InputError) as error:
        decode(body, dtypes)
    assert says in str(error.value)


def test_an_object_array_is_refused_not_unpickled():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="cannot be read"):
        decode(buffer.getvalue())


def test_arrays_of_strings_are_refused_by_dtype():
    with pytest.raises(InputError, match="numbers or booleans"):
        decode(_npy(np.array(["a", "b"])))


def test_the_answer_takes_the_requests_form():
    y = torch.arange(6.0).reshape(2, 3)
    body, content_type = encode(y, NPY)
    assert content_type == "application/x-npy" and np.array_equal(np.load(io.BytesIO(body)), y.numpy())
    body, content_type = encode((y, {"logits": y + 1}), NPY)
    with np.load(io.BytesIO(body)) as archive:
        assert content_type == "application/x-npz" and archive.files == ["0", "1.logits"]
        assert np.array_equal(archive["1.logits"], (y + 1).numpy())
    body, content_type = encode(y, JSON)
    assert content_type == "application/json" and json.loads(body) == y.tolist()
    assert json.loads(encode((y, y), JSON)[0]) == {"0": y.tolist(), "1": y.tolist()}


def test_bfloat16_outputs_are_answered_as_float32():
    body, _ = encode(torch.ones(2, dtype=torch.bfloat16), NPY)
    assert np.load(io.BytesIO(body)).dtype == np.float32


def test_leaves_are_named_by_their_place():
    assert [n for n, _ in named_leaves(torch.ones(1))] == [""]
    assert [n for n, _ in named_leaves({"a": (torch.ones(1), torch.ones(1))})] == ["a.0", "a.1"]
