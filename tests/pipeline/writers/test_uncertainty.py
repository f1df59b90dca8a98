"""uncertainty.nii.gz: (X, Y, Z, 3) float32 on the source grid; its CaseRow columns round-trip."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import torch

from pipeline.case_row import CaseRow
from pipeline.inference.segment import Segmentation
from pipeline.inference.uncertainty import CaseUncertainty
from pipeline.writers import WRITERS, optional_writers
from pipeline.writers.base import SegmentedCase
from pipeline.writers.uncertainty import UncertaintyWriter
from preprocessing.image import Volume
from preprocessing.source_item import SourceItem


def test_writes_three_channels_on_the_source_grid(tmp_path):
    shape = (14, 12, 9)
    affine = np.array([[0, -0.8, 0, 10.0], [1.2, 0, 0, -5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])
    net_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    net_affine[:3, 3] = [-8.0, -6.0, 2.0]
    # Linear in the network voxel index: trilinear resampling reproduces it exactly inside.
    ijk = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in (10, 12, 14)], indexing="ij"))
    maps = torch.stack([ijk[0] * 0.1, ijk[1] * 0.05, ijk[2] * 0.01])
    segmentation = Segmentation(
        labels=np.zeros(shape, np.uint8), affine_ras=affine, network_affine_ras=net_affine, uncertainty=maps
    )
    volume = Volume(np.zeros((1, *shape), np.float32), affine, case_id="c")
    case = SegmentedCase(SourceItem("nifti", "c", ()), volume, segmentation, {1: "liver"})
    writer = UncertaintyWriter()
    assert writer.applies_to(case) and writer.needs_uncertainty and not writer.needs_probabilities
    path = writer.write(case, tmp_path / writer.filename)
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    assert data.shape == (*shape, 3) and data.dtype == np.float32
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    np.testing.assert_allclose(data, segmentation.uncertainty_on_source_grid(), atol=1e-6)
    # one voxel well inside both grids: value = the linear function at its network index
    world = affine @ np.array([7, 6, 4, 1.0])
    net_ijk = np.linalg.solve(net_affine, world)[:3]
    np.testing.assert_allclose(data[7, 6, 4], [net_ijk[0] * 0.1, net_ijk[1] * 0.05, net_ijk[2] * 0.01], atol=1e-4)


def test_registered_as_the_optional_uncertainty_flag():
    assert any(isinstance(w, UncertaintyWriter) for w in optional_writers())
    assert [w.flag for w in WRITERS].count("--uncertainty") == 1
    assert all(hasattr(w, "needs_uncertainty") for w in WRITERS)


def test_case_row_uncertainty_columns_round_trip():
    row = CaseRow("case-1", status="ok", model_fingerprint="abc")
    row.volumes_ml = {"liver": 1.5}
    row.uncertainty = CaseUncertainty(0.25, {"liver": 0.1, "kidney": math.nan}, {"liver": 0.3, "kidney": math.nan})
    record = row.to_record()
    assert record["uncertainty"] == 0.25
    assert record["unc_mask_liver"] == 0.1 and record["unc_boundary_liver"] == 0.3
    back = CaseRow.from_record(record)
    assert back.uncertainty is not None and back.uncertainty.score == 0.25
    assert back.uncertainty.mask_mean["liver"] == 0.1 and math.isnan(back.uncertainty.boundary_mean["kidney"])
    assert back.to_record().keys() == record.keys() and not back.extra
    plain = CaseRow("case-2").to_record()
    assert not any(k == "uncertainty" or k.startswith("unc_") for k in plain)
    assert CaseRow.from_record(plain).uncertainty is None
