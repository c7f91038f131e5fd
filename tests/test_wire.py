"""The tensor/binary wire codec (tokenizers_svc.wire) and errors as values (errors.error_from_dict):
what the client, the server and the batch job's rows send each other."""

from __future__ import annotations

import pytest
import torch

from tokenizers_svc import errors
from tokenizers_svc.wire import (
    LATENT_DTYPES,
    PIXEL_DTYPES,
    parse_shape,
    tensor_from_bytes,
    tensor_from_headers,
    tensor_headers,
    tensor_params,
    tensor_to_bytes,
)


@pytest.mark.parametrize("dtype", sorted(PIXEL_DTYPES))
def test_round_trip_every_dtype(dtype):
    source = (torch.rand(1, 3, 2, 5, 7) * 200).to(PIXEL_DTYPES[dtype])[..., ::2]  # not contiguous
    body = tensor_to_bytes(source)
    assert len(body) == source.numel() * source.element_size()
    back = tensor_from_bytes(
        body, parse_shape([tensor_params(source)["shape"]]), tensor_params(source)["dtype"]
    )
    assert back.dtype == source.dtype and torch.equal(back, source)
    assert torch.equal(tensor_from_headers(body, tensor_headers(source)), source)
    back += 1  # the decoded tensor owns writable memory


def test_bytes_are_little_endian_c_order():
    assert tensor_to_bytes(torch.tensor([[1, 256]], dtype=torch.int32), {"int32": torch.int32}) == bytes(
        [1, 0, 0, 0, 0, 1, 0, 0]
    )
    assert tensor_to_bytes(torch.tensor([1.0], dtype=torch.bfloat16)) == bytes([0x80, 0x3F])


def test_refusals_name_the_parameter():
    with pytest.raises(
        errors.ShapeMismatchError, match="body has 3 bytes; shape \\[1, 2\\] of float32 needs 8"
    ):
        tensor_from_bytes(b"abc", [1, 2], "float32")
    with pytest.raises(errors.DTypeMismatchError) as refused:
        tensor_from_bytes(b"\0" * 2, [2], "uint8", LATENT_DTYPES)
    assert refused.value.param == "dtype"
    with pytest.raises(errors.DTypeMismatchError):
        tensor_to_bytes(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(errors.InvalidRequestError):
        parse_shape([])
    with pytest.raises(errors.ShapeMismatchError):
        parse_shape(["1,0"])
    with pytest.raises(errors.InvalidRequestError):
        parse_shape(["1,x"])


@pytest.mark.parametrize("values", [["1,3,4"], ["[1, 3, 4]"], ["1", "3", "4"], ["(1,3,4)"]])
def test_shape_spellings(values):
    assert parse_shape(values) == [1, 3, 4]


def _all_error_classes() -> list[type[errors.TokenizerError]]:
    found, stack = [], [errors.TokenizerError]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return [cls for cls in found if cls not in (errors.TokenizerError, errors.HTTPError)]


@pytest.mark.parametrize("cls", _all_error_classes(), ids=lambda cls: cls.__name__)
def test_errors_cross_as_values(cls):
    error = cls("what was wrong", param="shape")
    back = errors.error_from_dict(error.to_dict())
    assert type(back) is cls
    assert (back.type, back.message, back.param, back.http_status) == (
        cls.type,
        "what was wrong",
        "shape",
        cls.http_status,
    )


def test_error_values_keep_retry_after_http_kinds_and_unknown_types():
    overloaded = errors.error_from_dict(errors.OverloadedError("busy").to_dict(), retry_after=7.0)
    assert isinstance(overloaded, errors.OverloadedError) and overloaded.retry_after == 7.0
    missing = errors.error_from_dict(errors.HTTPError(404, "Not Found").to_dict())
    assert (missing.type, missing.http_status) == ("not_found", 404)
    unknown = errors.error_from_dict({"type": "teapot", "message": "short and stout"}, status=418)
    assert (type(unknown), unknown.type, unknown.http_status) == (errors.TokenizerError, "teapot", 418)
