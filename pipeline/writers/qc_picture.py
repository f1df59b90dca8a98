"""Quality-control picture of a segmentation: axial, coronal and sagittal slices with contours.

Display conventions (radiological, what a reviewer expects from a PACS viewer):

* The volume is first reoriented to RAS with ``nibabel.orientations`` (axis permutation and flips
  only, no resampling), so every view is a plain slice of the RAS array. An oblique volume is shown
  on its nearest RAS axes; the title says so.
* Axial: patient's right on the screen's left, anterior at the top. Coronal: right on the left,
  superior at the top. Sagittal: anterior on the left, superior at the top. Edge letters mark it.
* Pixel aspect ratio comes from the RAS voxel spacing, so anisotropic voxels look anatomical.
* Slices pass through the centroid of the largest labelled structure (volume centre if empty).
* A view one voxel thick (the coronal and sagittal views of a single-slice series) is drawn as
  the image without contours: a contour needs at least two rows and two columns.
* Intensities: a (width, level) window if given; otherwise CT W400/L40 when the image looks like
  Hounsfield units (it contains air, <= -900), else the 0.5-99.5 percentile range (MR).

Uses matplotlib's object API with the Agg canvas (not pyplot) so it is safe in Dask worker
threads and keeps no global figure state. Contours use matplotlib ``contour`` (no scikit-image).
matplotlib and nibabel are imported in the functions that draw (see :mod:`pipeline.writers.base`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.writers.base import SegmentedCase
from preprocessing.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

#: Contour colours (RGB 0-1) by label rank: saturated and far from grey so they stand out on CT/MR.
LABEL_COLOURS: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, 0.45, 1.0),
    (1.0, 1.0, 0.0),
    (1.0, 0.0, 1.0),
    (0.0, 1.0, 1.0),
    (1.0, 0.5, 0.0),
    (0.6, 0.3, 1.0),
)
CT_WINDOW = (400.0, 40.0)  # (width, level) in HU: soft tissue
FIGSIZE_IN = (12.0, 4.8)
DPI = 100

# For each view: (RAS axis held fixed, horizontal RAS axis, vertical RAS axis, edge letters L/R/T/B)
_VIEWS = (
    ("axial", 2, 0, 1, ("R", "L", "A", "P")),
    ("coronal", 1, 0, 2, ("R", "L", "S", "I")),
    ("sagittal", 0, 1, 2, ("A", "P", "S", "I")),
)


def write_qc_picture(
    image: np.ndarray,
    mask: np.ndarray,
    affine_ras: np.ndarray,
    label_names: Mapping[int, str],
    out_path: str | Path,
    title: str = "",
    window: Sequence[float] | None = None,
) -> Path:
    """Write a PNG with three orthogonal slices, label contours and a legend, atomically.

    Args:
        image: ``(X, Y, Z)`` intensities (HU for CT) on the grid of ``affine_ras``.
        mask: ``(X, Y, Z)`` integer label map on the same grid.
        affine_ras: 4x4 voxel -> RAS millimetre affine.
        label_names: label value -> name (legend; colours by ascending value, ``LABEL_COLOURS``).
        out_path: destination ``.png``.
        title: figure title; must not contain patient data (callers pass the pseudonymous case id).
        window: ``(width, level)`` display window; default see module docstring.

    Returns:
        ``out_path`` as a Path. The picture is ``FIGSIZE_IN * DPI`` pixels (1200 x 480).
    """
    # No whole-volume copies below (a 512x512x400 scan is 400 MB as float32): the RAS arrays are
    # views, statistics come from one label count and a subsample, and only the three drawn
    # slices are converted to float.
    image, mask = np.asarray(image), np.asarray(mask)
    if image.shape != mask.shape or image.ndim != 3:
        raise ValueError(f"image and mask must be 3D arrays of one shape; got {image.shape} and {mask.shape}")
    ras_image, ras_mask, spacing, oblique = _to_ras(image, mask, np.asarray(affine_ras, dtype=np.float64))
    lo, hi = _display_range(ras_image, window)
    counts = _label_counts(ras_mask, label_names)
    centre = _focus(ras_mask, counts)
    colours = {v: LABEL_COLOURS[i % len(LABEL_COLOURS)] for i, v in enumerate(sorted(label_names))}
    fig = _figure()
    for ax, view in zip(fig.subplots(1, 3), _VIEWS, strict=True):
        _draw_view(ax, view, ras_image, ras_mask, spacing, centre, colours, (lo, hi))
    _draw_legend(fig, colours, label_names)
    note = f"window {lo:.0f}..{hi:.0f}" + ("; oblique grid shown on nearest RAS axes" if oblique else "")
    if not any(counts.values()):
        note += "; NO LABELLED VOXELS"
    fig.suptitle(f"{title}  ({note})" if title else note, color="white", fontsize=11)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.88, bottom=0.12, wspace=0.08)
    out = Path(out_path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="black")
    return out


class QcPictureWriter:
    """``qc.png`` of every case: a review aid, so its failure leaves the case ok with a note."""

    name = "qc_picture"
    title = "QC picture"
    filename = "qc.png"
    optional = False
    flag = ""
    help = ""
    needs_probabilities = False
    fails_case = False

    def applies_to(self, case: SegmentedCase) -> bool:
        return True

    def write(self, case: SegmentedCase, path: Path) -> Path:
        return write_qc_picture(
            case.volume.array[0],
            case.segmentation.labels,
            case.volume.affine_ras,
            case.label_names,
            path,
            # The pseudonymous case id and the model name only: no patient data in the picture.
            title=f"{case.item.case_id} ({case.model_name or 'model'})",
        )


def _figure() -> Figure:
    """A black figure on the Agg canvas (no pyplot: no global state, safe in worker threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, facecolor="black")
    FigureCanvasAgg(fig)
    return fig


