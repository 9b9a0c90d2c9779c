"""Byte-level BPE's alphabet (GPT-2's, which Llama 4's tokenizer.json uses): the printable symbol standing for each
byte in its vocabulary. A leaf module: the exporter writes tokenizers with it, the runtime reads a token's bytes."""

from __future__ import annotations


def _byte_symbols() -> dict[int, str]:
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:  # control bytes, space, and the few unprintable Latin-1 ones move past the byte range, in order
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


BYTE_SYMBOLS: dict[int, str] = _byte_symbols()
SYMBOL_BYTES: dict[str, int] = {s: b for b, s in BYTE_SYMBOLS.items()}
