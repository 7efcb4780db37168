"""The zero-copy reader of Flower ``Array`` bytes gives what ``Array.numpy()`` gives."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array

from fedspeech.federated.arrays import array_view


@pytest.mark.parametrize(
    "value",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        np.array(3.5),
        np.array([True, False, True]),
        np.zeros((0, 5), dtype=np.int64),
        np.ones(7, dtype=np.float16),
    ],
)
def test_array_view_equals_flowers_decoder_without_a_copy(value):
    array = Array(value)
    view, loaded = array_view(array), array.numpy()
    assert view.dtype == loaded.dtype and view.shape == loaded.shape
    assert np.array_equal(view, loaded)
    assert not view.flags.writeable  # it shares the reply's bytes
    if view.size:
        assert np.shares_memory(view, np.frombuffer(array.data, dtype=np.uint8))


def test_array_view_refuses_truncated_bytes():
    array = Array(np.arange(100, dtype=np.float32))
    array.data = array.data[:-4]
    with pytest.raises(ValueError, match="data bytes for shape"):
        array_view(array)


def test_array_view_refuses_object_arrays():
    array = Array(np.zeros(3, dtype=np.float32))
    header = np.lib.format.header_data_from_array_1_0(np.zeros(3, dtype=object))
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, header)
    array.data = stream.getvalue() + bytes(24)
    with pytest.raises(ValueError, match="object arrays"):
        array_view(array)
