"""Synthetic Enhanced CT/MR multi-frame DICOM objects and a non-image object (Basic Text SR).

Written by hand with pydicom because highdicom only builds *Legacy Converted* Enhanced images
from existing single-frame instances; a test needs a genuine Enhanced CT/MR Image Storage object
whose geometry lives only in the functional groups:

- Shared: PlaneOrientationSequence (IOP), PixelMeasuresSequence (PixelSpacing, SliceThickness),
  PixelValueTransformationSequence (rescale), plus frame-type macros.
- Per frame: PlanePositionSequence (IPP of frame f), FrameContentSequence.

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

_ENHANCED_SOP_CLASS = {"CT": EnhancedCTImageStorage, "MR": EnhancedMRImageStorage}


def _item(**attributes: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _shared_groups(spec: DicomSeriesSpec, geo: dict) -> Dataset:
    """Functional groups identical for all frames: orientation, pixel measures, rescale, frame type."""
    step = abs(float(geo["slice_step"]))
    shared = _item(
        PlaneOrientationSequence=Sequence(
            [_item(ImageOrientationPatient=[format_decimal_string(v) for v in geo["iop"]])]
        ),
        PixelMeasuresSequence=Sequence(
            [
                _item(
                    PixelSpacing=[format_decimal_string(v) for v in geo["pixel_spacing"]],
                    SliceThickness=format_decimal_string(step),
                    SpacingBetweenSlices=format_decimal_string(step),
                )
            ]
        ),
        PixelValueTransformationSequence=Sequence(
            [
                _item(
                    RescaleSlope=format_decimal_string(spec.rescale_slope),
                    RescaleIntercept=format_decimal_string(float(spec.rescale_intercept or 0.0)),
                    RescaleType="HU" if spec.modality == "CT" else "US",
                )
            ]
        ),
        FrameVOILUTSequence=Sequence(
            [
                _item(
                    WindowCenter=format_decimal_string(spec.window_center),
                    WindowWidth=format_decimal_string(spec.window_width),
                )
            ]
        ),
        FrameAnatomySequence=Sequence(
            [
                _item(
                    FrameLaterality="U",
                    AnatomicRegionSequence=Sequence([_code("818981001", "SCT", "Abdomen")]),
                )
            ]
        ),
    )
    frame_type = _item(
        FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
        PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME",
        VolumeBasedCalculationTechnique="NONE",
    )
    if spec.modality == "CT":
        shared.CTImageFrameTypeSequence = Sequence([frame_type])
        _add_ct_acquisition_macros(shared, step)
        shared.IrradiationEventIdentificationSequence = Sequence(
            [_item(IrradiationEventUID=generate_uid(entropy_srcs=[str(spec.series_uid), "irradiation"]))]
        )
    else:
        frame_type.ComplexImageComponent = "MAGNITUDE"
        frame_type.AcquisitionContrast = "T2"
        shared.MRImageFrameTypeSequence = Sequence([frame_type])
        _add_mr_acquisition_macros(shared)
    return shared


def _add_ct_acquisition_macros(shared: Dataset, step: float) -> None:
    """Plausible constant values for the CT macros the Enhanced CT IOD makes mandatory."""
    shared.CTAcquisitionTypeSequence = Sequence(
        [_item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")]
    )
    details = _item(
        DataCollectionDiameter=500.0,
        RevolutionTime=0.5,
        TotalCollimationWidth=40.0,
        SingleCollimationWidth=0.625,
        TableHeight=150.0,
        GantryDetectorTilt=0.0,
        RotationDirection="CW",
    )
    shared.CTAcquisitionDetailsSequence = Sequence([details])
    shared.CTTableDynamicsSequence = Sequence(
        [_item(TableSpeed=40.0, TableFeedPerRotation=20.0, SpiralPitchFactor=0.5)]
    )
    shared.CTPositionSequence = Sequence(
        [
            _item(
                TablePosition=0.0,
                ReconstructionTargetCenterPatient=[0.0, 0.0, 0.0],
                DataCollectionCenterPatient=[0.0, 0.0, 0.0],
            )
        ]
    )
    shared.CTGeometrySequence = Sequence(
        [_item(DistanceSourceToDetector=1000.0, DistanceSourceToDataCollectionCenter=550.0)]
    )
    recon = _item(
        ReconstructionAlgorithm="FILTER_BACK_PROJ",
        ConvolutionKernel="STANDARD",
        ConvolutionKernelGroup="SOFT_TISSUE",
        ReconstructionFieldOfView=[400.0, 400.0],
        ReconstructionPixelSpacing=[1.0, 1.0],
        ReconstructionAngle=360.0,
        ImageFilter="NONE",
    )
    shared.CTReconstructionSequence = Sequence([recon])
    exposure = _item(
        ExposureTimeInms=500.0, XRayTubeCurrentInmA=200.0, ExposureInmAs=100.0, ExposureModulationType="NONE"
    )
    shared.CTExposureSequence = Sequence([exposure])
    shared.CTXRayDetailsSequence = Sequence(
        [
            _item(
                KVP=120.0,
                FocalSpots=[1.0],
                FilterType="BODY",
                FilterMaterial="ALUMINUM",
                CalciumScoringMassFactorPatient=0.8,
            )
        ]
    )
    del step


def _add_mr_acquisition_macros(shared: Dataset) -> None:
    """Plausible constant values for the MR macros the Enhanced MR IOD makes mandatory."""
    shared.MRTimingAndRelatedParametersSequence = Sequence(
        [
            _item(
                RepetitionTime=3000.0,
                FlipAngle=90.0,
                EchoTrainLength=1,
                RFEchoTrainLength=1,
                GradientEchoTrainLength=0,
                SpecificAbsorptionRateSequence=Sequence(
                    [
                        _item(
                            SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY", SpecificAbsorptionRateValue=1.0
                        )
                    ]
                ),
                GradientOutput=10.0,
                GradientOutputType="DB_DT",
                OperatingModeSequence=Sequence(
                    [_item(OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL")]
                ),
            )
        ]
    )
    shared.MREchoSequence = Sequence([_item(EffectiveEchoTime=90.0)])
    shared.MRModifierSequence = Sequence(
        [
            _item(
                InversionRecovery="NO",
                FlowCompensation="NONE",
                T2Preparation="NO",
                SpectrallySelectedExcitation="NONE",
                SpatialPresaturation="NONE",
                PartialFourier="NO",
                ParallelAcquisition="NO",
            )
        ]
    )
    shared.MRImagingModifierSequence = Sequence(
        [
            _item(
                MagnetizationTransfer="NONE",
                BloodSignalNulling="NO",
                Tagging="NONE",
                TransmitterFrequency=63.9,
                PixelBandwidth=200.0,
            )
        ]
    )
    shared.MRReceiveCoilSequence = Sequence(
        [
            _item(
                ReceiveCoilName="BODY",
                ReceiveCoilManufacturerName="SYNTH",
                ReceiveCoilType="BODY",
                QuadratureReceiveCoil="YES",
            )
        ]
    )
    shared.MRTransmitCoilSequence = Sequence(
        [_item(TransmitCoilName="BODY", TransmitCoilManufacturerName="SYNTH", TransmitCoilType="BODY")]
    )
    shared.MRAveragesSequence = Sequence([_item(NumberOfAverages=1.0)])
    fov = _item(
        InPlanePhaseEncodingDirection="ROW",
        MRAcquisitionFrequencyEncodingSteps=256,
        MRAcquisitionPhaseEncodingStepsInPlane=256,
        PercentSampling=100.0,
        PercentPhaseFieldOfView=100.0,
    )
    shared.MRFOVGeometrySequence = Sequence([fov])


def _per_frame_groups(geo: dict, order: np.ndarray, acquired: str) -> Sequence:
    """Frame f shows slice ``order[f]`` of the grid: its IPP and in-stack position say so."""
    frames = []
    for k in order:
        ipp = geo["affine_lps"] @ np.array([0.0, 0.0, float(k), 1.0])
        content = _item(
            StackID="1",
            InStackPositionNumber=int(k) + 1,
            DimensionIndexValues=[1, int(k) + 1],
            FrameReferenceDateTime=acquired,
            FrameAcquisitionDateTime=acquired,
            FrameAcquisitionDuration=100.0,
        )
        frames.append(
            _item(
                FrameContentSequence=Sequence([content]),
                PlanePositionSequence=Sequence(
                    [_item(ImagePositionPatient=[format_decimal_string(v) for v in ipp[:3]])]
                ),
            )
        )
    return Sequence(frames)


def _dimension_module(ds: Dataset, dimension_uid: str) -> None:
    """Multi-frame Dimension module: frames indexed by (StackID, InStackPositionNumber)."""
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=dimension_uid)])
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = Sequence(
        [
            _item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=0x00209056,  # StackID
                FunctionalGroupPointer=0x00209111,  # FrameContentSequence
            ),
            _item(
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
        _mr_pulse_sequence_module(ds)


def _mr_pulse_sequence_module(ds: Dataset) -> None:
    """MR Pulse Sequence module (required for ORIGINAL Enhanced MR images): a plain 2D spin echo."""
    attributes = {
        "PulseSequenceName": "SYNTH_SE",
        "MRAcquisitionType": "2D",
        "EchoPulseSequence": "SPIN",
        "MultipleSpinEcho": "NO",
        "MultiPlanarExcitation": "NO",
        "PhaseContrast": "NO",
        "TimeOfFlightContrast": "NO",
        "SteadyStatePulseSequence": "NONE",
        "EchoPlanarPulseSequence": "NO",
        "SaturationRecovery": "NO",
        "SpectrallySelectedSuppression": "NONE",
        "OversamplingPhase": "NONE",
        "GeometryOfKSpaceTraversal": "RECTILINEAR",
        "RectilinearPhaseEncodeReordering": "LINEAR",
        "SegmentedKSpaceTraversal": "SINGLE",
        "NumberOfKSpaceTrajectories": 1,
    }
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)


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
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentTemplateSequence = Sequence([_item(MappingResource="DCMR", TemplateIdentifier="2000")])
    finding = _item(
        RelationshipType="CONTAINS",
        ValueType="TEXT",
        ConceptNameCodeSequence=Sequence([_code("121071", "DCM", "Finding")]),
        TextValue=text,
    )
    ds.ContentSequence = Sequence([finding])
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    return save_dataset(ds, Path(path))
