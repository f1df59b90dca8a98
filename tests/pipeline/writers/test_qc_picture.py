"""QC picture: a real PNG of fixed size, coloured contours where the structures are, radiological orientation."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from pipeline.writers.qc_picture import DPI, FIGSIZE_IN, LABEL_COLOURS, write_qc_picture

SHAPE = (40, 36, 16)
# Stored "LPS-like": i runs toward the patient's left, j toward posterior, so the RAS reorientation
# must flip both in-plane axes for the picture to come out right.
AFFINE = np.array([[-0.7, 0, 0, 20.0], [0, -1.3, 0, 15.0], [0, 0, 3.0, -30.0], [0, 0, 0, 1]])
LABELS = {1: "liver", 2: "kidney"}
HEIGHT, WIDTH = int(FIGSIZE_IN[1] * DPI), int(FIGSIZE_IN[0] * DPI)


def _phantom():
    image = np.full(SHAPE, 40.0, np.float32)
    image[[0, -1]] = -1000.0  # air at the edges: a CT in HU
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:12, 3:12, 9:14] = 1  # patient right (low i), anterior (low j), superior (high k)
    mask[30:36, 25:32, 2:6] = 2  # patient left, posterior, inferior
    return image, mask


def _colour_pixels(png: np.ndarray, colour) -> np.ndarray:
    """(row, col) of pixels within 0.2 of ``colour`` (RGB 0-1), legend strip excluded."""
    rgb = png[: int(HEIGHT * 0.86), :, :3]
    return np.argwhere(np.all(np.abs(rgb - np.asarray(colour)) < 0.2, axis=-1))


def test_png_size_and_contour_colours(tmp_path):
    image, mask = _phantom()
    out = write_qc_picture(image, mask, AFFINE, LABELS, tmp_path / "qc.png", title="case-0001")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = mpimg.imread(out)
    assert png.shape[:2] == (HEIGHT, WIDTH)
    empty = mpimg.imread(write_qc_picture(image, np.zeros_like(mask), AFFINE, LABELS, tmp_path / "e.png"))
    for colour in LABEL_COLOURS[:1]:  # liver is in all three slices through its own centroid
        assert len(_colour_pixels(png, colour)) > 100
        assert len(_colour_pixels(empty, colour)) == 0
    assert list(tmp_path.glob(".*")) == []  # atomic write left no temp file


def test_radiological_orientation(tmp_path):
    """Liver at the patient's right-anterior-superior: screen left/top in axial, coronal; left/top in sagittal."""
    image, mask = _phantom()
    png = mpimg.imread(write_qc_picture(image, mask, AFFINE, LABELS, tmp_path / "qc.png"))
    red = _colour_pixels(png, LABEL_COLOURS[0])
    # The three panels sit in equal thirds of the width; each image is centred in its panel.
    panel_width = WIDTH * 0.96 / 3.16
    for panel in range(3):
        left = WIDTH * 0.02 + panel * panel_width * 1.08
        inside = red[(red[:, 1] >= left) & (red[:, 1] < left + panel_width)]
        assert len(inside) > 20, f"no liver contour in panel {panel}"
        centre_col, centre_row = left + panel_width / 2, HEIGHT / 2
        # axial/coronal: patient right on the screen's left; sagittal: anterior on the left
        assert inside[:, 1].mean() < centre_col - 10, f"panel {panel} is mirrored left-right"
        if panel == 0:
            assert inside[:, 0].mean() < centre_row, "axial: anterior must be at the top"
        else:
            assert inside[:, 0].mean() < centre_row, "superior must be at the top"


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


def test_single_slice_volume_draws_image_and_axial_contours(tmp_path):
    """A 1-voxel-thick view (coronal/sagittal of one slice) is an image without contours, not an error."""
    image, mask = _phantom()
    k = 10  # through the liver
    out = write_qc_picture(image[:, :, k : k + 1], mask[:, :, k : k + 1], AFFINE, LABELS, tmp_path / "one.png")
    png = mpimg.imread(out)
    assert png.shape[:2] == (HEIGHT, WIDTH)
    red = _colour_pixels(png, LABEL_COLOURS[0])
    assert len(red) > 20 and red[:, 1].max() < WIDTH / 3  # the axial panel's contour, only there
