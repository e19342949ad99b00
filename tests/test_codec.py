"""FedJAX msgpack codec: byte-for-byte against FedJAX's encoding rules, every dtype, bad blobs."""

import zlib

import ml_dtypes
import msgpack
import numpy as np
import pytest

from fedtrain.data import codec
from fedtrain.data.tf_example import ExampleParseError, parse_example, serialize_example


def fedjax_reference_pack(tree):
    """FedJAX's ``msgpack_serialize`` rules written out literally (fedjax/core/serialization.py).

    FedJAX tests ``np.issctype(type(x))`` before ``complex``; with the numpy it pins (1.26) that is
    true for Python ``complex``, so a Python complex is written as a numpy scalar (ext 3).
    """

    def nd(arr):
        return msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")), use_bin_type=True)

    def default(x):
        if isinstance(x, np.ndarray) and x.dtype.hasobject:
            return msgpack.ExtType(4, msgpack.packb((x.shape, list(x.flatten())), use_bin_type=True))
        if isinstance(x, np.ndarray):
            return msgpack.ExtType(1, nd(x))
        if isinstance(x, (np.generic, complex)):
            return msgpack.ExtType(3, nd(np.asarray(x)))
        return x

    return msgpack.packb(tree, default=default, strict_types=True)


DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_ndarray_bytes_match_fedjax(dtype):
    rng = np.random.default_rng(0)
    arr = (rng.normal(size=(3, 2, 4)) * 50).astype(dtype)
    tree = {"x": arr, "empty": np.zeros((0, 5), dtype)}
    blob = codec.msgpack_serialize(tree)
    assert blob == fedjax_reference_pack(tree)
    back = codec.msgpack_deserialize(blob)
    for k in tree:
        assert back[k].dtype == tree[k].dtype and back[k].shape == tree[k].shape
        np.testing.assert_array_equal(back[k], tree[k])


