"""Synthetic Enhanced CT/MR multi-frame DICOM objects and a non-image object (Basic Text SR).

Written by hand with pydicom because highdicom only builds *Legacy Converted* Enhanced images
from existing single-frame instances; a test needs a genuine Enhanced CT/MR Image Storage object
whose geometry lives only in the functional groups:

- Shared: PlaneOrientationSequence (IOP), PixelMeasuresSequence (PixelSpacing, SliceThickness),
  PixelValueTransformationSequence (rescale), plus frame-type macros.
- Per frame: PlanePositionSequence (IPP of frame f), FrameContentSequence.

The constant acquisition macros the IODs make mandatory are in
:mod:`preprocessing.synthetic.enhanced_macros`.

Public: :func:`write_enhanced_dicom`, :func:`write_text_sr`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, BasicTextSRStorage, EnhancedCTImageStorage, EnhancedMRImageStorage, generate_uid

from preprocessing.synthetic.dicom import (
    DicomSeriesSpec,
    affine_to_dicom_geometry,
    base_dataset,
    encode,
    format_decimal_string,
    save_dataset,
    stored_values,
)
from preprocessing.synthetic.enhanced_macros import (
    add_ct_acquisition_macros,
    add_mr_acquisition_macros,
    add_mr_pulse_sequence_module,
    code_item,
    dataset_item,
)

_ENHANCED_SOP_CLASS = {"CT": EnhancedCTImageStorage, "MR": EnhancedMRImageStorage}


def _shared_groups(spec: DicomSeriesSpec, geo: dict) -> Dataset:
    """Functional groups identical for all frames: orientation, pixel measures, rescale, frame type."""
    step = format_decimal_string(abs(float(geo["slice_step"])))
    measures = dataset_item(
        PixelSpacing=[format_decimal_string(v) for v in geo["pixel_spacing"]],
        SliceThickness=step,
        SpacingBetweenSlices=step,
    )
    rescale = dataset_item(
        RescaleSlope=format_decimal_string(spec.rescale_slope),
        RescaleIntercept=format_decimal_string(float(spec.rescale_intercept or 0.0)),
        RescaleType="HU" if spec.modality == "CT" else "US",
    )
    window = dataset_item(
        WindowCenter=format_decimal_string(spec.window_center),
        WindowWidth=format_decimal_string(spec.window_width),
    )
    anatomy = dataset_item(
        FrameLaterality="U", AnatomicRegionSequence=Sequence([code_item("818981001", "SCT", "Abdomen")])
    )
    shared = dataset_item(
        PlaneOrientationSequence=Sequence(
            [dataset_item(ImageOrientationPatient=[format_decimal_string(v) for v in geo["iop"]])]
        ),
        PixelMeasuresSequence=Sequence([measures]),
        PixelValueTransformationSequence=Sequence([rescale]),
        FrameVOILUTSequence=Sequence([window]),
        FrameAnatomySequence=Sequence([anatomy]),
    )
    _add_frame_type_and_acquisition(shared, spec)
    return shared


def _add_frame_type_and_acquisition(shared: Dataset, spec: DicomSeriesSpec) -> None:
    """The modality's image frame type macro and its mandatory acquisition macros."""
    frame_type = dataset_item(
        FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
        PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME",
        VolumeBasedCalculationTechnique="NONE",
    )
    if spec.modality == "CT":
        shared.CTImageFrameTypeSequence = Sequence([frame_type])
        add_ct_acquisition_macros(shared)
        event_uid = generate_uid(entropy_srcs=[str(spec.series_uid), "irradiation"])
        shared.IrradiationEventIdentificationSequence = Sequence(
            [dataset_item(IrradiationEventUID=event_uid)]
        )
    else:
        frame_type.ComplexImageComponent = "MAGNITUDE"
        frame_type.AcquisitionContrast = "T2"
        shared.MRImageFrameTypeSequence = Sequence([frame_type])
        add_mr_acquisition_macros(shared)


def _per_frame_groups(geo: dict, order: np.ndarray, acquired: str) -> Sequence:
    """Frame f shows slice ``order[f]`` of the grid: its IPP and in-stack position say so."""
    frames = []
    for k in order:
        ipp = geo["affine_lps"] @ np.array([0.0, 0.0, float(k), 1.0])
        content = dataset_item(
            StackID="1",
            InStackPositionNumber=int(k) + 1,
            DimensionIndexValues=[1, int(k) + 1],
            FrameReferenceDateTime=acquired,
            FrameAcquisitionDateTime=acquired,
            FrameAcquisitionDuration=100.0,
        )
        frames.append(
            dataset_item(
                FrameContentSequence=Sequence([content]),
                PlanePositionSequence=Sequence(
                    [dataset_item(ImagePositionPatient=[format_decimal_string(v) for v in ipp[:3]])]
                ),
            )
        )
    return Sequence(frames)


