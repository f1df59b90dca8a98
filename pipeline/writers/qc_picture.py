"""Quality-control picture of a segmentation: three orthogonal views through *every* present label.

Layout: one row per label present in the prediction (ascending label value), each row the
axial, coronal and sagittal slices through the centroid of that label's largest connected
component, so every segmented structure is on screen (a small label is never hidden by a large
one). All labels' contours are drawn on every view. When the case has uncertainty maps, a last row
shows the total uncertainty (entropy of the ensemble mean, nats) through the largest label. With
no labelled voxel at all, one row through the volume centre, titled "NO LABELLED VOXELS".

Legend: every label of the model with its volume in mL, or "not segmented" when it is absent (so
"absent" and "not on this slice" can no longer be confused). Colours: the Okabe-Ito palette
(distinguishable with the common colour-vision deficiencies; its black is replaced by white, the
background being black). Each view's title gives its slice position in world RAS millimetres
(``z`` for axial, ``y`` for coronal, ``x`` for sagittal).

Display conventions (radiological, what a reviewer expects from a PACS viewer):

* The volume is first reoriented to RAS with ``nibabel.orientations`` (axis permutation and flips
  only, no resampling), so every view is a plain slice of the RAS array. An oblique volume is shown
  on its nearest RAS axes; the title says so (slice positions are then those of the slice's centre
  voxel).
* Axial: patient's right on the screen's left, anterior at the top. Coronal: right on the left,
  superior at the top. Sagittal: anterior on the left, superior at the top. Edge letters mark it.
* Pixel aspect ratio comes from the RAS voxel spacing, so anisotropic voxels look anatomical.
* A view one voxel thick (the coronal and sagittal views of a single-slice series) is drawn as
  the image without contours: a contour needs at least two rows and two columns.
* Intensities: a (width, level) window if given; otherwise CT W400/L40 when the image looks like
  Hounsfield units (it contains air, <= -900), else the 0.5-99.5 percentile range (MR).

Size: ``FIGSIZE_IN[0]`` wide, ``ROW_IN`` per row plus ``MARGIN_IN`` for title and legend, at
``DPI`` (lowered for many rows so the picture stays under ``MAX_HEIGHT_PX``).

Uses matplotlib's object API with the Agg canvas (not pyplot) so it is safe in Dask worker
threads and keeps no global figure state. Contours use matplotlib ``contour`` (no scikit-image).
matplotlib, nibabel and scipy are imported in the functions that draw (see :mod:`pipeline.writers.base`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.writers.base import SegmentedCase
from preprocessing.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

#: Okabe-Ito colours (RGB 0-1) by label rank: orange, sky blue, bluish green, yellow, blue,
#: vermillion, reddish purple, and white in place of black (the background is black).
LABEL_COLOURS: tuple[tuple[float, float, float], ...] = (
    (0.902, 0.624, 0.0),
    (0.337, 0.706, 0.914),
    (0.0, 0.620, 0.451),
    (0.941, 0.894, 0.259),
    (0.0, 0.447, 0.698),
    (0.835, 0.369, 0.0),
    (0.800, 0.475, 0.655),
    (1.0, 1.0, 1.0),
)
CT_WINDOW = (400.0, 40.0)  # (width, level) in HU: soft tissue
FIGSIZE_IN = (12.0, 5.1)  # width; the height of a one-row picture (ROW_IN + MARGIN_IN)
ROW_IN = 3.8  # height of one row of three views
MARGIN_IN = 1.3  # title strip (TOP_IN) plus legend strip (the rest)
TOP_IN = 0.7
DPI = 100
MAX_HEIGHT_PX = 3200
UNCERTAINTY_CMAP = "cividis"  # perceptually uniform and colour-vision-deficiency friendly

# For each view: (RAS axis held fixed, horizontal RAS axis, vertical RAS axis, edge letters L/R/T/B)
_VIEWS = (
    ("axial", 2, 0, 1, ("R", "L", "A", "P")),
    ("coronal", 1, 0, 2, ("R", "L", "S", "I")),
    ("sagittal", 0, 1, 2, ("A", "P", "S", "I")),
)
_AXIS_NAMES = "xyz"


@dataclass(frozen=True)
class _Ras:
    """The case on RAS axes: image, labels, optional uncertainty, spacing, and index -> world mm."""

    image: np.ndarray
    mask: np.ndarray
    uncertainty: np.ndarray | None
    spacing: np.ndarray
    affine: np.ndarray
    ornt: np.ndarray
    shape_ijk: tuple[int, ...]

    def world_mm(self, ras_index: Sequence[int]) -> np.ndarray:
        """World RAS millimetres of a voxel given by its index in the RAS arrays."""
        ijk = np.empty(3)
        for axis, (ras_axis, flip) in enumerate(self.ornt):
            index = ras_index[int(ras_axis)]
            ijk[axis] = self.shape_ijk[axis] - 1 - index if flip < 0 else index
        return self.affine[:3, :3] @ ijk + self.affine[:3, 3]


def write_qc_picture(
    image: np.ndarray,
    mask: np.ndarray,
    affine_ras: np.ndarray,
    label_names: Mapping[int, str],
    out_path: str | Path,
    title: str = "",
    window: Sequence[float] | None = None,
    *,
    uncertainty: np.ndarray | None = None,
) -> Path:
    """Write a PNG with three orthogonal views per present label, contours and a legend, atomically.

    Args:
        image: ``(X, Y, Z)`` intensities (HU for CT) on the grid of ``affine_ras``.
        mask: ``(X, Y, Z)`` integer label map on the same grid.
        affine_ras: 4x4 voxel -> RAS millimetre affine.
        label_names: label value -> name (legend; colours by ascending value, ``LABEL_COLOURS``).
        out_path: destination ``.png``.
        title: figure title; must not contain patient data (callers pass the pseudonymous case id).
        window: ``(width, level)`` display window; default see module docstring.
        uncertainty: optional ``(X, Y, Z)`` total uncertainty (nats) on the same grid: adds a row.

    Returns:
        ``out_path`` as a Path. ``FIGSIZE_IN[0] * DPI`` pixels wide (1200); one row is
        ``FIGSIZE_IN[1] * DPI`` (510) high, each further row adds ``ROW_IN * DPI``.
    """
    # No whole-volume copies below (a 512x512x400 scan is 400 MB as float32): the RAS arrays are
    # views, statistics come from one label count and a subsample, and only the drawn slices are
    # converted to float.
    image, mask = np.asarray(image), np.asarray(mask)
    if image.shape != mask.shape or image.ndim != 3:
        raise ValueError(f"image and mask must be 3D arrays of one shape; got {image.shape} and {mask.shape}")
    if uncertainty is not None and np.shape(uncertainty) != mask.shape:
        raise ValueError(f"uncertainty must have the mask's shape {mask.shape}; got {np.shape(uncertainty)}")
    ras, oblique = _to_ras(image, mask, uncertainty, np.asarray(affine_ras, dtype=np.float64))
    lo, hi = _display_range(ras.image, window)
    counts = _label_counts(ras.mask, label_names)
    present = [v for v in sorted(label_names) if counts[v] > 0]
    colours = {v: LABEL_COLOURS[i % len(LABEL_COLOURS)] for i, v in enumerate(sorted(label_names))}
    rows: list[tuple[str, tuple[int, int, int], bool]] = [
        (f"{v}: {label_names[v]}", _focus(ras.mask, v), False) for v in present
    ] or [("no labels", tuple(s // 2 for s in ras.mask.shape), False)]
    if ras.uncertainty is not None:
        largest = max(present, key=counts.__getitem__, default=None)
        rows.append(("uncertainty", rows[0][1] if largest is None else _focus(ras.mask, largest), True))
    fig = _figure(len(rows))
    axes = np.asarray(fig.subplots(len(rows), 3)).reshape(len(rows), 3)
    for row_axes, (name, centre, is_unc) in zip(axes, rows, strict=True):
        for ax, view in zip(row_axes, _VIEWS, strict=True):
            _draw_view(ax, view, ras, centre, colours, (lo, hi), name, is_unc)
    voxel_ml = abs(float(np.linalg.det(ras.affine[:3, :3]))) / 1000.0
    _draw_legend(fig, colours, label_names, {v: counts[v] * voxel_ml for v in label_names})
    note = f"window {lo:.0f}..{hi:.0f}" + ("; oblique grid shown on nearest RAS axes" if oblique else "")
    if not present:
        note += "; NO LABELLED VOXELS"
    if ras.uncertainty is not None:
        note += f"; uncertainty 0..{_uncertainty_max(ras.uncertainty):.2f} nats ({UNCERTAINTY_CMAP})"
    fig.suptitle(f"{title}  ({note})" if title else note, color="white", fontsize=11)
    out = Path(out_path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, facecolor="black")
    return out


def picture_height_px(rows: int) -> int:
    """Height in pixels of a picture with ``rows`` rows of views (for tests and thumbnails)."""
    height_in = MARGIN_IN + ROW_IN * rows
    return int(round(height_in * _dpi(height_in)))


class QcPictureWriter:
    """``qc.png`` of every case: a review aid, so its failure leaves the case ok with a note."""

    name = "qc_picture"
    title = "QC picture"
    filename = "qc.png"
    optional = False
    flag = ""
    help = ""
    needs_probabilities = False
    needs_uncertainty = False  # drawn when the batch computes it (--uncertainty), never forced
    fails_case = False

    def applies_to(self, case: SegmentedCase) -> bool:
        return True

    def write(self, case: SegmentedCase, path: Path) -> Path:
        segmentation = case.segmentation
        total = None
        if segmentation.uncertainty is not None:
            # Resample only the total-uncertainty channel: a third of the memory of all three.
            only_total = replace(segmentation, uncertainty=segmentation.uncertainty[:1], probabilities=None)
            total = only_total.uncertainty_on_source_grid()[..., 0]
        return write_qc_picture(
            case.volume.array[0],
            segmentation.labels,
            case.volume.affine_ras,
            case.label_names,
            path,
            # The pseudonymous case id and the model name only: no patient data in the picture.
            title=f"{case.item.case_id} ({case.model_name or 'model'})",
            uncertainty=total,
        )


def legend_entries(label_names: Mapping[int, str], volumes_ml: Mapping[int, float]) -> dict[int, str]:
    """Legend text per label value: ``"1: liver  1234.5 mL"`` or ``"2: kidney  not segmented"``."""
    return {
        v: f"{v}: {label_names[v]}  " + (f"{volumes_ml[v]:.1f} mL" if volumes_ml[v] > 0 else "not segmented")
        for v in sorted(label_names)
    }


def _dpi(height_in: float) -> float:
    return min(float(DPI), MAX_HEIGHT_PX / height_in)


def _figure(rows: int) -> Figure:
    """A black figure on the Agg canvas (no pyplot: no global state, safe in worker threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = MARGIN_IN + ROW_IN * rows
    fig = Figure(figsize=(FIGSIZE_IN[0], height), dpi=_dpi(height), facecolor="black")
    FigureCanvasAgg(fig)
    fig.subplots_adjust(
        left=0.02, right=0.98, top=1.0 - TOP_IN / height, bottom=(MARGIN_IN - TOP_IN) / height, wspace=0.08
    )
    return fig


def _draw_legend(
    fig: Figure,
    colours: Mapping[int, tuple[float, float, float]],
    label_names: Mapping[int, str],
    volumes_ml: Mapping[int, float],
) -> None:
    from matplotlib.patches import Patch

    # An absent label: an outline only, so it reads as "missing" even before the text.
    handles = [
        Patch(facecolor=colours[v] if volumes_ml[v] > 0 else "none", edgecolor=colours[v], label=text)
        for v, text in legend_entries(label_names, volumes_ml).items()
    ]
    if handles:
        fig.legend(
            handles=handles,
            loc="lower center",
            ncol=min(len(handles), 4),
            frameon=False,
            labelcolor="white",
            fontsize=10,
        )


def _to_ras(image: np.ndarray, mask: np.ndarray, uncertainty: np.ndarray | None, affine: np.ndarray):
    """Permute/flip the arrays to RAS axes; return them as a :class:`_Ras` and whether it was oblique."""
    from nibabel.orientations import apply_orientation, io_orientation

    ornt = io_orientation(affine)  # (RAS axis, flip) of each array axis: as_closest_canonical does this
    spacing_ijk = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = np.empty(3)
    for axis, (ras_axis, _flip) in enumerate(ornt):
        spacing[int(ras_axis)] = spacing_ijk[axis]
    directions = affine[:3, :3] / spacing_ijk
    oblique = bool(np.abs(np.abs(directions).max(axis=0) - 1.0).max() > 1e-3)
    ras = _Ras(
        image=apply_orientation(image, ornt),
        mask=apply_orientation(mask, ornt),
        uncertainty=None if uncertainty is None else apply_orientation(np.asarray(uncertainty), ornt),
        spacing=spacing,
        affine=affine,
        ornt=ornt,
        shape_ijk=tuple(mask.shape),
    )
    return ras, oblique


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


def _uncertainty_max(uncertainty: np.ndarray) -> float:
    stride = max(1, int(np.ceil((uncertainty.size / 2e6) ** (1 / 3))))
    sample = np.asarray(uncertainty[::stride, ::stride, ::stride], dtype=np.float32)
    finite = sample[np.isfinite(sample)]
    return max(float(finite.max()) if finite.size else 0.0, 1e-6)


def _label_counts(mask: np.ndarray, label_names: Mapping[int, str]) -> dict[int, int]:
    """Voxels per label value, in one pass over the mask."""
    if mask.dtype.kind in "ub" or (mask.dtype.kind == "i" and mask.size and int(mask.min()) >= 0):
        histogram = np.bincount(
            mask.ravel().astype(np.intp, copy=False) if mask.dtype.kind == "b" else mask.ravel()
        )
        return {v: int(histogram[v]) if 0 <= v < histogram.size else 0 for v in label_names}
    return {v: int(np.count_nonzero(mask == v)) for v in label_names}


def _focus(mask: np.ndarray, value: int) -> tuple[int, int, int]:
    """Voxel (RAS array index) nearest the centroid of label ``value``'s largest connected component.

    The components are found inside the label's bounding box only (cheap for a small structure in a
    large scan). The centroid of a curved component can fall outside it; the view then goes
    through the component's voxel nearest the centroid, so the label is always on every view.
    """
    from scipy import ndimage

    region = mask == value
    box = tuple(
        slice(int(np.argmax(hit)), int(hit.size - np.argmax(hit[::-1])))
        for hit in (region.any(axis=(1, 2)), region.any(axis=(0, 2)), region.any(axis=(0, 1)))
    )
    components, n = ndimage.label(region[box])
    if n > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        largest = components == int(np.argmax(sizes))
    else:
        largest = components > 0
    points = np.argwhere(largest)
    centroid = points.mean(axis=0)
    nearest = points[int(np.argmin(((points - centroid) ** 2).sum(axis=1)))]
    return tuple(int(nearest[a] + box[a].start) for a in range(3))  # type: ignore[return-value]


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


def _draw_view(ax, view, ras: _Ras, centre, colours, display_range, row_name: str, is_unc: bool) -> None:
    name, fixed, horizontal, vertical, letters = view
    aspect = float(ras.spacing[vertical] / ras.spacing[horizontal])
    if is_unc and ras.uncertainty is not None:
        img = _view_slice(ras.uncertainty, fixed, centre[fixed]).astype(np.float32)
        vmin, vmax, cmap = 0.0, _uncertainty_max(ras.uncertainty), UNCERTAINTY_CMAP
    else:
        img = _view_slice(ras.image, fixed, centre[fixed]).astype(np.float32)
        (vmin, vmax), cmap = display_range, "gray"
    ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
    lab = _view_slice(ras.mask, fixed, centre[fixed])
    rows, cols = np.arange(lab.shape[0]), np.arange(lab.shape[1])
    # A contour needs a 2x2 grid: a view through a single-slice series is one voxel thick, so it
    # is drawn as the image alone (the axial view still shows the contours).
    drawable = min(lab.shape) >= 2
    for value, colour in colours.items():
        region = lab == value
        if drawable and region.any() and not region.all():
            ax.contour(cols, rows, region.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.6)
    position = float(ras.world_mm(centre)[fixed])
    ax.set_title(f"{row_name} | {name} {_AXIS_NAMES[fixed]} = {position:+.1f} mm", color="white", fontsize=9)
    ax.set_axis_off()
    style = {"color": "0.7", "fontsize": 11, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.01, 0.5, letters[0], ha="left", va="center", **style)
    ax.text(0.99, 0.5, letters[1], ha="right", va="center", **style)
    ax.text(0.5, 0.99, letters[2], ha="center", va="top", **style)
    ax.text(0.5, 0.01, letters[3], ha="center", va="bottom", **style)
