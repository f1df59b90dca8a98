"""Sliding-window inference settings, and the one place they are derived from a plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from preprocessing.plan import Plan


@dataclass(frozen=True)
class InferenceConfig:
    """How to run sliding-window inference. Every speed lever is a field; defaults are safe.

    Attributes:
        roi_size: window size ``(X, Y, Z)`` in voxels (the plan's patch size).
        overlap: fraction of a window shared with its neighbour along each axis, in ``[0, 1)``.
        sw_batch_size: windows per network call (times the number of mirrors when ``tta``).
        max_network_batch: upper bound on samples per network call (windows x mirrors); None
            runs all mirrors of ``sw_batch_size`` windows in one call. Bounds activation memory.
        sigma_scale: Gaussian sigma as a fraction of the window size (MONAI / nnU-Net: 0.125).
        mode: ``"gaussian"`` or ``"constant"`` blending of overlapping windows.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"`` works too): where the network runs.
        amp: autocast on CUDA (``amp_dtype``); ignored on CPU unless ``amp_on_cpu``.
        amp_dtype: ``"bfloat16"`` or ``"float16"``.
        amp_on_cpu: also autocast on CPU (bf16); off by default because it is rarely faster there.
        tta: average the 8 mirrorings over the 3 spatial axes (probabilities only).
        compile: ``torch.compile`` each network, per input shape, falling back to eager on failure.
        compile_backend: torch.compile backend (``"inductor"``; ``"eager"`` for tests).
        compile_mode: torch.compile mode (e.g. ``"max-autotune-no-cudagraphs"``) or None.
        cuda_graphs: capture the network call in a CUDA graph per window-batch shape (CUDA only).
        channels_last: use the ``channels_last_3d`` memory format for windows and networks
            (on a copy of the network; often faster for 3D convolutions on CPU and GPU alike).
        fold_batchnorm: run a copy of each network with eval-mode BatchNorm folded into the
            preceding convolutions (same result to float tolerance; no effect without BatchNorm).
        output_device: None (auto: accumulate on ``device`` if it fits, else on the host),
            ``"device"`` (force accumulation on ``device``) or ``"cpu"`` (force host stitching).
        accumulate_dtype: ``"float32"`` or ``"float16"`` accumulator (halves output memory).
        stage_input: None (auto: whole image to ``device`` if it fits), ``"device"`` or
            ``"stream"`` (image stays on the host; windows are gathered and prefetched).
        batch_passes: accumulate all ensemble/mirror passes side by side in one sweep when memory
            allows (else one sweep per pass; results are identical).
        max_accumulator_bytes: memory budget for accumulators; None: half the free GPU memory, or
            a quarter of the host RAM.
        progress: show a progress bar over window batches.
        temperature: the model's calibration temperature ``T > 0``: probabilities are the
            softmax of ``logits / T`` (``bundle.temperature``; 1.0 = uncalibrated, bit for bit
            the plain softmax). Blended logits (``sliding_window_logits``) are not scaled.
    """

    roi_size: tuple[int, int, int] = (128, 128, 128)
    overlap: float = 0.5
    sw_batch_size: int = 4
    max_network_batch: int | None = None
    sigma_scale: float = 0.125
    mode: str = "gaussian"
    device: str = "cpu"
    amp: bool = True
    amp_dtype: str = "bfloat16"
    amp_on_cpu: bool = False
    tta: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    cuda_graphs: bool = False
    channels_last: bool = False
    fold_batchnorm: bool = True
    output_device: str | None = None
    accumulate_dtype: str = "float32"
    stage_input: str | None = None
    batch_passes: bool = True
    max_accumulator_bytes: int | None = None
    progress: bool = False
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be 3 positive ints; got {self.roi_size!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1); got {self.overlap}")
        if self.mode not in ("gaussian", "constant"):
            raise ValueError(f"mode must be 'gaussian' or 'constant'; got {self.mode!r}")
        if self.output_device not in (None, "device", "cpu"):
            raise ValueError(f"output_device must be None, 'device' or 'cpu'; got {self.output_device!r}")
        if self.stage_input not in (None, "device", "stream"):
            raise ValueError(f"stage_input must be None, 'device' or 'stream'; got {self.stage_input!r}")
        if self.accumulate_dtype not in ("float32", "float16"):
            raise ValueError(
                f"accumulate_dtype must be 'float32' or 'float16'; got {self.accumulate_dtype!r}"
            )
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be 'bfloat16' or 'float16'; got {self.amp_dtype!r}")
        if not (self.temperature > 0.0 and self.temperature < float("inf")):
            raise ValueError(f"temperature must be a positive finite number; got {self.temperature}")
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1; got {self.sw_batch_size}")


def inference_config_for(plan: Plan, **overrides: Any) -> InferenceConfig:
    """The sliding-window settings for a model trained with ``plan``.

    The window is the plan's patch size (what the network was trained on); every other field
    keeps its :class:`InferenceConfig` default unless given in ``overrides``.

    Args:
        plan: the model's plan (``bundle.plan``).
        **overrides: any :class:`InferenceConfig` field (``device``, ``overlap``, ``tta``...).
    """
    overrides.setdefault("roi_size", tuple(int(v) for v in plan.patch_size))
    return InferenceConfig(**overrides)
