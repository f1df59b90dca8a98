"""QC picture: a real PNG, every present label visible on its own row of views, Okabe-Ito colours,
slice positions in mm, volumes / "not segmented" in the legend, uncertainty row, radiological orientation."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from pipeline.writers.qc_picture import (
    DPI,
    FIGSIZE_IN,
    LABEL_COLOURS,
    MARGIN_IN,
    ROW_IN,
    TOP_IN,
    _focus,
    _to_ras,
    legend_entries,
    picture_height_px,
    write_qc_picture,
)

SHAPE = (40, 36, 16)
# Stored "LPS-like": i runs toward the patient's left, j toward posterior, so the RAS reorientation
# must flip both in-plane axes for the picture to come out right.
AFFINE = np.array([[-0.7, 0, 0, 20.0], [0, -1.3, 0, 15.0], [0, 0, 3.0, -30.0], [0, 0, 0, 1]])
LABELS = {1: "liver", 2: "kidney"}
WIDTH = int(FIGSIZE_IN[0] * DPI)
HEIGHT = round(FIGSIZE_IN[1] * DPI)  # one row of views


def _phantom():
    image = np.full(SHAPE, 40.0, np.float32)
    image[[0, -1]] = -1000.0  # air at the edges: a CT in HU
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:12, 3:12, 9:14] = 1  # patient right (low i), anterior (low j), superior (high k)
    mask[30:36, 25:32, 2:6] = 2  # patient left, posterior, inferior: on no slice through the liver
    return image, mask


def _panel(png: np.ndarray, row: int, rows: int, column: int) -> np.ndarray:
    """The pixels of one view (row, column) of a picture with ``rows`` rows (matplotlib's layout:
    hspace 0.2 of a row between rows, wspace 0.08 of a panel between columns)."""
    top, bottom = TOP_IN * DPI, png.shape[0] - (MARGIN_IN - TOP_IN) * DPI
    height = (bottom - top) / (rows + 0.2 * (rows - 1))
    y0 = top + row * height * 1.2
    panel_width = WIDTH * 0.96 / 3.16
    x0 = WIDTH * 0.02 + column * panel_width * 1.08
    return png[int(y0) : int(y0 + height), int(x0) : int(x0 + panel_width), :3]


def _count(pixels: np.ndarray, colour, tol: float = 0.12) -> int:
    return int(np.all(np.abs(pixels[..., :3] - np.asarray(colour)) < tol, axis=-1).sum())


def test_every_present_label_is_on_all_three_views_of_its_own_row(tmp_path):
    """The kidney lies on no slice through the liver; it still shows on three views of row 2, in its colour."""
    image, mask = _phantom()
    out = write_qc_picture(image, mask, AFFINE, LABELS, tmp_path / "qc.png", title="case-0001")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = mpimg.imread(out)
    assert png.shape[:2] == (picture_height_px(2), WIDTH)
    liver, kidney = LABEL_COLOURS[0], LABEL_COLOURS[1]
    for column in range(3):
        assert _count(_panel(png, 0, 2, column), liver) > 20, f"liver missing from view {column} of its row"
        assert _count(_panel(png, 1, 2, column), kidney) > 20, f"kidney missing from view {column} of its row"
        assert _count(_panel(png, 0, 2, column), kidney) == 0  # not on the slices through the liver
    assert list(tmp_path.glob(".*")) == []  # atomic write left no temp file


def test_empty_mask_draws_one_row_without_label_colours(tmp_path):
    image, mask = _phantom()
    png = mpimg.imread(write_qc_picture(image, np.zeros_like(mask), AFFINE, LABELS, tmp_path / "e.png"))
    assert png.shape[:2] == (HEIGHT, WIDTH) == (picture_height_px(1), WIDTH)
    for colour in LABEL_COLOURS[:2]:
        assert _count(png[: int(HEIGHT - (MARGIN_IN - TOP_IN) * DPI)], colour) == 0


def test_palette_is_okabe_ito_and_colours_are_distinguishable():
    assert LABEL_COLOURS[0] == pytest.approx((230 / 255, 159 / 255, 0.0), abs=2e-3)  # orange
    assert LABEL_COLOURS[1] == pytest.approx((86 / 255, 180 / 255, 233 / 255), abs=2e-3)  # sky blue
    assert (1.0, 0.0, 0.0) not in LABEL_COLOURS and (0.0, 1.0, 0.0) not in LABEL_COLOURS
    colours = np.asarray(LABEL_COLOURS)
    gaps = np.abs(colours[:, None] - colours[None]).max(axis=-1) + np.eye(len(colours))
    assert gaps.min() > 0.2


def test_legend_has_volumes_and_says_not_segmented():
    entries = legend_entries({2: "kidney", 1: "liver"}, {1: 1228.5, 2: 0.0})
    assert list(entries) == [1, 2]
    assert entries[1] == "1: liver  1228.5 mL"
    assert entries[2] == "2: kidney  not segmented"


def test_views_go_through_the_largest_component_and_positions_are_world_mm():
    image, mask = _phantom()
    mask[38:40, 0:2, 0:2] = 1  # a small second liver component far away: not the focus
    ras, _ = _to_ras(image, mask, None, AFFINE)
    centre = _focus(ras.mask, 1)
    assert ras.mask[centre] == 1
    world = ras.world_mm(centre)
    # liver voxels i 2..11, j 3..11, k 9..13: centroid (6.5, 7, 11) -> world (20 - 0.7 i, 15 - 1.3 j, -30 + 3 k)
    assert world[2] == pytest.approx(3.0)  # axial slice z in mm
    assert abs(world[0] - (20 - 0.7 * 6.5)) <= 0.7 and abs(world[1] - (15 - 1.3 * 7)) <= 1.3


def test_uncertainty_adds_a_row_drawn_in_its_colour_map(tmp_path):
    image, mask = _phantom()
    uncertainty = np.zeros(SHAPE, np.float32)
    uncertainty[:, :, 8:] = 0.7  # high through the liver's slices
    out = write_qc_picture(image, mask, AFFINE, LABELS, tmp_path / "u.png", uncertainty=uncertainty)
    png = mpimg.imread(out)
    assert png.shape[:2] == (picture_height_px(3), WIDTH)
    row = _panel(png, 2, 3, 1)  # coronal view of the uncertainty row: both values visible
    saturation = row.max(axis=-1) - row.min(axis=-1)
    assert (saturation > 0.3).sum() > 500  # coloured (cividis), not a grey CT slice
    grey_rows = _panel(png, 0, 3, 1)
    assert _count(grey_rows, LABEL_COLOURS[0]) > 20
    with pytest.raises(ValueError, match="uncertainty"):
        write_qc_picture(image, mask, AFFINE, LABELS, tmp_path / "x.png", uncertainty=np.zeros((2, 2, 2)))


def test_radiological_orientation(tmp_path):
    """Liver at the patient's right-anterior-superior: screen left/top in axial, coronal; left/top in sagittal."""
    image, mask = _phantom()
    mask[mask == 2] = 0
    png = mpimg.imread(write_qc_picture(image, mask, AFFINE, LABELS, tmp_path / "qc.png"))
    panel_width = WIDTH * 0.96 / 3.16
    centre_row = (TOP_IN + ROW_IN / 2) * DPI
    colour = np.asarray(LABEL_COLOURS[0])
    found = np.argwhere(np.all(np.abs(png[..., :3] - colour) < 0.12, axis=-1))
    for panel in range(3):
        left = WIDTH * 0.02 + panel * panel_width * 1.08
        inside = found[(found[:, 1] >= left) & (found[:, 1] < left + panel_width)]
        inside = inside[inside[:, 0] < HEIGHT - (MARGIN_IN - TOP_IN) * DPI]  # legend excluded
        assert len(inside) > 20, f"no liver contour in panel {panel}"
        # axial/coronal: patient right on the screen's left; sagittal: anterior on the left
        assert inside[:, 1].mean() < left + panel_width / 2 - 10, f"panel {panel} is mirrored left-right"
        # axial: anterior at the top; coronal/sagittal: superior at the top
        assert inside[:, 0].mean() < centre_row, f"panel {panel} is upside down"


