"""Tests of nodes/data/datamodule.py: splits, batch contract, validation, cache, .cu3s + COCO."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

import nodes.data.datamodule as dm_module
import nodes.data.readers as readers_module
from nodes.data.coco import encode_rle
from nodes.data.datamodule import CubeDataModule, SingleCu3sDataModule
from nodes.data.readers import read_frames
from nodes.errors import DataValidationError

FRAME_BYTES = 100 * 100 * 205 * 4 + 100 * 100 + 100 * 100 * 8  # cube + mask + class_mask


def _session_dm(paths: list[Path], **kwargs: Any) -> CubeDataModule:
    args: dict[str, Any] = {"train_ids": [0, 1, 2], "val_ids": [3], "test_ids": [4]}
    args.update(kwargs)
    args.setdefault("batch_size", 2)
    return CubeDataModule(paths, **args)


def test_session_batches_follow_the_contract(session_paths: list[Path]) -> None:
    dm = _session_dm(session_paths, expected_channels=205)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [b["cube"].shape[0] for b in batches] == [2, 1]
    b = batches[0]
    assert b["cube"].shape == (2, 100, 100, 205) and b["cube"].dtype == torch.float32
    assert b["mask"].shape == (2, 100, 100) and b["mask"].dtype == torch.bool
    assert b["class_mask"].shape == (2, 100, 100) and b["class_mask"].dtype == torch.int64
    assert b["wavelengths"].shape == (2, 205) and b["wavelengths"].dtype == torch.float32
    # ABU has no wavelengths: band indices stand in for them.
    torch.testing.assert_close(b["wavelengths"][0], torch.arange(205, dtype=torch.float32))
    assert b["frame_id"].dtype == torch.int64 and b["frame_id"].shape == (2,)
    seen = torch.cat([x["frame_id"] for x in batches]).tolist()
    assert sorted(seen) == [0, 1, 2]
    # The batch holds exactly the file's content.
    fid = int(b["frame_id"][0])
    (frame,) = read_frames(session_paths[fid])
    np.testing.assert_array_equal(b["cube"][0].numpy(), frame.cube)
    np.testing.assert_array_equal(b["mask"][0].numpy(), frame.mask)
    val = list(dm.val_dataloader())
    assert len(val) == 1 and val[0]["frame_id"].tolist() == [3]
    assert int(val[0]["mask"].sum()) == 272  # Los Angeles-3
    assert [t["frame_id"].tolist() for t in dm.test_dataloader()] == [[4]]


def test_val_and_test_order_is_as_given(session_paths: list[Path]) -> None:
    dm = _session_dm(session_paths, val_ids=[4, 0, 2], test_ids=[3, 1], batch_size=1)
    dm.setup()
    assert [int(b["frame_id"]) for b in dm.val_dataloader()] == [4, 0, 2]
    assert [int(b["frame_id"]) for b in dm.val_dataloader()] == [4, 0, 2]
    assert [int(b["frame_id"]) for b in dm.test_dataloader()] == [3, 1]


def _train_orders(dm: CubeDataModule, epochs: int) -> list[list[int]]:
    orders = []
    for epoch in range(epochs):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]  # Lightning does this
        orders.append([int(i) for b in loader for i in b["frame_id"]])
    return orders


def test_train_shuffle_is_seeded(make_cube: Callable[..., Any]) -> None:
    cubes, masks = zip(*(make_cube(seed=s) for s in range(12)), strict=True)
    ids = list(range(10))

    def build(seed: int) -> CubeDataModule:
        dm = CubeDataModule.from_arrays(cubes, masks, ids, [10], [11], batch_size=3, seed=seed)
        dm.setup()
        return dm

    a, b, c = _train_orders(build(0), 4), _train_orders(build(0), 4), _train_orders(build(1), 4)
    assert a == b  # same seed, same epoch orders
    assert a != c
    assert all(sorted(o) == ids for o in a)
    assert len({tuple(o) for o in a}) > 1  # reshuffled each epoch
    # An epoch's order depends on (seed, epoch) only, so a resumed run replays it.
    resumed = build(0).train_dataloader()
    resumed.sampler.set_epoch(2)  # type: ignore[attr-defined]
    assert [int(i) for b in resumed for i in b["frame_id"]] == a[2]


def test_from_arrays_contract_and_wavelengths(make_cube: Callable[..., Any]) -> None:
    cubes, masks = zip(*(make_cube(seed=s) for s in range(4)), strict=True)
    stacked = np.stack(cubes).astype(np.float64)  # (N, H, W, C) works too; cast to float32
    dm = CubeDataModule.from_arrays(
        stacked, np.stack(masks), [0, 1], [2], [3], batch_size=2, wavelengths=np.arange(6) * 10.0
    )
    dm.setup()
    (b,) = list(dm.train_dataloader())
    assert b["cube"].dtype == torch.float32 and b["cube"].shape == (2, 12, 10, 6)
    assert b["mask"].dtype == torch.bool and int(b["mask"].sum()) == 8
    assert "class_mask" not in b  # none given: not invented
    torch.testing.assert_close(b["wavelengths"][1], torch.arange(6, dtype=torch.float32) * 10)
    d = dm.describe()
    assert d["num_frames"] == 4 and d["shape"] == [12, 10, 6] and d["sources"] == ["<memory>"]
    assert dm.num_channels == 6 and dm.num_frames == 4
    assert len(dm.frame_summaries()) == 4


def test_from_arrays_goes_through_validation(make_cube: Callable[..., Any]) -> None:
    cubes, masks = (list(x) for x in zip(*(make_cube(seed=s) for s in range(3)), strict=True))
    cubes[2][1, 2, 3] = np.nan
    dm = CubeDataModule.from_arrays(cubes, masks, [0], [1], [2], batch_size=1)
    with pytest.raises(DataValidationError) as err:
        dm.setup()
    assert "<memory> (frame_id 2" in str(err.value) and "row=1, col=2, band=3" in str(err.value)
    with pytest.raises(DataValidationError, match="not set up"):
        dm.train_dataloader()
    ok = CubeDataModule.from_arrays(cubes[:2], masks[:2], [0], [1], [1], 1, expected_channels=7)
    with pytest.raises(DataValidationError, match="expected_channels is 7"):
        ok.setup()
    bad_mask = [masks[0][:, :5], masks[1]]
    with pytest.raises(DataValidationError, match="mask is 12 x 5"):
        CubeDataModule.from_arrays(cubes[:2], bad_mask, [0], [1], [1], 1).setup()
    with pytest.raises(DataValidationError, match="3 cubes but 2 masks"):
        CubeDataModule.from_arrays(cubes, masks[:2], [0], [1], [2], 1)
    with pytest.raises(DataValidationError, match="field 'cube'"):
        CubeDataModule.from_arrays([cubes[0][..., 0]], [masks[0]], [0], [0], [0], 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_ids": []}, "val_ids is empty"),
        ({"train_ids": [0, 0]}, "more than once"),
        ({"test_ids": ["4"]}, "not an integer"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_split_arguments(
    session_paths: list[Path], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(DataValidationError, match=match):
        _session_dm(session_paths, **kwargs)


def test_id_out_of_range_names_id_and_range(session_paths: list[Path]) -> None:
    dm = _session_dm(session_paths, test_ids=[4, 7])
    with pytest.raises(DataValidationError) as err:
        dm.setup()
    msg = str(err.value)
    assert "test_ids" in msg and "[7]" in msg and "valid ids 0..4" in msg


def test_missing_file_fails_setup(session_paths: list[Path], tmp_path: Path) -> None:
    dm = _session_dm([*session_paths[:4], tmp_path / "gone.mat"])
    with pytest.raises(DataValidationError, match=r"gone\.mat: file not found"):
        dm.setup()


def test_mixed_band_counts_rejected(session_paths: list[Path], extra_paths: list[Path]) -> None:
    dm = CubeDataModule([session_paths[0], extra_paths[0]], [0], [1], [1], batch_size=1)
    with pytest.raises(DataValidationError) as err:
        dm.setup()
    assert "205 bands" in str(err.value) and "204 bands" in str(err.value)
    dm = CubeDataModule(session_paths[:2], [0], [1], [1], batch_size=1, expected_channels=204)
    with pytest.raises(DataValidationError) as err:
        dm.setup()
    assert str(session_paths[0]) in str(err.value) and "expected_channels is 204" in str(err.value)


def test_cache_budget_is_honoured(
    session_paths: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[tuple[str, int]] = []
    real_read = dm_module.read_frame

    def counting_read(path: Path, index: int = 0, require_labels: bool = True) -> Any:
        reads.append((Path(path).name, index))
        return real_read(path, index, require_labels=require_labels)

    monkeypatch.setattr(dm_module, "read_frame", counting_read)  # on-demand reads
    monkeypatch.setattr(readers_module, "read_frame", counting_read)  # setup's reads
    dm = _session_dm(session_paths, cache_bytes=2 * FRAME_BYTES + 10, batch_size=1)
    dm.setup()
    d = dm.describe()
    assert d["cached_frames"] == 2 and d["cached_bytes"] == 2 * FRAME_BYTES
    assert d["cached_bytes"] <= d["cache_bytes"]
    assert len(reads) == 5  # setup reads (and validates) every frame once
    (frame,) = read_frames(session_paths[3], validate=False)
    reads.clear()
    for _ in range(2):
        for b in dm.val_dataloader():  # frame 3: beyond the budget, re-read each time
            np.testing.assert_array_equal(b["cube"][0].numpy(), frame.cube)
    assert reads == [("abu-urban-4.mat", 0)] * 2
    reads.clear()
    list(dm.train_dataloader())
    assert sorted(reads) == [("abu-airport-3.mat", 0)]  # frames 0, 1 come from the cache


def test_zero_cache(session_paths: list[Path]) -> None:
    dm = _session_dm(session_paths, cache_bytes=0)
    dm.setup()
    assert dm.describe()["cached_frames"] == 0
    assert sum(b["cube"].shape[0] for b in dm.train_dataloader()) == 3


def test_setup_runs_once(session_paths: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    dm = _session_dm(session_paths)
    dm.setup("fit")
    monkeypatch.setattr(dm_module, "validate_frames", None)  # would crash if called again
    dm.setup("validate")
    dm.setup("test")
    assert dm.is_setup


def test_coco_annotations_override_npz_masks(
    make_npz: Callable[..., Path], write_json: Callable[..., Path]
) -> None:
    paths = [make_npz(f"f{i}.npz", seed=i) for i in range(3)]
    blob = np.zeros((12, 10), dtype=bool)
    blob[5:9, 1:3] = True
    ann = {
        "categories": [{"id": 0, "name": "background"}, {"id": 4, "name": "stone"}],
        "annotations": [
            {"id": 1, "image_id": 2, "category_id": 4, "segmentation": encode_rle(blob)},
            {"id": 2, "image_id": 0, "category_id": 4, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]},
        ],
    }
    dm = CubeDataModule(paths, [0], [1], [2], 1, annotation_path=write_json(ann))
    dm.setup()
    (b,) = list(dm.test_dataloader())
    np.testing.assert_array_equal(b["mask"][0].numpy(), blob)
    assert set(torch.unique(b["class_mask"]).tolist()) == {0, 4}
    (v,) = list(dm.val_dataloader())
    assert not v["mask"].any()  # frame 1 has no annotation: all normal
    (t,) = list(dm.train_dataloader())
    assert int(t["mask"].sum()) == 4
    bad = {**ann, "annotations": [{"id": 9, "image_id": 3, "category_id": 4, "bbox": [0, 0, 1, 1]}]}
    with pytest.raises(DataValidationError, match="annotation id 9"):
        CubeDataModule(paths, [0], [1], [2], 1, annotation_path=write_json(bad, "b.json")).setup()


def _standin_cuvis(cubes: list[np.ndarray]) -> types.ModuleType:
    module = types.ModuleType("cuvis")

    class _Image:
        def __init__(self, array: np.ndarray) -> None:
            self.array = array
            self.wavelength = [500 + 10 * i for i in range(array.shape[2])]

    class _Measurement:
        def __init__(self, array: np.ndarray) -> None:
            self.data = {"cube": _Image(array)}

    class SessionFile:
        def __init__(self, base: str) -> None:
            self.base = base

        def __len__(self) -> int:
            return len(cubes)

        def get_measurement(self, i: int) -> _Measurement:
            return _Measurement(cubes[i])

    module.SessionFile = SessionFile  # type: ignore[attr-defined]
    return module


def test_single_cu3s_datamodule_with_standin_sdk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_json: Callable[..., Path]
) -> None:
    """Cubert's native SDK is not available here: ``cuvis`` is a stand-in module injected into
    ``sys.modules`` that mimics the documented API (SessionFile / get_measurement /
    data["cube"].array / .wavelength). This checks the guide's SingleCu3sDataModule wiring
    (frame ids = measurement indices, labels from COCO), not a real session file."""
    rng = np.random.default_rng(1)
    cubes = [rng.integers(0, 1000, size=(6, 7, 4), dtype=np.uint16) for _ in range(6)]
    monkeypatch.setitem(sys.modules, "cuvis", _standin_cuvis(cubes))
    session = tmp_path / "Lentils_000.cu3s"
    session.write_bytes(b"stand-in")
    ann = write_json(
        {
            "categories": [{"id": 1, "name": "lentil_black"}],
            "annotations": [
                {
                    "id": 1,
                    "image_id": 5,
                    "category_id": 1,
                    "segmentation": [[0, 0, 3, 0, 3, 2, 0, 2]],
                }
            ],
        }
    )
    dm = SingleCu3sDataModule(
        cu3s_file_path=session,
        annotation_json_path=ann,
        train_ids=[0, 2, 3],
        val_ids=[1],
        test_ids=[1, 5],
        batch_size=2,
        cache_bytes=0,  # every batch goes back to the (stand-in) SDK
    )
    dm.setup(stage="fit")
    assert dm.describe()["num_frames"] == 6
    tb = list(dm.test_dataloader())
    assert [b["frame_id"].tolist() for b in tb] == [[1, 5]]
    b = tb[0]
    assert b["cube"].dtype == torch.float32 and b["cube"].shape == (2, 6, 7, 4)
    np.testing.assert_array_equal(b["cube"][1].numpy(), cubes[5].astype(np.float32))
    torch.testing.assert_close(b["wavelengths"][0], torch.tensor([500.0, 510.0, 520.0, 530.0]))
    assert not b["mask"][0].any() and int(b["mask"][1].sum()) == 6
    assert b["class_mask"].dtype == torch.int64 and int(b["class_mask"][1].max()) == 1
    with pytest.raises(DataValidationError, match=r"valid ids 0\.\.5"):
        SingleCu3sDataModule(session, ann, [6], [1], [1], 1).setup()


def test_trainer_drives_the_datamodule(make_cube: Callable[..., Any]) -> None:
    cubes, masks = zip(*(make_cube(seed=s) for s in range(4)), strict=True)
    dm = CubeDataModule.from_arrays(cubes, masks, [0, 1], [2], [3], batch_size=2)

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(6))
            self.seen: list[int] = []

        def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
            self.seen += batch["frame_id"].tolist()
            logits = (batch["cube"] * self.w).sum(-1)
            return torch.nn.functional.binary_cross_entropy_with_logits(
                logits, batch["mask"].float()
            )

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    model = Tiny()
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    assert sorted(model.seen) == [0, 1] and dm.is_setup


def test_worker_processes(make_cube: Callable[..., Any]) -> None:
    cubes, masks = zip(*(make_cube(seed=s) for s in range(4)), strict=True)
    dm = CubeDataModule.from_arrays(cubes, masks, [0, 1, 2], [3], [3], 2, num_workers=2)
    dm.setup()
    assert sorted(int(i) for b in dm.train_dataloader() for i in b["frame_id"]) == [0, 1, 2]


def test_single_session_datamodule_reads_a_multi_frame_npz(
    tmp_path: Path, session_paths: list[Path]
) -> None:
    """The SDK-free session: the five bundled scenes in one .npz, split as the guide splits."""
    from nodes.data.readers import read_frames, write_session_npz

    frames = [f for p in session_paths for f in read_frames(p, validate=False)]
    path = write_session_npz(frames, tmp_path / "session.npz", compress=False)
    dm = SingleCu3sDataModule(cu3s_file_path=path, annotation_json_path=None,
                              train_ids=[0, 1, 2], val_ids=[3], test_ids=[4], batch_size=4)
    dm.setup(stage="fit")
    assert dm.describe()["num_frames"] == 5
    (train,) = list(dm.train_dataloader())
    assert train["cube"].shape == (3, 100, 100, 205)
    (test,) = list(dm.test_dataloader())
    assert test["frame_id"].tolist() == [4] and int(test["mask"].sum()) == 232  # urban-5
    np.testing.assert_array_equal(test["cube"][0].numpy(), frames[4].cube)


def test_multi_frame_npz_without_masks_takes_coco_labels(
    tmp_path: Path, write_json: Callable[..., Path]
) -> None:
    rng = np.random.default_rng(3)
    path = tmp_path / "unlabelled.npz"
    np.savez(path, cube=rng.normal(size=(3, 6, 7, 4)).astype(np.float32))
    ann = write_json({
        "categories": [{"id": 2, "name": "defect"}],
        "annotations": [{"id": 1, "image_id": 2, "category_id": 2,
                         "segmentation": [[0, 0, 3, 0, 3, 2, 0, 2]]}],
    })
    dm = SingleCu3sDataModule(path, ann, train_ids=[0, 1], val_ids=[2], test_ids=[2],
                              batch_size=1)
    dm.setup()
    (val,) = list(dm.val_dataloader())
    assert int(val["mask"].sum()) == 6 and int(val["class_mask"].max()) == 2
    (first, second) = list(dm.train_dataloader())
    assert not first["mask"].any() and not second["mask"].any()


def test_frame_batches_are_one_frame_batches_in_split_order(session_paths: list[Path]) -> None:
    dm = _session_dm(session_paths, train_ids=[2, 0, 1], cache_bytes=0)
    dm.setup()
    collated = {int(b["frame_id"]): b for b in dm.val_dataloader()}  # frame 3, as collated
    frames = dm.frame_batches("train")
    assert frames is not None
    got = list(frames)
    assert [int(b["frame_id"]) for b in got] == [2, 0, 1]
    for b in got:
        (frame,) = read_frames(session_paths[int(b["frame_id"])], validate=False)
        np.testing.assert_array_equal(b["cube"][0].numpy(), frame.cube)
    (val,) = list(dm.frame_batches("val") or ())
    for key, value in collated[3].items():
        assert val[key].shape == value.shape and val[key].dtype == value.dtype, key
        torch.testing.assert_close(val[key], value)
    with pytest.raises(DataValidationError, match="unknown split"):
        dm.frame_batches("holdout")


def _mapped_file(address: int) -> str | None:
    """The file mapped at ``address`` in this process (``/proc/self/maps``), or None."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_frame_batches_hand_out_the_mapped_frame_without_a_copy(
        make_npz: Callable[..., Path]) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        cube = rng.random((128, 128, 20), dtype=np.float32)  # 1.3 MB: re-reads are mapped
        mask = np.zeros((128, 128), dtype=np.int64)
        paths.append(make_npz(f"big{i}.npz", cube=cube, mask=mask, class_mask=mask,
                              wavelengths=np.arange(20)))
    dm = CubeDataModule(paths, train_ids=[0, 1], val_ids=[1], test_ids=[1], batch_size=2,
                        cache_bytes=0)
    dm.setup()
    for b in dm.frame_batches("train") or ():
        # The cube lies in a mapping of its own file (the page cache), not in a stacked copy.
        assert _mapped_file(b["cube"].data_ptr()) == str(paths[int(b["frame_id"])])
    workers = CubeDataModule(paths, train_ids=[0, 1], val_ids=[1], test_ids=[1], batch_size=2,
                             num_workers=1)
    workers.setup()
    assert workers.frame_batches("train") is None  # reading stays with the loader's workers
