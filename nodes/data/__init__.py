"""Data layer: frame readers, COCO annotations, pandera schemas and Lightning data modules."""

from nodes.data.coco import (
    CocoAnnotations,
    anomaly_mask,
    decode_rle,
    encode_rle,
    load_coco,
    rasterize_polygons,
)
from nodes.data.datamodule import CubeDataModule, SingleCu3sDataModule
from nodes.data.readers import (
    SUPPORTED_SUFFIXES,
    Frame,
    count_frames,
    iter_frames,
    iter_frames_at,
    read_frame,
    read_frames,
    write_session_npz,
)
from nodes.data.schemas import (
    AnnotationSchema,
    FrameSummarySchema,
    validate_annotations,
    validate_frames,
)

__all__ = [
    "SUPPORTED_SUFFIXES",
    "AnnotationSchema",
    "CocoAnnotations",
    "CubeDataModule",
    "Frame",
    "FrameSummarySchema",
    "SingleCu3sDataModule",
    "anomaly_mask",
    "count_frames",
    "decode_rle",
    "encode_rle",
    "iter_frames",
    "iter_frames_at",
    "load_coco",
    "rasterize_polygons",
    "read_frame",
    "read_frames",
    "validate_annotations",
    "validate_frames",
    "write_session_npz",
]
