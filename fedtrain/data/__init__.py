"""Federated datasets: the protocol, on-disk stores (FedJAX/TFF formats), conversions, partitioners."""

from fedtrain.data.codec import CodecError, decode_examples, encode_examples
from fedtrain.data.convert import convert, describe, detect_format, load_npz, open_store, save_npz, to_memory, write_store
from fedtrain.data.federated_data import (
    ClientId,
    Examples,
    FederatedData,
    InMemoryFederatedData,
    UnknownClientError,
    from_arrays,
    num_examples_of,
)
from fedtrain.data.fedjax_sqlite import FedjaxSQLiteData, FedjaxSQLiteWriter, write_fedjax_sqlite
from fedtrain.data.store import FileStore, StoreError
from fedtrain.data.tff_hdf5 import TFFHDF5Data, TFFHDF5Writer, write_tff_hdf5
from fedtrain.data.tff_sqlite import TFFSQLiteData, TFFSQLiteWriter, write_tff_sqlite

__all__ = [
    "ClientId",
    "CodecError",
    "Examples",
    "FederatedData",
    "FedjaxSQLiteData",
    "FedjaxSQLiteWriter",
    "FileStore",
    "InMemoryFederatedData",
    "StoreError",
    "TFFHDF5Data",
    "TFFHDF5Writer",
    "TFFSQLiteData",
    "TFFSQLiteWriter",
    "UnknownClientError",
    "convert",
    "decode_examples",
    "describe",
    "detect_format",
    "encode_examples",
    "from_arrays",
    "load_npz",
    "num_examples_of",
    "open_store",
    "save_npz",
    "to_memory",
    "write_fedjax_sqlite",
    "write_store",
    "write_tff_hdf5",
    "write_tff_sqlite",
]