def _draw_legend(
    fig: Figure, colours: Mapping[int, tuple[float, float, float]], label_names: Mapping[int, str]
) -> None:
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=colours[v], edgecolor=colours[v], label=f"{v}: {label_names[v]}") for v in colours
    ]
    if handles:
        fig.legend(
            handles=handles,
            loc="lower center",
            ncol=min(len(handles), 6),
            frameon=False,
            labelcolor="white",
            fontsize=10,
        )


def _to_ras(image: np.ndarray, mask: np.ndarray, affine: np.ndarray):
    """Permute/flip both arrays to RAS axes; return them, the RAS spacing and whether it was oblique."""
    from nibabel.orientations import apply_orientation, io_orientation

    ornt = io_orientation(affine)  # (RAS axis, flip) of each array axis: as_closest_canonical does this
    ras_image = apply_orientation(image, ornt)
    ras_mask = apply_orientation(mask, ornt)
    spacing_ijk = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = np.empty(3)
    for axis, (ras_axis, _flip) in enumerate(ornt):
        spacing[int(ras_axis)] = spacing_ijk[axis]
    directions = affine[:3, :3] / spacing_ijk
    oblique = bool(np.abs(np.abs(directions).max(axis=0) - 1.0).max() > 1e-3)
    return ras_image, ras_mask, spacing, oblique


def _display_range(image: np.ndarray, window: Sequence[float] | None) -> tuple[float, float]:
    # Air and the intensity percentiles are properties of large regions: a strided subsample of
    # about 2 M voxels finds them as well as the whole scan, at a fraction of the cost.
    stride = max(1, int(np.ceil((image.size / 2e6) ** (1 / 3))))
    sample = np.asarray(image[::stride, ::stride, ::stride], dtype=np.float32)
    if window is None:
        finite = sample[np.isfinite(sample)]
        if finite.size and float(finite.min()) <= -900.0:
            window = CT_WINDOW
        else:
            lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
            return float(lo), float(max(hi, lo + 1e-6))
    width, level = float(window[0]), float(window[1])
    return level - width / 2.0, level + width / 2.0


def _label_counts(mask: np.ndarray, label_names: Mapping[int, str]) -> dict[int, int]:
    """Voxels per label value, in one pass over the mask."""
    if mask.dtype.kind in "ub" or (mask.dtype.kind == "i" and mask.size and int(mask.min()) >= 0):
        histogram = np.bincount(
            mask.ravel().astype(np.intp, copy=False) if mask.dtype.kind == "b" else mask.ravel()
        )
        return {v: int(histogram[v]) if 0 <= v < histogram.size else 0 for v in label_names}
    return {v: int(np.count_nonzero(mask == v)) for v in label_names}


def _focus(mask: np.ndarray, counts: Mapping[int, int]) -> tuple[int, int, int]:
    """Voxel (RAS array index) at the centroid of the largest labelled structure, else the centre."""
    largest = max(counts, key=counts.__getitem__, default=None)
    if largest is None or counts[largest] == 0:
        return tuple(s // 2 for s in mask.shape)
    region = mask == largest
    plane = region.sum(axis=2, dtype=np.int64)  # per-axis marginals: no (N, 3) index array
    marginals = (plane.sum(axis=1), plane.sum(axis=0), region.sum(axis=(0, 1), dtype=np.int64))
    total = float(counts[largest])
    return tuple(int(round(float(np.dot(np.arange(m.size), m)) / total)) for m in marginals)  # type: ignore[return-value]


def _view_slice(volume: np.ndarray, fixed: int, index: int) -> np.ndarray:
    """2D display array (rows top->bottom, cols left->right) of one RAS slice.

    After taking the slice the remaining axes are (horizontal, vertical) in every view of
    ``_VIEWS`` (x,y / x,z / y,z). Transposing gives (vertical, horizontal); flipping both puts high
    vertical (A or S) at the top and high horizontal (R in axial/coronal, A in sagittal) on the
    left -- the radiological view.
    """
    # Basic indexing (a view), not np.take: take copies a non-contiguous volume whole first, and
    # the DICOM reader's arrays are transposed views (3 s per picture at 512x512x400).
    return volume[(slice(None),) * fixed + (index,)].T[::-1, ::-1]


def _draw_view(ax, view, image, mask, spacing, centre, colours, display_range) -> None:
    name, fixed, horizontal, vertical, letters = view
    img = _view_slice(image, fixed, centre[fixed]).astype(np.float32)
    lab = _view_slice(mask, fixed, centre[fixed])
    ax.imshow(
        img,
        cmap="gray",
        vmin=display_range[0],
        vmax=display_range[1],
        aspect=float(spacing[vertical] / spacing[horizontal]),
        interpolation="nearest",
    )
    rows, cols = np.arange(lab.shape[0]), np.arange(lab.shape[1])
    # A contour needs a 2x2 grid: a view through a single-slice series is one voxel thick, so it
    # is drawn as the image alone (the axial view still shows the contours).
    drawable = min(lab.shape) >= 2
    for value, colour in colours.items():
        region = lab == value
        if drawable and region.any() and not region.all():
            ax.contour(cols, rows, region.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.6)
    ax.set_title(name, color="white", fontsize=10)
    ax.set_axis_off()
    style = {"color": "yellow", "fontsize": 11, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.01, 0.5, letters[0], ha="left", va="center", **style)
    ax.text(0.99, 0.5, letters[1], ha="right", va="center", **style)
    ax.text(0.5, 0.99, letters[2], ha="center", va="top", **style)
    ax.text(0.5, 0.01, letters[3], ha="center", va="bottom", **style)
