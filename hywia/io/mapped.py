"""Hand back the memory of weights that surgery replaced, when they were read from a memory-mapped file.

transformers loads safetensors weights as views into a private memory map of the file: a page becomes resident
when first read, and one that compensation edits in place becomes the process's own copy. Those pages belong to the
mapping, not to the tensors, so dropping a replaced tensor frees none of them while any other tensor of the file
(the embeddings, the unpruned layers) keeps the mapping alive: after the cut the process would hold the old and the
new tensors of every pruned layer (issue 18 measured ~250 MB on SmolLM2). `released_when_replaced` tells the kernel
(madvise MADV_DONTNEED) that the replaced tensors' whole pages are no longer needed. In a private file mapping that
only drops them: a later read would see the file's bytes again, never another tensor's.

Only tensors nobody else holds are released (no other Python reference to the parameter, no other user of its
storage), and only inside private file mappings; elsewhere (other systems, anonymous memory, offloaded weights
already moved) nothing happens.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..measure import LIBC

MADV_DONTNEED = 4


def _load_madvise():
    madvise = getattr(LIBC, "madvise", None) if sys.platform.startswith("linux") else None
    if madvise is not None:
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _load_madvise()


def private_file_mappings() -> list[tuple[int, int]]:
    """(start, end) of every private mapping of a regular file in this process (empty where unknown)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].endswith("p") and fields[4] != "0" and fields[5].startswith("/"):
            start, end = (int(value, 16) for value in fields[0].split("-"))
            spans.append((start, end))
    return spans


def release_pages(tensor: torch.Tensor, spans: list[tuple[int, int]]) -> int:
    """Drop the whole pages of `tensor`'s memory that lie in one of the private file mappings `spans`; returns the
    bytes released. The caller guarantees that nothing reads the tensor again."""
    if _MADVISE is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    start = tensor.untyped_storage().data_ptr()
    end = start + tensor.untyped_storage().nbytes()
    if not any(low <= start and end <= high for low, high in spans):
        return 0
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first or _MADVISE(first, last - first, MADV_DONTNEED) != 0:
        return 0
    return last - first


def _held_by_caller_alone(param: torch.Tensor) -> bool:
    """Whether the caller's one reference is the only one to `param`, and `param` the only user of its storage."""
    # getrefcount sees the caller's reference, this frame's argument and its own argument.
    if sys.getrefcount(param) > 3:
        return False
    use_count = getattr(torch._C, "_storage_Use_Count", None)  # the temporary storage object below counts once
    return use_count is None or use_count(param.untyped_storage()._cdata) <= 2


@contextmanager
def released_when_replaced(module: nn.Module) -> Iterator[None]:
    """Around an edit of `module` that swaps its parameters for new tensors: afterwards, the memory-mapped pages of
    every parameter that was replaced and is held by nobody else are released (module docstring)."""
    before = dict(module.named_parameters(remove_duplicate=False))
    yield
    kept_objects = {id(p) for p in module.parameters()}
    kept_memory = {p.untyped_storage().data_ptr() for p in module.parameters()}
    spans = private_file_mappings()
    if not spans:
        return
    for name in list(before):
        param = before.pop(name)
        if id(param) in kept_objects or param.untyped_storage().data_ptr() in kept_memory:
            continue
        if _held_by_caller_alone(param):
            release_pages(param, spans)
        del param
