"""Constant acquisition macros of synthetic Enhanced CT/MR objects (what the IODs make mandatory).

The values are plausible constants, not a simulation: a validator (dciodvfy, highdicom) asks for
these attributes, readers of geometry never look at them. Written by hand for the reason given in
:mod:`preprocessing.synthetic.enhanced` (no library builds genuine Enhanced CT/MR objects).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence


def dataset_item(**attributes: object) -> Dataset:
    """A sequence item with the given keyword attributes."""
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """A coded concept (CodeValue, CodingSchemeDesignator, CodeMeaning)."""
    return dataset_item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def add_ct_acquisition_macros(shared: Dataset) -> None:
    """Plausible constant values for the CT macros the Enhanced CT IOD makes mandatory."""
    shared.CTAcquisitionTypeSequence = Sequence(
        [dataset_item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")]
    )
    details = dataset_item(
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
        [dataset_item(TableSpeed=40.0, TableFeedPerRotation=20.0, SpiralPitchFactor=0.5)]
    )
    position = dataset_item(
        TablePosition=0.0,
        ReconstructionTargetCenterPatient=[0.0, 0.0, 0.0],
        DataCollectionCenterPatient=[0.0, 0.0, 0.0],
    )
    shared.CTPositionSequence = Sequence([position])
    shared.CTGeometrySequence = Sequence(
        [dataset_item(DistanceSourceToDetector=1000.0, DistanceSourceToDataCollectionCenter=550.0)]
    )
    recon = dataset_item(
        ReconstructionAlgorithm="FILTER_BACK_PROJ",
        ConvolutionKernel="STANDARD",
        ConvolutionKernelGroup="SOFT_TISSUE",
        ReconstructionFieldOfView=[400.0, 400.0],
        ReconstructionPixelSpacing=[1.0, 1.0],
        ReconstructionAngle=360.0,
        ImageFilter="NONE",
    )
    shared.CTReconstructionSequence = Sequence([recon])
    exposure = dataset_item(
        ExposureTimeInms=500.0, XRayTubeCurrentInmA=200.0, ExposureInmAs=100.0, ExposureModulationType="NONE"
    )
    shared.CTExposureSequence = Sequence([exposure])
    xray = dataset_item(
        KVP=120.0,
        FocalSpots=[1.0],
        FilterType="BODY",
        FilterMaterial="ALUMINUM",
        CalciumScoringMassFactorPatient=0.8,
    )
    shared.CTXRayDetailsSequence = Sequence([xray])


def add_mr_acquisition_macros(shared: Dataset) -> None:
    """Plausible constant values for the MR macros the Enhanced MR IOD makes mandatory."""
    shared.MRTimingAndRelatedParametersSequence = Sequence([_mr_timing()])
    shared.MREchoSequence = Sequence([dataset_item(EffectiveEchoTime=90.0)])
    shared.MRModifierSequence = Sequence([_mr_modifier()])
    imaging_modifier = dataset_item(
        MagnetizationTransfer="NONE",
        BloodSignalNulling="NO",
        Tagging="NONE",
        TransmitterFrequency=63.9,
        PixelBandwidth=200.0,
    )
    shared.MRImagingModifierSequence = Sequence([imaging_modifier])
    _add_mr_coils(shared)
    shared.MRAveragesSequence = Sequence([dataset_item(NumberOfAverages=1.0)])
    fov = dataset_item(
        InPlanePhaseEncodingDirection="ROW",
        MRAcquisitionFrequencyEncodingSteps=256,
        MRAcquisitionPhaseEncodingStepsInPlane=256,
        PercentSampling=100.0,
        PercentPhaseFieldOfView=100.0,
    )
    shared.MRFOVGeometrySequence = Sequence([fov])


def _mr_timing() -> Dataset:
    """MR Timing and Related Parameters: a 3 s TR spin echo at normal operating mode."""
    sar = dataset_item(SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY", SpecificAbsorptionRateValue=1.0)
    operating_mode = dataset_item(OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL")
    return dataset_item(
        RepetitionTime=3000.0,
        FlipAngle=90.0,
        EchoTrainLength=1,
        RFEchoTrainLength=1,
        GradientEchoTrainLength=0,
        SpecificAbsorptionRateSequence=Sequence([sar]),
        GradientOutput=10.0,
        GradientOutputType="DB_DT",
        OperatingModeSequence=Sequence([operating_mode]),
    )


def _mr_modifier() -> Dataset:
    """MR Modifier: no inversion, preparation, presaturation or parallel imaging."""
    return dataset_item(
        InversionRecovery="NO",
        FlowCompensation="NONE",
        T2Preparation="NO",
        SpectrallySelectedExcitation="NONE",
        SpatialPresaturation="NONE",
        PartialFourier="NO",
        ParallelAcquisition="NO",
    )


def _add_mr_coils(shared: Dataset) -> None:
    """MR Receive and Transmit Coil macros: the body coil for both."""
    receive = dataset_item(
        ReceiveCoilName="BODY",
        ReceiveCoilManufacturerName="SYNTH",
        ReceiveCoilType="BODY",
        QuadratureReceiveCoil="YES",
    )
    shared.MRReceiveCoilSequence = Sequence([receive])
    transmit = dataset_item(
        TransmitCoilName="BODY", TransmitCoilManufacturerName="SYNTH", TransmitCoilType="BODY"
    )
    shared.MRTransmitCoilSequence = Sequence([transmit])


def add_mr_pulse_sequence_module(ds: Dataset) -> None:
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