def test_empty_mask_and_mr_window_render(tmp_path):
    image = np.random.default_rng(0).gamma(2.0, 100.0, SHAPE).astype(np.float32)  # MR-like, no air
    out = write_qc_picture(image, np.zeros(SHAPE, np.uint8), AFFINE, LABELS, tmp_path / "mr.png")
    png = mpimg.imread(out)
    assert png.shape[:2] == (HEIGHT, WIDTH)
    assert png[..., :3].std() > 0.05  # the image itself is drawn, not a blank canvas


def test_mismatched_shapes_raise(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        write_qc_picture(np.zeros(SHAPE), np.zeros((4, 4, 4)), AFFINE, LABELS, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_many_labels_keep_the_picture_bounded(tmp_path):
    image, _ = _phantom()
    mask = np.zeros(SHAPE, np.uint8)
    names = {}
    for v in range(1, 13):
        mask[3 * v : 3 * v + 2, 5:9, 4:8] = v
        names[v] = f"organ{v}"
    png = mpimg.imread(write_qc_picture(image, mask, AFFINE, names, tmp_path / "many.png"))
    assert png.shape[0] == picture_height_px(12) <= 3200


def test_single_slice_volume_draws_image_and_axial_contours(tmp_path):
    """A 1-voxel-thick view (coronal/sagittal of one slice) is an image without contours, not an error."""
    image, mask = _phantom()
    k = 10  # through the liver
    out = write_qc_picture(
        image[:, :, k : k + 1], mask[:, :, k : k + 1], AFFINE, LABELS, tmp_path / "one.png"
    )
    png = mpimg.imread(out)
    assert png.shape[:2] == (HEIGHT, WIDTH)
    found = np.argwhere(np.all(np.abs(png[..., :3] - np.asarray(LABEL_COLOURS[0])) < 0.12, axis=-1))
    found = found[found[:, 0] < HEIGHT - (MARGIN_IN - TOP_IN) * DPI]
    assert len(found) > 20 and found[:, 1].max() < WIDTH / 3  # the axial panel's contour, only there


def test_writer_draws_the_uncertainty_row_from_the_segmentation(tmp_path):
    """The writer resamples the total-uncertainty channel of a Segmentation made with uncertainty."""
    from types import SimpleNamespace

    import torch

    from pipeline.inference.segment import Segmentation
    from pipeline.writers.base import SegmentedCase
    from pipeline.writers.qc_picture import QcPictureWriter

    image, mask = _phantom()
    maps = torch.zeros((3, *SHAPE))
    maps[0, :, :, 8:] = 0.7
    maps[2] = 5.0  # mutual information: must not be the channel drawn
    volume = SimpleNamespace(array=image[None], affine_ras=AFFINE)
    item = SimpleNamespace(case_id="case-0001")
    plain = Segmentation(labels=mask, affine_ras=AFFINE)
    uncertain = Segmentation(labels=mask, affine_ras=AFFINE, uncertainty=maps, network_affine_ras=AFFINE)
    writer = QcPictureWriter()
    one = mpimg.imread(writer.write(SegmentedCase(item, volume, plain, LABELS, "m"), tmp_path / "a.png"))
    two = mpimg.imread(writer.write(SegmentedCase(item, volume, uncertain, LABELS, "m"), tmp_path / "b.png"))
    assert one.shape[0] == picture_height_px(2) and two.shape[0] == picture_height_px(3)
    expected = mpimg.imread(
        write_qc_picture(
            image,
            mask,
            AFFINE,
            LABELS,
            tmp_path / "c.png",
            title="case-0001 (m)",
            uncertainty=maps[0].numpy(),
        )
    )
    assert np.abs(two - expected).max() < 0.05  # the total channel, resampled onto the same grid
