"""tokenizers_svc.formats.read_safetensors_vector: small tensors read without torch."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tokenizers_svc.formats import read_safetensors_vector


def test_vectors_of_each_float_dtype_read_back(tmp_path):
    values = torch.tensor([0.5, -1.25, 3.0, 1e-3])
    tensors = {
        "f32": values,
        "f64": values.double(),
        "f16": values.half(),
        "bf16": values.bfloat16(),
        "matrix": values.reshape(2, 2).clone(),
        "ints": torch.arange(4),
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    for name in ("f32", "f64", "matrix"):
        assert read_safetensors_vector(path, name) == pytest.approx(values.tolist(), rel=1e-7), name
    for name in ("f16", "bf16"):  # exactly the stored (rounded) values
        assert read_safetensors_vector(path, name) == tuple(tensors[name].float().tolist()), name
    assert read_safetensors_vector(path, "ints") is None  # not a float dtype
    assert read_safetensors_vector(path, "absent") is None
    assert read_safetensors_vector(tmp_path / "missing.safetensors", "f32") is None
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00")
    assert read_safetensors_vector(tmp_path / "bad.safetensors", "f32") is None
