"""The data node: turns a batch dict into typed ports."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from nodes.errors import DataValidationError
from nodes.graph.base import Node
from nodes.graph.ports import PortSpec
from nodes.graph.registry import register_node


@register_node
class AnomalyDataNode(Node):
    """Expose ``cube``, ``mask`` and ``wavelengths`` of a batch.

    When the batch carries a ``class_mask``, pixels whose class is not in ``normal_class_ids``
    are anomalies; otherwise the batch's binary ``mask`` is used.

    Args:
        normal_class_ids: Class ids counted as normal.
        name: Node name.
    """

    INPUT_SPECS: ClassVar[dict[str, PortSpec]] = {}
    OUTPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "cube": PortSpec("float", ("B", "H", "W", "C"), "hyperspectral cube"),
        "mask": PortSpec("bool", ("B", "H", "W"), "anomaly mask (True = anomaly)"),
        "wavelengths": PortSpec("float", ("B", "C"), "band centre wavelengths (nm) or indices"),
    }
    consumes_batch: ClassVar[bool] = True
    DEFAULT_NAME: ClassVar[str | None] = "data"

    def __init__(self, normal_class_ids: Sequence[int] = (0,), name: str | None = None,
                 execution_stages: Iterable[str] | None = None) -> None:
        super().__init__(name=name, execution_stages=execution_stages)
        self.normal_class_ids = [int(i) for i in normal_class_ids]
        self._remember(normal_class_ids=self.normal_class_ids)

    def run_batch(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Read the batch contract.

        ``cube`` (B, H, W, C) float32 is required; ``mask`` (B, H, W) bool (anomaly = 1),
        ``class_mask`` (B, H, W) int, ``wavelengths`` (B, C) and ``frame_id`` are optional.
        """
        if "cube" not in batch:
            raise DataValidationError(
                f"batch has no 'cube' (keys: {sorted(batch)}); datamodules must yield the batch "
                "contract {'cube', 'mask', 'wavelengths', 'frame_id'}"
            )
        cube: Tensor = batch["cube"]
        if "class_mask" in batch and batch["class_mask"] is not None:
            normal = torch.tensor(self.normal_class_ids, device=cube.device)
            mask = ~torch.isin(batch["class_mask"].to(cube.device), normal)
        elif "mask" in batch:
            mask = batch["mask"].to(cube.device).bool()
        else:
            mask = torch.zeros(cube.shape[:-1], dtype=torch.bool, device=cube.device)
        wl = batch.get("wavelengths")
        if wl is None:
            wl = torch.arange(cube.shape[-1], dtype=torch.float32, device=cube.device)
            wl = wl.expand(cube.shape[0], -1)
        return {"cube": cube, "mask": mask, "wavelengths": wl}
