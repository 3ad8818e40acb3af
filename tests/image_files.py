"""Hand-made image files for the decoding tests (what Pillow would refuse to write)."""

from __future__ import annotations

import struct
import zlib


def png_declaring(width: int, height: int, stub_bytes: int = 1024) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb when large);
    its pixel data is `stub_bytes` zero bytes, compressed."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * stub_bytes)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
