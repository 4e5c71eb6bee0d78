"""A tiny, atheris-independent reader for structured fuzz inputs, and its writer for seeds.

Reading past the end yields zeros, so every input is valid and short inputs mean "mostly
zeros": the harnesses stay deterministic and replayable without atheris (the mutation
check and the corpus replay use them the same way)."""

from __future__ import annotations


class Data:
    def __init__(self, raw: bytes) -> None:
        self.raw = bytes(raw)
        self.pos = 0

    def take(self, n: int) -> bytes:
        chunk = self.raw[self.pos:self.pos + n]
        self.pos += n
        return chunk + bytes(n - len(chunk))

    def _int(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def u8(self) -> int:
        return self._int(1)

    def u16(self) -> int:
        return self._int(2)

    def u32(self) -> int:
        return self._int(4)

    def u64(self) -> int:
        return self._int(8)

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def pick(self, options: list[str] | tuple[str, ...]) -> str:
        return options[self.u8() % len(options)]

    def blob(self, limit: int) -> bytes:
        """A length-prefixed byte string of at most `limit` bytes."""
        return self.take(self.u16() % (limit + 1))

    def rest(self) -> bytes:
        out = self.raw[self.pos:]
        self.pos = len(self.raw)
        return out

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.raw)


class Writer:
    """Builds inputs in the layout Data reads (for seed corpora)."""

    def __init__(self) -> None:
        self.out = bytearray()

    def _int(self, value: int, n: int) -> Writer:
        self.out += (value % (1 << (8 * n))).to_bytes(n, "little")
        return self

    def u8(self, v: int) -> Writer:
        return self._int(v, 1)

    def u16(self, v: int) -> Writer:
        return self._int(v, 2)

    def u32(self, v: int) -> Writer:
        return self._int(v, 4)

    def u64(self, v: int) -> Writer:
        return self._int(v, 8)

    def raw(self, b: bytes) -> Writer:
        self.out += b
        return self

    def blob(self, b: bytes) -> Writer:
        return self.u16(len(b)).raw(b)

    def bytes(self) -> bytes:
        return bytes(self.out)