def test_bfloat16_scalars_complex_and_bytes_arrays():
    tree = {
        "bf": np.arange(6, dtype=ml_dtypes.bfloat16).reshape(2, 3),
        "snippets": np.array([b"to be", b"", b"\xff\x00 not utf-8"], dtype=object),
        "grid": np.array([[b"a", b"b"], [b"c", b"d"]], dtype=object),
        "scalar_f": np.float32(1.5), "scalar_i": np.int64(-7), "scalar_b": np.bool_(True),
        "native": [1, 2.5, "text", b"raw", None, True, 3 + 4j],
    }
    blob = codec.msgpack_serialize(tree)
    assert blob == fedjax_reference_pack(tree)
    back = codec.msgpack_deserialize(blob)
    assert back["bf"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(back["bf"].astype(np.float32), np.arange(6).reshape(2, 3))
    assert back["snippets"].dtype == object and list(back["snippets"]) == list(tree["snippets"])
    assert back["grid"].shape == (2, 2) and back["grid"][1, 0] == b"c"
    assert back["scalar_f"] == np.float32(1.5) and back["scalar_f"].dtype == np.float32
    assert back["scalar_i"].dtype == np.int64 and back["scalar_b"].dtype == np.bool_
    assert back["native"] == [1, 2.5, "text", b"raw", None, True, 3 + 4j]
    assert type(back["native"][-1]) is np.complex128
    # Ext 2 (native complex), which FedJAX can read but does not write, still decodes.
    ext2 = msgpack.packb([msgpack.ExtType(2, msgpack.packb((1.5, -2.0)))])
    assert codec.msgpack_deserialize(ext2) == [complex(1.5, -2.0)]


def test_golden_bytes():
    # Hand-assembled per the msgpack spec: fixmap{1}, fixstr "x", ext8(len, type 1, fixarray[[2], "int32", bin]).
    inner = b"\x93\x91\x02\xa5int32\xc4\x08" + np.array([1, 2], "<i4").tobytes()
    expected = b"\x81\xa1x\xc7" + bytes([len(inner)]) + b"\x01" + inner
    assert codec.msgpack_serialize({"x": np.array([1, 2], np.int32)}) == expected
    assert codec.encode_examples({"x": np.array([1, 2], np.int32)}) == zlib.compress(expected)


def test_big_endian_is_stored_little_endian():
    arr = np.arange(4, dtype=">i4")
    back = codec.decode_examples(codec.encode_examples({"x": arr}))["x"]
    np.testing.assert_array_equal(back, arr)
    assert back.dtype == np.dtype("<i4")


def test_rejects_what_fedjax_cannot_store():
    with pytest.raises(codec.CodecError, match="object arrays must hold bytes"):
        codec.msgpack_serialize({"t": np.array(["a", "b"], dtype=object)})
    with pytest.raises(codec.CodecError, match="fixed-width text"):
        codec.msgpack_serialize({"t": np.array(["a", "b"])})
    with pytest.raises(codec.CodecError, match="cannot encode"):
        codec.msgpack_serialize({"t": {1, 2}})


def test_corrupt_blobs():
    good = codec.encode_examples({"x": np.arange(10)})
    for bad in (b"", b"not zlib", good[: len(good) // 2], zlib.compress(b"\xc1"), zlib.compress(msgpack.packb([1]))):
        with pytest.raises(codec.CodecError):
            codec.decode_examples(bad)


def test_tf_example_round_trip_and_wire_format():
    feats = {"pixels": np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), "label": np.int64(-3),
             "big": np.array([0, 127, 128, 300, 2**40, -1]), "snippet": np.array([b"hi", b"\xff"], dtype=object)}
    blob = serialize_example(feats)
    parsed = parse_example(blob)
    np.testing.assert_array_equal(parsed["pixels"][1], feats["pixels"].ravel())
    assert parsed["label"][0] == 3 and list(parsed["label"][1]) == [-3]
    assert list(parsed["big"][1]) == [0, 127, 128, 300, 2**40, -1]
    assert parsed["snippet"] == (1, [b"hi", b"\xff"])
    # An unpacked int64 list (older writers) parses the same.
    unpacked = b"\x0a\x0e\x0a\x0c\x0a\x01y\x12\x07\x1a\x05\x08\x05\x08\xac\x02"
    assert list(parse_example(unpacked)["y"][1]) == [5, 300]
    with pytest.raises(ExampleParseError):
        parse_example(blob[:-3])


def test_object_array_codec_round_trip_without_pickle():
    ragged = np.empty(3, dtype=object)
    ragged[:] = [np.arange(3, dtype=np.int16), np.zeros((0, 2)), np.array([1.5], np.float32)]
    mixed = np.array([[b"\xff", "t\u00e9xt"], [None, 3], [2.5, True]], dtype=object)
    for arr in (ragged, mixed, np.empty((0, 4), dtype=object), np.array([np.str_("a"), np.bytes_(b"b")], object)):
        back = codec.decode_object_array(codec.encode_object_array(arr))
        assert back.dtype == object and back.shape == arr.shape
        for a, b in zip(back.ravel(), arr.ravel()):
            if isinstance(b, np.ndarray):
                assert a.dtype == b.dtype and np.array_equal(a, b)
            else:
                assert a == b and type(a) is type(b.item() if isinstance(b, (np.str_, np.bytes_)) else b)
    with pytest.raises(codec.CodecError, match="without pickle"):
        codec.encode_object_array(np.array([{1, 2}], dtype=object))
    with pytest.raises(codec.CodecError, match="dtype=object"):
        codec.encode_object_array(np.arange(3))


def test_declared_shapes_and_dtypes_are_checked_before_use():
    def blob(ext):
        return msgpack.packb({"x": ext})

    def nd(shape, dtype, buffer):
        return msgpack.ExtType(1, msgpack.packb((shape, dtype, buffer), use_bin_type=True))

    for ext, match in [(nd([3], "int32", b"\x00" * 8), r"declares shape \(3,\) of int32 \(12 bytes\) but holds 8"),
                       (nd([2**40, 2**40], "uint8", b""), "declares shape"),
                       (nd([2], "O", b"\x00" * 16), "holds Python objects"),
                       (nd([1], "i4,O", b"\x00" * 12), "holds Python objects"),
                       (nd([1], "no such dtype", b""), "unknown dtype name"),
                       (nd("12", "int32", b"\x00" * 8), "not a list of non-negative ints"),
                       (msgpack.ExtType(4, msgpack.packb(([3], [b"a", b"b"]))), "holds 3 items but the data holds 2"),
                       (msgpack.ExtType(4, msgpack.packb(([1], [[b"a"]]))), "must hold a list of bytes")]:
        with pytest.raises(codec.CodecError, match=match):
            codec.msgpack_deserialize(blob(ext))
    for bad in (b"\xc1", msgpack.packb([1]), msgpack.packb({"shape": [3], "items": [1]}),
                msgpack.packb({"shape": [1], "items": [1], "extra": 0})):
        with pytest.raises(codec.CodecError):
            codec.decode_object_array(bad)
