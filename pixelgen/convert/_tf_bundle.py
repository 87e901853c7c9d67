"""Reads TensorFlow tensor-bundle checkpoints (`P.index` + `P.data-SSSSS-of-NNNNN`) without TF.

The format (tensorflow/core/util/tensor_bundle, tensorflow/core/lib/io/table*):
- `P.index` is an SSTable (LevelDB's table format, uncompressed): data blocks of sorted
  key/value entries, each block followed by a 1-byte compression type and a masked CRC32C; an
  index block of handles to them; a 48-byte footer ending in a magic number. Key '' holds a
  BundleHeaderProto (num_shards, endianness); every other key is a tensor name whose value is a
  BundleEntryProto (dtype, shape, shard_id, offset, size, crc32c).
- `P.data-SSSSS-of-NNNNN` hold the raw tensor bytes at those offsets.
Protos are decoded by hand (a few varint fields). Every checksum is verified: the index
blocks' and each tensor's (a masked CRC32C of its bytes), so a corrupt download is named.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct

import ml_dtypes
import numpy as np
from tensorboardX.record_writer import masked_crc32c  # LevelDB's mask, as in TFRecords

from pixelgen.config import ConfigError

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5  # compression type (1 byte) + masked crc32c (4 bytes)
NO_COMPRESSION = 0
HEADER_KEY = b''

# tensorflow/core/framework/types.proto DataType -> numpy (little-endian unless the header says
# BIG). Strings, resources and variants do not occur among model weights.
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
          9: np.int64, 10: np.bool_, 14: ml_dtypes.bfloat16, 17: np.uint16, 19: np.float16,
          22: np.uint32, 23: np.uint64}


# CRC32C (Castagnoli; bit-reflected polynomial). Pure Python manages about 10 MB/s, too slow
# for gigabytes of weights, so tensors are checked by the vectorised `crc32c` below.
CRC32C_POLY = 0x82F63B78


def _crc_tables() -> np.ndarray:
    """[4, 256] uint32: row k is the CRC of byte b followed by k zero bytes (slicing-by-4)."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(CRC32C_POLY), table >> 1)
    rows = [table.astype(np.uint32)]
    for _ in range(3):
        rows.append(rows[0][rows[-1] & 0xFF] ^ (rows[-1] >> 8))
    return np.stack(rows)


CRC_TABLES = _crc_tables()
BITS = np.arange(32, dtype=np.uint32)


