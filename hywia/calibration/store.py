"""Per-sample tensors that wait between the passes of a calibration run: in host memory or on disk."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import tempfiles

STORES = ("auto", "memory", "disk")


class ActivationStore:
    """Per-sample tensors by (key, sample): in host memory, or in one file per key in a temporary folder.

    On disk the tensors cost no process memory beyond the one being read, which is what lets the pass stay within
    a fraction of the model's own memory on a CPU, where host memory is the device memory.
    """

    def __init__(self, on_disk: bool) -> None:
        self.folder = tempfiles.temp_dir("activations") if on_disk else None
        self._memory: dict[tuple, torch.Tensor] = {}
        self._files: dict[object, tuple] = {}

    def put(self, key: object, index: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu", copy=True)  # a copy: the model may reuse the memory it came from
        if self.folder is None:
            self._memory[(key, index)] = tensor
            return
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        handle, entries = self._file(key)
        entry = entries.get(index)
        offset = entry[0] if entry is not None and entry[3] == raw.nbytes else handle.seek(0, 2)
        handle.seek(offset)
        handle.write(memoryview(raw))
        entries[index] = (offset, tensor.shape, tensor.dtype, raw.nbytes)

    def get(self, key: object, index: int, device: torch.device) -> torch.Tensor:
        if self.folder is None:
            return self._memory[(key, index)].to(device).detach()
        handle, entries = self._files[key]
        offset, shape, dtype, nbytes = entries[index]
        buffer = bytearray(nbytes)
        handle.seek(offset)
        handle.readinto(buffer)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape).to(device)

    def drop(self, key: object) -> None:
        for item in [item for item in self._memory if item[0] == key]:
            del self._memory[item]
        if key in self._files:
            handle, _ = self._files.pop(key)
            handle.close()
            Path(handle.name).unlink()

    def close(self) -> None:
        for key in list(self._files):
            self.drop(key)
        self._memory.clear()
        if self.folder is not None:
            tempfiles.release(self.folder)

    def _file(self, key: object) -> tuple:
        if key not in self._files:
            self._files[key] = (open(self.folder / f"{key}.bin", "w+b"), {})
        return self._files[key]