def _dimension_module(ds: Dataset, dimension_uid: str) -> None:
    """Multi-frame Dimension module: frames indexed by (StackID, InStackPositionNumber)."""
    ds.DimensionOrganizationSequence = Sequence([dataset_item(DimensionOrganizationUID=dimension_uid)])
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = Sequence(
        [
            dataset_item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=0x00209056,  # StackID
                FunctionalGroupPointer=0x00209111,  # FrameContentSequence
            ),
            dataset_item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=0x00209057,  # InStackPositionNumber
                FunctionalGroupPointer=0x00209111,
            ),
        ]
    )


def _enhanced_image_attributes(ds: Dataset, spec: DicomSeriesSpec) -> None:
    """Enhanced CT/MR Image and equipment attributes (type 1/2 ones a validator asks for)."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = f"{spec.study_date}{spec.study_time}"
    ds.AcquisitionDuration = 1.0
    ds.AcquisitionContextSequence = Sequence()
    ds.ContentDate, ds.ContentTime = spec.study_date, spec.study_time
    if spec.modality == "MR":
        ds.ComplexImageComponent = "MAGNITUDE"
        ds.AcquisitionContrast = "T2"
        ds.MagneticFieldStrength = "1.5"
        ds.ResonantNucleus = "1H"
        ds.KSpaceFiltering = "NONE"
        ds.ApplicableSafetyStandardAgency = "IEC"
        ds.ImageComments = "synthetic"
        add_mr_pulse_sequence_module(ds)


def write_enhanced_dicom(
    image: np.ndarray,
    affine_ras: np.ndarray,
    path: str | Path,
    spec: DicomSeriesSpec,
    *,
    shuffle_frames: bool = False,
) -> Path:
    """Write ``image`` as one Enhanced CT (or MR) Image Storage multi-frame file.

    Args:
        image: ``(X, Y, Z)`` values (HU for CT); frame for slice k is ``image[:, :, k].T``
            (Rows = Y, Columns = X).
        affine_ras: 4x4 voxel->RAS mm affine of ``image`` (orthogonal axes).
        path: output file (any name, extension optional).
        spec: header content; ``spec.transfer_syntax`` may be compressed (all frames encoded).
        shuffle_frames: store frames in a seeded random order (per-frame positions follow the
            frames), so a reader that trusts frame order instead of PlanePosition fails.

    Returns:
        The written path.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be (X, Y, Z); got shape {image.shape}")
    geo = affine_to_dicom_geometry(affine_ras)
    n = image.shape[2]
    order = np.arange(n)
    if shuffle_frames:
        order = np.random.default_rng([spec.seed, spec.series_number, 79]).permutation(n)
    ds = base_dataset(spec, _ENHANCED_SOP_CLASS[spec.modality], spec.instance_uid(0))
    ds.FrameOfReferenceUID = spec.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n
    _enhanced_image_attributes(ds, spec)
    dimension_uid = generate_uid(entropy_srcs=[str(spec.series_uid), "dimension"])
    _dimension_module(ds, dimension_uid)
    ds.SharedFunctionalGroupsSequence = Sequence([_shared_groups(spec, geo)])
    ds.PerFrameFunctionalGroupsSequence = _per_frame_groups(geo, order, f"{spec.study_date}{spec.study_time}")
    frames = np.stack([stored_values(image, spec)[:, :, k].T for k in order])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(frames.shape[1]), int(frames.shape[2])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if spec.signed else 0
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    encode(ds, spec.transfer_syntax)
    return save_dataset(ds, Path(path))


def write_text_sr(
    path: str | Path, spec: DicomSeriesSpec, text: str = "Synthetic report: no findings."
) -> Path:
    """Write a minimal Basic Text SR (a non-image object an ingestion scan must skip).

    Args:
        path: output file.
        spec: patient/study identity; ``spec.series_uid`` becomes the SR's series.
        text: the report text.

    Returns:
        The written path.
    """
    ds = base_dataset(spec, BasicTextSRStorage, spec.instance_uid(0))
    ds.Modality = "SR"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = spec.study_date, spec.study_time
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([code_item("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentTemplateSequence = Sequence([dataset_item(MappingResource="DCMR", TemplateIdentifier="2000")])
    finding = dataset_item(
        RelationshipType="CONTAINS",
        ValueType="TEXT",
        ConceptNameCodeSequence=Sequence([code_item("121071", "DCM", "Finding")]),
        TextValue=text,
    )
    ds.ContentSequence = Sequence([finding])
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    return save_dataset(ds, Path(path))