def _gf2_apply(operator: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A linear map on CRC registers, given by its 32 columns (uint32), applied to `values`."""
    bits = ((values[..., None] >> BITS) & 1).astype(bool)  # [..., 32]
    return np.bitwise_xor.reduce(np.where(bits, operator, np.uint32(0)), axis=-1)


def _zeros_operator(num_bytes: int) -> np.ndarray:
    """The linear map that runs a CRC register over `num_bytes` zero bytes (by squaring)."""
    unit = (np.uint32(1) << BITS).astype(np.uint32)
    step = CRC_TABLES[0][unit & 0xFF] ^ (unit >> 8)  # one zero byte
    result = unit  # the identity
    while num_bytes:
        if num_bytes & 1:
            result = _gf2_apply(step, result)
        step = _gf2_apply(step, step)
        num_bytes >>= 1
    return result


def crc32c(data: np.ndarray) -> int:
    """CRC32C of uint8 `data`. The bytes are cut into equal chunks whose registers advance
    together, 4 bytes per numpy step; CRCs are linear over GF(2), so the chunks' CRCs then
    combine pairwise: crc(a + b) = shift_over_len(b)(crc(a)) ^ crc(b)."""
    data = np.ascontiguousarray(data, np.uint8).reshape(-1)
    chunk = 4096 if data.size >= 1 << 20 else 64
    leaves = 1 << (max(1, math.ceil(data.size / chunk)) - 1).bit_length()
    padded = np.zeros(leaves * chunk, np.uint8)
    padded[padded.size - data.size:] = data  # leading zeros leave a zero register at zero
    words = padded.view('<u4').reshape(leaves, chunk // 4).T.copy()  # [chunk / 4, leaves]
    t = CRC_TABLES
    state = np.zeros(leaves, np.uint32)
    for word in words:
        s = state ^ word
        state = t[3][s & 0xFF] ^ t[2][(s >> 8) & 0xFF] ^ t[1][(s >> 16) & 0xFF] ^ t[0][s >> 24]
    shift = _zeros_operator(chunk)
    while state.size > 1:
        state = _gf2_apply(shift, state[0::2]) ^ state[1::2]
        shift = _gf2_apply(shift, shift)
    # The register starts at 0xFFFFFFFF (carried over all the bytes) and ends inverted.
    start = _gf2_apply(_zeros_operator(data.size), np.array([0xFFFFFFFF], np.uint32))
    return int(start[0] ^ state[0]) ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """LevelDB's mask: rotate right by 15 and add a constant (as masked_crc32c does)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class BundleError(ConfigError):
    """The files are not a readable tensor bundle; the message names the file and the problem.
    (A ConfigError: the command line prints it without a traceback.)"""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decodes a base-128 varint at buf[pos]; returns (value, next position)."""
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise BundleError('truncated varint')
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of a protobuf message: ints for varint/fixed wire types,
    bytes for length-delimited ones."""
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from('<Q', buf, pos)[0], pos + 8
        elif wire == 5:
            value, pos = struct.unpack_from('<I', buf, pos)[0], pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise BundleError(f'unsupported protobuf wire type {wire}')
        fields.append((number, value))
    return fields


@dataclasses.dataclass(frozen=True)
class Entry:
    """A BundleEntryProto: where one tensor lies."""
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked
    sliced: bool  # a partitioned variable, stored as separate slices


def _parse_entry(value: bytes) -> Entry:
    fields = dict(dtype=0, shape=(), shard_id=0, offset=0, size=0, crc32c=0, sliced=False)
    for number, field in _proto_fields(value):
        if number == 1:
            fields['dtype'] = field
        elif number == 2:  # TensorShapeProto: repeated Dim dim = 2 { int64 size = 1 }
            fields['shape'] += tuple(
                next((v for n, v in _proto_fields(dim) if n == 1), 0)
                for n, dim in _proto_fields(field) if n == 2)
        elif number in (3, 4, 5, 6):
            fields[('shard_id', 'offset', 'size', 'crc32c')[number - 3]] = field
        elif number == 7:
            fields['sliced'] = True
    return Entry(**fields)


def _read_block(data: bytes, offset: int, size: int, path: str) -> bytes:
    """The contents of the block at `offset` (without its trailer), checksum verified."""
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(data):
        raise BundleError(f'{path}: a block at {offset}+{size} runs past the end of the file.')
    compression = data[end]
    (stored,) = struct.unpack_from('<I', data, end + 1)
    if masked_crc32c(data[offset:end + 1]) != stored:
        raise BundleError(f'{path}: checksum mismatch in the block at {offset}; the file is '
                          'corrupt (download it again).')
    if compression != NO_COMPRESSION:
        raise BundleError(f'{path}: block compression type {compression} is not supported '
                          '(TensorFlow writes bundle indexes uncompressed).')
    return data[offset:end]


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """Key/value pairs of a table block. Keys are prefix-compressed: each entry stores
    (shared prefix length, unshared length, value length, unshared key bytes, value)."""
    (num_restarts,) = struct.unpack_from('<I', block, len(block) - 4)
    limit = len(block) - 4 * (num_restarts + 1)
    entries, pos, key = [], 0, b''
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        entries.append((key, block[pos:pos + length]))
        pos += length
    return entries


def _handle(buf: bytes, pos: int = 0) -> tuple[int, int, int]:
    """A BlockHandle (varint64 offset, varint64 size) -> (offset, size, next position)."""
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return offset, size, pos


def read_index(path: str) -> tuple[dict, dict[str, Entry]]:
    """`P.index` -> (header {num_shards, big_endian}, {tensor name: Entry})."""
    with open(path, 'rb') as f:
        data = f.read()
    if len(data) < FOOTER_SIZE or struct.unpack_from('<Q', data, len(data) - 8)[0] != TABLE_MAGIC:
        raise BundleError(f'{path} is not a TensorFlow checkpoint index (no table magic number '
                          'at its end); pass the model.ckpt-*.index of a TF checkpoint.')
    footer = data[-FOOTER_SIZE:]
    _, _, pos = _handle(footer)  # the metaindex block: unused by bundles
    index_offset, index_size, _ = _handle(footer, pos)
    header, entries = None, {}
    for _, handle in _block_entries(_read_block(data, index_offset, index_size, path)):
        offset, size, _ = _handle(handle)
        for key, value in _block_entries(_read_block(data, offset, size, path)):
            if key == HEADER_KEY:
                fields = dict(_proto_fields(value))
                header = {'num_shards': fields.get(1, 1), 'big_endian': fields.get(2, 0) == 1}
            else:
                entries[key.decode('utf-8')] = _parse_entry(value)
    if header is None:
        raise BundleError(f'{path} has no bundle header entry; it is not a tensor bundle index.')
    return header, entries


class Bundle:
    """A TF checkpoint `prefix` (e.g. DIR/model.ckpt-1000000): names, shapes and tensors."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.header, self.entries = read_index(prefix + '.index')
        shards = self.header['num_shards']
        self.shard_paths = [f'{prefix}.data-{i:05d}-of-{shards:05d}' for i in range(shards)]
        missing = [p for p in self.shard_paths if not os.path.isfile(p)]
        if missing:
            raise BundleError(f'The checkpoint {prefix} has {shards} data shards but '
                              f'{len(missing)} are missing, e.g. {missing[0]}; download them all.')

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a numpy array (its stored dtype, native byte order)."""
        entry = self.entries[name]
        if entry.sliced:
            raise BundleError(f'{name} is a partitioned variable (stored in slices); '
                              'partitioned checkpoints are not supported.')
        if entry.dtype not in DTYPES:
            raise BundleError(f'{name} has TF dtype {entry.dtype}, not a numeric type this '
                              'reader knows.')
        dtype = np.dtype(DTYPES[entry.dtype]).newbyteorder(
            '>' if self.header['big_endian'] else '<')
        count = int(np.prod(entry.shape, dtype=np.int64))
        if count * dtype.itemsize != entry.size:
            raise BundleError(f'{name}: {entry.size} bytes stored for shape {entry.shape} of '
                              f'{dtype}; the index is inconsistent.')
        path = self.shard_paths[entry.shard_id]
        if entry.offset + entry.size > os.path.getsize(path):
            raise BundleError(f'{path} is shorter than the index says (it holds {name} at '
                              f'{entry.offset}+{entry.size}); the download is incomplete.')
        raw = np.fromfile(path, dtype=np.uint8, count=entry.size, offset=entry.offset)
        if mask_crc(crc32c(raw)) != entry.crc32c:
            raise BundleError(f'{name}: checksum mismatch in {path}; the file is corrupt '
                              '(download it again).')
        array = raw.view(dtype)
        return array.astype(dtype.newbyteorder('=')).reshape(entry.shape)
