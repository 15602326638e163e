"""The bodies ``pyrys serve`` reads and answers: .npy, .npz and JSON, never pickle, bad ones refused by name."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch

from pyrys import InputError
from pyrys.ray.codec import JSON, NPY, NPZ, RequestTooLarge, decode, encode, named_leaves


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npz(*arrays, **named) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays, **named)
    return buffer.getvalue()


def test_an_npy_body_is_the_one_input_and_keeps_its_dtype_and_shape():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    request = decode(_npy(x))
    assert request.form == NPY and len(request.inputs) == 1
    assert request.inputs[0].dtype == torch.float32 and np.array_equal(request.inputs[0].numpy(), x)
    assert request.inputs[0].numpy().flags.writeable  # torch.from_numpy of a read-only array would warn
    assert decode(_npy(np.float32(2.5))).inputs[0].shape == ()  # a 0-d array stays 0-d


def test_an_npz_body_gives_the_inputs_by_position():
    arrays = [np.full((1, 2), i, dtype=np.int64) for i in range(12)]
    assert [int(t[0, 0]) for t in decode(_npz(*arrays)).inputs] == list(range(12))  # arr_10 after arr_9
    ids, mask = np.arange(6).reshape(1, 6), np.ones((1, 6), dtype=np.int64)
    assert [t.tolist() for t in decode(_npz(arr_1=mask, arr_0=ids)).inputs] == [ids.tolist(), mask.tolist()]
    assert decode(_npz(ids)).form == NPZ


def test_npz_names_that_do_not_say_the_position_are_refused():
    ids, mask = np.arange(6).reshape(1, 6), np.ones((1, 6), dtype=np.int64)
    with pytest.raises(InputError, match=r"by position, arrays named arr_0.*\['ids', 'mask'\]"):
        decode(_npz(ids=ids, mask=mask))
    with pytest.raises(InputError, match="by position"):
        decode(_npz(ids, arr_2=mask))


def test_a_float32_array_for_a_bfloat16_input_is_rounded_to_it():
    (x,) = decode(_npy(np.ones((1, 2), np.float32)), [torch.bfloat16]).inputs
    assert x.dtype == torch.bfloat16
    assert decode(_npy(np.ones(2, np.float64)), [torch.bfloat16]).inputs[0].dtype == torch.float64  # refused later


def test_fortran_order_and_big_endian_arrays_arrive_as_the_same_values():
    x = np.asfortranarray(np.random.default_rng(0).random((3, 5)).astype(">f4"))
    (tensor,) = decode(_npy(x)).inputs
    assert tensor.dtype == torch.float32 and np.array_equal(tensor.numpy(), x.astype(np.float32))


def test_a_complex_input_s_json_numbers_are_real_and_imaginary_pairs_and_other_refusals_say_what_is_wrong():
    """Pairs decoded as an int64 tensor with one more dim; ``{"inputs": []}`` was refused naming its keys, which
    were right (a helper's finds)."""
    (z,) = decode(b"[[[1, 2], [3.5, -4]]]", [torch.complex64]).inputs
    assert z.dtype == torch.complex64 and z.tolist() == [[1 + 2j, 3.5 - 4j]]
    with pytest.raises(InputError, match="a \\[real, imaginary\\] pair of numbers, got a list of shape \\[1, 3\\]"):
        decode(b"[[1, 2, 3]]", [torch.complex64])
    with pytest.raises(InputError, match="pair of numbers, got a list of shape \\[1, 2\\] of bool values"):
        decode(b"[[true, false]]", [torch.complex64])
    with pytest.raises(InputError, match="beyond the range of torch.float32"):  # (it became inf+0j; a review's find)
        decode(b"[[1e40, 0.0]]", [torch.complex64])
    for body, says in ((b'{"inputs": []}', "got an empty list"), (b'{"inputs": "x"}', "got a str there"),
                       (b'{"input": [1]}', "got keys \\['input'\\]")):
        with pytest.raises(InputError, match=says):
            decode(body, [torch.float32])


def test_json_numbers_take_the_inputs_dtypes():
    (x,) = decode(b"[[1, 2], [3, 4]]", [torch.float32]).inputs
    assert x.dtype == torch.float32 and x.tolist() == [[1, 2], [3, 4]]
    ids, mask = decode(json.dumps({"inputs": [[[5, 6]], [[1, 0]]]}).encode(), [torch.int64, torch.int64]).inputs
    assert ids.dtype == mask.dtype == torch.int64 and ids.tolist() == [[5, 6]]
    assert decode(b"[1.5]").inputs[0].dtype == torch.float64  # no dtype known: numpy's
    (ids,) = decode(b"[[9007199254740993, 1.0]]", [torch.int64]).inputs  # 2**53 + 1 beside a float: not rounded
    assert ids.tolist() == [[9007199254740993, 1]]
    for least in (b"[-9223372036854775808]", b"[-9223372036854775808, 1.0]"):  # int64's least, with a float too
        assert decode(least, [torch.int64]).inputs[0].tolist()[0] == -2 ** 63


@pytest.mark.parametrize("body, dtypes, says", [
    (b"hello", [], "expected a body in .npy"),
    (b"", [], "got 0 bytes"),
    (b"[1, 2", [], "JSON body cannot be read"),
    (b"[[1, 2], [3]]", [], "rectangular nested list"),
    (b'["a", "b"]', [], "rectangular nested list of numbers"),
    (b'{"x": [1]}', [], '{"inputs": [first, second, ...]}'),
    (b'{"inputs": []}', [], '{"inputs": [first, second, ...]}'),
    (b"[1.5, 2]", [torch.int64], "must hold values of torch.int64"),
    (b"[1180591620717411303424, 2]", [torch.int64], "an integer too large for 64 bits"),
    (b"[9223372036854775808]", [torch.int64], "an integer too large for 64 bits"),
    (b"[9223372036854775808, 1.0]", [torch.int64], "an integer too large for 64 bits"),
    (b"[2.5, 1]", [torch.int64], "must hold values of torch.int64"),
    (b"[[1e40, 2.0]]", [torch.float32], "beyond the range of torch.float32"),  # it was inf
    (b"[[100000.0]]", [torch.float16], "beyond the range of torch.float16"),
    (b"[[70000]]", [torch.float16], "beyond the range of torch.float16"),  # an integer became inf (a helper's find)
    (b"[[1e400]]", [torch.float32], "1e400 is beyond float64's range"),
    (b"\x93NUMPY\x01\x00garbage", [], ".npy body cannot be read"),
    (b"PK\x03\x04garbage", [], ".npz body cannot be read"),
])
def test_a_bad_body_is_an_input_error_saying_what_was_expected(body, dtypes, says):
    with pytest.raises(InputError) as error:
        decode(body, dtypes)
    assert says in str(error.value)


def _zip(**members: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _npy_header(shape: tuple, dtype: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _open_bracket_npy() -> bytes:
    """A .npy body whose header's shape is ``(2, 4 `` (numpy's parser raised tokenize.TokenError: an answer of
    500, not 400; a helper's find)."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 4), np.float32))
    return buffer.getvalue().replace(b"(2, 4)", b"(2, 4 ")


@pytest.mark.parametrize("body", [_open_bracket_npy(), _zip(**{"arr_0.npy": _open_bracket_npy()})],
                         ids=["npy", "npz"])
def test_a_npy_header_with_an_open_bracket_is_an_input_error(body):
    with pytest.raises(InputError, match="the .npy body cannot be read|the .npz body's arr_0 cannot be read"):
        decode(body, [torch.float32])


@pytest.mark.parametrize("body, says", [
    (_npy_header((10**6, 10**6)) + b"\0" * 64, r"declares shape \(1000000, 1000000\)"),
    (_zip(**{"arr_0.npy": _npy_header((1 << 40,))}), "declares shape"),
    (_zip(**{"arr_0.npy": b"not an array"}), "cannot be read"),
    (b"[" * 100000 + b"]" * 100000, "JSON"),
    (_zip(**{"arr_0.npy": _npy_header((1,)) + b"\0" * 4, "arr_0": _npy_header((1,)) + b"\0" * 4}), "names an input twice"),
], ids=["npy-header", "npz-header", "npz-member", "deep-json", "npz-twice"])
def test_a_body_that_lies_about_its_size_or_nests_too_deep_is_an_input_error(body, says):
    with pytest.raises(InputError, match=says):
        decode(body)


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
    body, content_type = encode((y, {"logits": y + 1, "file": y}), NPY)  # "file": savez's own argument's name
    with np.load(io.BytesIO(body), allow_pickle=False) as archive:
        assert content_type == "application/x-npz" and archive.files == ["0", "1.logits", "1.file"]
        assert np.array_equal(archive["1.logits"], (y + 1).numpy())
    body, content_type = encode(y, JSON)
    assert content_type == "application/json" and json.loads(body) == y.tolist()
    assert json.loads(encode((y, y), JSON)[0]) == {"0": y.tolist(), "1": y.tolist()}


def test_bfloat16_outputs_are_answered_as_float32_and_lazy_negation_is_applied():
    body, _ = encode(torch.ones(2, dtype=torch.bfloat16), NPY)
    assert np.load(io.BytesIO(body)).dtype == np.float32
    body, _ = encode(torch._neg_view(torch.ones(2)), NPY)
    assert np.load(io.BytesIO(body)).tolist() == [-1.0, -1.0]


def test_complex_outputs_in_json_are_real_imaginary_pairs():
    assert json.loads(encode(torch.tensor([1 + 2j]), JSON)[0]) == [[1.0, 2.0]]


def test_leaves_are_named_by_their_place():
    assert [n for n, _ in named_leaves(torch.ones(1))] == [""]
    assert [n for n, _ in named_leaves({"a": (torch.ones(1), torch.ones(1))})] == ["a.0", "a.1"]


def test_a_body_or_what_it_decompresses_to_beyond_the_limit_is_refused_before_it_is_read():
    """0.5 MB of savez_compressed zeros decoded to 499 MB before the model ran on 650,000 rows."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, np.zeros((4096, 3, 8, 8), np.float32))
    body = buffer.getvalue()
    assert len(body) < 2**16
    with pytest.raises(RequestTooLarge, match="the .npz body decompressed is 3145856 bytes, beyond this server's limit"):
        decode(body, max_bytes=2**20)
    with pytest.raises(RequestTooLarge, match="the body is"):
        decode(_npy(np.zeros(2**18, np.float32)), max_bytes=2**20)
    assert decode(body).inputs[0].shape == (4096, 3, 8, 8)  # within the default limit


def test_outputs_whose_places_read_alike_keep_distinct_names():
    """A helper's fuzz: ``{"c.d": a, "c": {"d": b}}`` named both ``c.d``: the .npz answer held two members of
    one name (np.load kept one), the JSON answer one key."""
    outputs = {"a_b": torch.ones(1), "c.d": torch.full((1,), 3.0), "c": {"d": torch.full((1,), 4.0)}}
    assert [name for name, _ in named_leaves(outputs)] == ["a_b", "c.d", "c.d~1"]
    body, _ = encode(outputs, "npz")
    assert {k: float(v[0]) for k, v in np.load(io.BytesIO(body)).items()} == {"a_b": 1.0, "c.d": 3.0, "c.d~1": 4.0}
    assert json.loads(encode(outputs, "json")[0]) == {"a_b": [1.0], "c.d": [3.0], "c.d~1": [4.0]}
