"""Read slices of a safetensors checkpoint without loading whole tensors.

Files are memory-mapped (safetensors ``safe_open``) and only the rows/columns a
rank owns are materialised, so a rank never holds the whole checkpoint. The reader
remembers which tensors were read (or marked used: other ranks' shares), so a load
can fail on tensors nothing read -- weights of something raymoe does not implement.

FP8 checkpoints (``fp8_block``): a float8_e4m3fn ``X.weight`` with a float32
``X.weight_scale_inv`` holding one scale per [rows, columns] block is read dequantised
(weight x its block's scale), the slice's blocks only, so every layer sees ordinary
weights; ``read_weight`` keeps a projection's slice in FP8 with its scales for the FP8
kernels (fp8.py).
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Optional, Sequence

import torch
from safetensors import safe_open

from raymoe.actors.models.fp8 import FP8, WeightSlice


class CheckpointReader:
    def __init__(self, checkpoint_dir: str | pathlib.Path, fp8_block: Optional[tuple[int, int]] = None) -> None:
        self.dir = pathlib.Path(checkpoint_dir)
        self.fp8_block = fp8_block
        self.file_of: dict[str, pathlib.Path] = _index(self.dir)
        self._open: dict[pathlib.Path, object] = {}
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def read(
        self,
        name: str,
        dim: Optional[int] = None,
        start: int = 0,
        stop: Optional[int] = None,
        *,
        dtype: Optional[torch.dtype] = None,
        size: Optional[int] = None,
    ) -> torch.Tensor:
        """Tensor ``name``, or only ``[start, stop)`` along ``dim``; cast to ``dtype``. ``size``:
        the tensor's whole length along ``dim`` in the model config.json describes (a slice of a
        tensor of another shape would load part of other weights without an error)."""
        t, dim, start, stop = self._slice(name, dim, start, stop, size)
        if t.dtype == FP8:
            t = self._dequantised(name, t, dim, start, stop)
        return t.to(dtype) if dtype is not None else t

    def read_weight(
        self,
        name: str,
        dim: Optional[int] = None,
        start: int = 0,
        stop: Optional[int] = None,
        *,
        fp8_block: Optional[tuple[int, int]] = None,
        size: Optional[int] = None,
    ) -> WeightSlice:
        """A projection weight's slice, as ``read`` (``size`` too); with ``fp8_block``, an FP8
        checkpoint's weight stays in FP8 with its block scales (``WeightSlice``; the slice must
        start on a block boundary, and end on one or at the tensor's end), any other as stored."""
        t, dim, start, stop = self._slice(name, dim, start, stop, size)
        if t.dtype != FP8:
            if fp8_block is not None and self.fp8_block is not None:
                raise ValueError(
                    f"checkpoint {self.dir}: {name} is {t.dtype}, not float8, though config.json's "
                    "quantization_config.modules_to_not_convert does not name it; raymoe would quantise it "
                    "with every other projection, unlike the checkpoint: set model.quantization: none"
                )
            return WeightSlice(t)
        scales = self._scales(name, t)
        if fp8_block is None:
            return WeightSlice(self._dequantised(name, t, dim, start, stop))
        b, length = fp8_block[dim], self.shape(name)[dim]
        if start % b or (stop % b and stop != length) or self.fp8_block != tuple(fp8_block):
            raise ValueError(
                f"checkpoint {self.dir}: {name}: this rank's {('rows', 'columns')[dim]} [{start}, {stop}) do not "
                f"fall on FP8 blocks of {b}; choose a layout whose splits do, or set model.quantization: none "
                "to run dequantised weights"
            )
        scale = self.read(scales, dim, start // b, -(-stop // b), dtype=torch.float32)
        return WeightSlice(t, scale, fp8_block)

    def _slice(self, name: str, dim: Optional[int], start: int, stop: Optional[int], size: Optional[int] = None):
        """The stored values of ``[start, stop)`` along ``dim`` (all of it for dim None) ->
        (tensor, dim, start, stop), the bounds filled in; ValueError unless the tensor's length
        along ``dim`` is ``size`` (where given)."""
        if name not in self.file_of:
            raise ValueError(f"checkpoint {self.dir}: tensor {name!r} is missing")
        view = self._handle(self.file_of[name]).get_slice(name)
        self.used.add(name)
        shape = view.get_shape()
        if dim is None:
            return view[:], 0, 0, (shape[0] if shape else 0)
        if size is not None and shape[dim] != size:
            raise ValueError(
                f"checkpoint {self.dir}: {name} has shape {list(shape)}, but config.json makes it {size} long along "
                f"dim {dim}: the checkpoint's tensors and its config.json disagree"
            )
        stop = shape[dim] if stop is None else stop
        if not 0 <= start < stop <= shape[dim]:
            raise ValueError(f"{name}: slice [{start}, {stop}) outside dim {dim} of shape {shape}")
        return view[tuple([slice(None)] * dim + [slice(start, stop)])], dim, start, stop

    def _dequantised(self, name: str, t: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
        """FP8 slice ``t`` (rows or columns [start, stop) along ``dim``) times its blocks' scales."""
        scales = self._scales(name, t)
        block = self.fp8_block
        first, last = start // block[dim], -(-stop // block[dim])
        s = self.read(scales, dim, first, last, dtype=torch.float32)
        s = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        offset = start - first * block[dim]
        s = s.narrow(dim, offset, stop - start).narrow(1 - dim, 0, t.shape[1 - dim])
        return t.float() * s

    def _scales(self, name: str, t: torch.Tensor) -> str:
        """The name of FP8 weight ``name``'s block scales, checked against the weight's shape and
        config.json's block (a scale of another shape would scale the wrong blocks)."""
        scales = name + "_scale_inv"
        if self.fp8_block is None:
            raise ValueError(f"checkpoint {self.dir}: {name} is float8 but config.json has no fp8 quantization_config")
        if scales not in self.file_of or t.dim() != 2:
            raise ValueError(f"checkpoint {self.dir}: {name} is float8 but has no {scales} (or is not 2-D)")
        (rows, cols), block = self.shape(name), self.fp8_block
        want = [-(-rows // block[0]), -(-cols // block[1])]
        if self.shape(scales) != want:
            raise ValueError(
                f"checkpoint {self.dir}: {scales} has shape {self.shape(scales)}, but a {rows} x {cols} weight in "
                f"FP8 blocks of {list(block)} (config.json's quantization_config.weight_block_size) has {want}"
            )
        return scales

    def mark_used(self, name: str) -> None:
        """Count tensor ``name`` as part of the model without reading it here (another rank's share)."""
        if name not in self.file_of:
            raise ValueError(f"checkpoint {self.dir}: tensor {name!r} is missing")
        self.used.add(name)
        if name + "_scale_inv" in self.file_of:  # an FP8 weight's scales go with it
            self.used.add(name + "_scale_inv")

    def check_all_used(self, known_unused: Sequence[str]) -> list[str]:
        """ValueError naming the tensors neither read nor marked used, except those matching
        a ``known_unused`` regular expression (tensors the reference implementation ignores
        too) and empty ones (no weights: e.g. the zero-width shared experts transformers
        saves for ``n_shared_experts: 0``); -> the known ones, sorted, for the caller to name
        in a warning."""
        unread = sorted(name for name in set(self.file_of) - self.used if 0 not in self.shape(name))
        known = [name for name in unread if any(re.search(p, name) for p in known_unused)]
        unexpected = [name for name in unread if name not in known]
        if unexpected:
            shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
            raise ValueError(
                f"checkpoint {self.dir}: {len(unexpected)} tensors that raymoe's model of this architecture does "
                f"not use: {shown} (a config.json field or a variant raymoe does not implement?)"
            )
        return known

    def shape(self, name: str) -> list[int]:
        if name not in self.file_of:
            raise ValueError(f"checkpoint {self.dir}: tensor {name!r} is missing")
        return list(self._handle(self.file_of[name]).get_slice(name).get_shape())

    def _handle(self, file: pathlib.Path):
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file]

    def close(self) -> None:
        self._open.clear()


def _index(d: pathlib.Path) -> dict[str, pathlib.Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: d / file for name, file in weight_map.items()}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{d}: no *.safetensors files (raymoe loads safetensors checkpoints only); "
            "for random weights of this config set model.load_format: dummy"
        )
    out: dict[str, pathlib.Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                out[name] = f
    return out
