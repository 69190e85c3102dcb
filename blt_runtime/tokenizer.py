"""Bytes <-> model ids. BLT has no tokenizer: byte b is id b + 4, and four ids are special.

Owns the id layout (BOE=0, BOS=1, EOS=2, BPE=3, bytes from 4) and nothing else.
"""

from __future__ import annotations

import torch

BOE_ID = 0  # also the hash-window padding value
BOS_ID = 1
EOS_ID = 2
BPE_ID = 3
OFFSET = 4
NEVER_SAMPLED = (BOE_ID, BOS_ID, BPE_ID)


def encode(text_or_bytes: str | bytes | bytearray | list[int]) -> list[int]:
    """Prompt ids: BOS, then one id per UTF-8 byte. Never EOS.

    A str is encoded as UTF-8 (a lone surrogate raises UnicodeEncodeError); a list of ints is taken
    as raw bytes 0..255.
    """
    data = text_or_bytes.encode("utf-8") if isinstance(text_or_bytes, str) else bytes(text_or_bytes)
    return [BOS_ID] + [b + OFFSET for b in data]


def encode_tensor(text_or_bytes: str | bytes | bytearray | list[int], device=None) -> torch.Tensor:
    """`encode` as a LongTensor of shape (1, L) for the model's batch API."""
    return torch.tensor([encode(text_or_bytes)], dtype=torch.long, device=device)


def decode(ids: list[int]) -> bytes:
    """The bytes behind model ids; special ids carry no bytes and are dropped."""
    return bytes(i - OFFSET for i in ids if i >= OFFSET)
