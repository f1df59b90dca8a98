"""The project's one sliding-window inference engine (training validation and prediction).

Window positions and Gaussian importance map are MONAI's ``sliding_window_inference`` ones
(same scan interval, same ``compute_importance_map``), so results agree with MONAI to float
tolerance. Why not call MONAI directly: the product's GPU target (320^3, roi 128^3, 14 classes in
<= 0.40 s against MONAI's 0.75 s) needs levers MONAI's loop does not have, all switchable in
:class:`InferenceConfig` and each tested for equality with the plain path:

- windows batched, gathered into a reused buffer; fold-ensemble and mirror (TTA) passes of a
  window run in the same network call;
- one preallocated accumulator (fp32 or fp16) updated with a fused multiply-add, and a weight
  map computed once per geometry (cached), divided out once at the end;
- bf16/fp16 autocast on CUDA, ``channels_last_3d``, BatchNorm folded into convolutions;
- ``torch.compile`` with a per-shape cache and an eager fallback when compilation fails;
- CUDA graphs for the fixed window batch shape (the last batch is padded to that shape);
- pinned-memory, side-stream H2D prefetch of the next windows when the image stays on the host;
- host stitching (accumulator in CPU memory) when the output would not fit the GPU.

How windows reach the network lives in :mod:`pipeline.inference.window_feeder`, how it runs
(compile, CUDA graphs, BatchNorm folding) in :mod:`pipeline.inference.network_runner`; this
module holds the window grid, the blending and the averaging over ensemble members.

Arrays are ``(B, C, X, Y, Z)``: batch, channel, then voxel axes ``i, j, k`` of the image affine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from torch import nn

from pipeline.inference.config import InferenceConfig
from pipeline.inference.member_output import MemberOutput, pass_hook
from pipeline.inference.network_runner import NetworkRunner, network_autocast
from pipeline.inference.window_feeder import WindowFeeder, WindowPosition

logger = logging.getLogger(__name__)

# The 8 mirrorings over the 3 spatial axes of a (N, C, X, Y, Z) batch (nnU-Net's test-time
# augmentation); the empty tuple is the un-mirrored pass.
MIRROR_AXES: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))


def sliding_window_logits(image: torch.Tensor, network: nn.Module, config: InferenceConfig) -> torch.Tensor:
    """Blended logits of ``network`` over ``image`` by overlapping windows.

    Args:
        image: ``(B, C, X, Y, Z)`` float tensor on any device (moved as ``config`` says).
        network: maps ``(n, C, *roi_size)`` to ``(n, K, *roi_size)`` logits (or a list/tuple of
            deep-supervision outputs, full resolution first). Put in eval mode for the call.
        config: see :class:`InferenceConfig` (``tta`` is ignored here: mirrors average
            probabilities, see :func:`predict_probabilities`).

    Returns:
        ``(B, K, X, Y, Z)`` float32 logits, on ``config.device`` unless host stitching was used
        (then on the CPU).
    """
    if image.ndim != 5:
        raise ValueError(f"sliding_window_logits expects (B, C, X, Y, Z); got shape {tuple(image.shape)}")
    # no_grad, not inference_mode: callers may update the result in place outside the context.
    with _eval_mode([network]), torch.no_grad():
        sweep = _Sweep(image, [network], [()], config)
        out = sweep.run(n_passes=1)
        return out.finish_logits(0)


def predict_probabilities(
    image: torch.Tensor,
    networks: Sequence[nn.Module],
    config: InferenceConfig,
    *,
    on_member: Callable[[MemberOutput], None] | None = None,
) -> torch.Tensor:
    """Class probabilities averaged over a fold ensemble and (with ``config.tta``) 8 mirrorings.

    Each pass (network x mirror) is blended over windows as logits, turned into probabilities
    with a softmax, and the probabilities are averaged over passes. A mirror pass flips each
    window before the network and flips the logits back (nnU-Net style: same window grid). The
    passes of a window run in one network call; their accumulators sit side by side when memory
    allows, otherwise the sweep is repeated per pass (identical result).

    Args:
        image: ``(C, X, Y, Z)`` float tensor (already resampled and normalised for the network).
        networks: one or more networks with the same output classes ``K``.
        config: see :class:`InferenceConfig`.
        on_member: called with each pass (ensemble member: fold x mirror, fold-major) as soon
            as its probabilities are done: out of the one side-by-side sweep when its
            accumulators fit (the plain path's memory, no extra sweep), else from one sweep per
            pass (the memory-budget path). The engine keeps no K-channel tensor per member for
            the hook; the result is the same mean either way (to float tolerance).

    Returns:
        ``(K, X, Y, Z)`` float32 probabilities summing to 1 over ``K``, on ``config.device``
        unless host stitching was used (then on the CPU).
    """
    if image.ndim != 4:
        raise ValueError(f"predict_probabilities expects (C, X, Y, Z); got shape {tuple(image.shape)}")
    if not networks:
        raise ValueError("predict_probabilities needs at least one network")
    mirrors: list[tuple[int, ...]] = list(MIRROR_AXES) if config.tta else [()]
    n_passes = len(networks) * len(mirrors)
    with _eval_mode(networks), torch.no_grad():
        if n_passes == 1 or config.batch_passes:
            try:
                sweep = _Sweep(image[None], list(networks), mirrors, config, side_by_side=n_passes > 1)
                return sweep.run(n_passes).finish_mean_softmax(pass_hook(on_member, mirrors))[0]
            except _PassesDoNotFit:
                pass
        logger.info("accumulating %d passes one sweep at a time (memory budget)", n_passes)
        return _mean_over_passes(image, list(networks), mirrors, config, on_member)


def _mean_over_passes(
    image: torch.Tensor,
    networks: list[nn.Module],
    mirrors: list[tuple[int, ...]],
    config: InferenceConfig,
    on_member: Callable[[MemberOutput], None] | None,
) -> torch.Tensor:
    """Mean probabilities ``(K, X, Y, Z)`` over passes, one sweep per pass; each handed to ``on_member``."""
    total: torch.Tensor | None = None
    member = 0
    for fold, net in enumerate(networks):
        for mirror in mirrors:
            probs = _Sweep(image[None], [net], [mirror], config).run(1).finish_mean_softmax()[0]
            if on_member is not None:
                # Engine mirrors are axes of a (N, C, X, Y, Z) batch; members name spatial axes.
                on_member(MemberOutput(member, fold, tuple(a - 2 for a in mirror), probs))
            member += 1
            if total is None:
                total = probs if on_member is None else probs.clone()  # a hook may keep ``probs``
            else:
                total.add_(probs.to(total.device))
    assert total is not None
    return total.div_(len(networks) * len(mirrors))


class _PassesDoNotFit(Exception):
    """Side-by-side accumulators for all passes exceed the memory budget: sweep per pass."""


def window_starts(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: float
) -> list[tuple[int, int, int]]:
    """Window start corners, in MONAI's order and positions (``dense_patch_slices``).

    Args:
        image_size: ``(X, Y, Z)`` of the (padded) image, each >= the matching ``roi_size``.
        roi_size: window size ``(X, Y, Z)``.
        overlap: overlap fraction in ``[0, 1)``.
    """
    per_axis = []
    for n, r in zip(image_size, roi_size, strict=True):
        # MONAI's _get_scan_interval: a window as big as the image gets interval = roi.
        step = r if r == n else max(int(r * (1 - overlap)), 1)
        count = next((d for d in range(math.ceil(n / step)) if d * step + r >= n), 0) + 1
        per_axis.append([min(d * step, n - r) for d in range(count)])
    return [(a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]


@functools.lru_cache(maxsize=4)
def _weight_maps(
    image_size: tuple[int, ...],
    roi_size: tuple[int, ...],
    overlap: float,
    mode: str,
    sigma: float,
    device: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(importance (1, *roi), weight sum (1, *image_size))`` float32, cached per geometry."""
    importance = compute_importance_map(roi_size, mode=mode, sigma_scale=sigma, device=device)[None]
    total = torch.zeros((1, *image_size), dtype=torch.float32, device=device)
    for s in window_starts(image_size, roi_size, overlap):
        total[(slice(None), *_window(s, roi_size))] += importance
    return importance, total


def _window(start: Sequence[int], roi: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(a, a + r) for a, r in zip(start, roi, strict=True))


@contextlib.contextmanager
def _eval_mode(networks: Sequence[nn.Module]) -> Iterator[None]:
    """Put networks in eval mode for the call and restore their previous mode afterwards."""
    modes = [n.training for n in networks]
    for n in networks:
        n.eval()
    try:
        yield
    finally:
        for n, mode in zip(networks, modes, strict=True):
            n.train(mode)


class _Sweep:
    """One pass of every window batch through every (network, mirror) pass."""

    def __init__(
        self,
        image: torch.Tensor,
        networks: list[nn.Module],
        mirrors: list[tuple[int, ...]],
        cfg: InferenceConfig,
        side_by_side: bool = False,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.roi = tuple(int(r) for r in cfg.roi_size)
        self.orig_size = tuple(int(s) for s in image.shape[2:])
        # Like MONAI: a side shorter than the window is padded (constant 0, split evenly).
        pads = [max(r - n, 0) for r, n in zip(self.roi, self.orig_size, strict=True)]
        self.lead = [p // 2 for p in pads]
        if any(pads):
            spec = [v for p in reversed(pads) for v in (p // 2, p - p // 2)]
            image = F.pad(image, spec, mode="constant", value=0.0)
        self.image = image
        self.size = tuple(int(s) for s in image.shape[2:])
        self.batch = int(image.shape[0])
        self.networks, self.mirrors = networks, mirrors
        self.acc_dtype = torch.float16 if cfg.accumulate_dtype == "float16" else torch.float32
        # Several passes side by side must fit the budget, else the caller sweeps per pass.
        self.side_by_side = side_by_side

    # -- memory decisions ------------------------------------------------------------------
    def _budget(self) -> int:
        if self.cfg.max_accumulator_bytes is not None:
            return int(self.cfg.max_accumulator_bytes)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return free // 2
        return _host_ram_bytes() // 4

    def fits(self, n_passes: int, k: int) -> bool:
        """Whether ``n_passes`` accumulators of ``k`` channels (plus the weight sum) fit."""
        voxels = math.prod(self.size) * self.batch
        return voxels * (k * n_passes * self.acc_dtype.itemsize + 4) <= self._budget()

    def _accumulate_on_device(self, n_passes: int, k: int) -> bool:
        if self.cfg.output_device == "cpu":
            return False
        if self.cfg.output_device == "device" or self.device.type != "cuda":
            return True
        return self.fits(n_passes, k)

    # -- the sweep -----------------------------------------------------------------------------
    def run(self, n_passes: int) -> _Accumulator:
        """Sweep all windows; returns the filled accumulator (``n_passes`` blocks of K channels)."""
        cfg = self.cfg
        for net in self.networks:
            net.to(self.device)
        runner = NetworkRunner(self.networks, self.mirrors, cfg, self.device)
        starts = [(b, s) for b in range(self.batch) for s in window_starts(self.size, self.roi, cfg.overlap)]
        batches = [starts[i : i + cfg.sw_batch_size] for i in range(0, len(starts), cfg.sw_batch_size)]
        acc = _Accumulator(self, n_passes)
        stream = cfg.stage_input == "stream" or (cfg.stage_input is None and not self._image_fits_device())
        feeder = WindowFeeder(
            self.image,
            batches,
            self.roi,
            self.device,
            stream=stream,
            # A fixed batch shape avoids recompiles / recaptures for the last, shorter batch.
            fixed_batch=cfg.compile or cfg.cuda_graphs,
            channels_last=cfg.channels_last,
        )
        with network_autocast(cfg, self.device):
            for positions, windows in _progress(feeder, cfg.progress, len(batches)):
                acc.add(positions, runner(windows))
        return acc

    def _image_fits_device(self) -> bool:
        if self.device.type != "cuda" or self.image.device == self.device:
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.image.numel() * self.image.element_size() < free // 4


class _Accumulator:
    """Blended-output buffer ``(B, P*K, *size)`` and the cached weight sum, allocated lazily.

    The buffer is allocated at the first window batch, when ``K`` is known from the output, on
    the compute device if it fits (or as ``output_device`` forces), else on the host.
    """

    def __init__(self, sweep: _Sweep, n_passes: int) -> None:
        self.sweep, self.n_passes = sweep, n_passes
        self.k = 0
        self.out: torch.Tensor | None = None
        self.host = False

    def _allocate(self, k: int) -> None:
        s, cfg = self.sweep, self.sweep.cfg
        if s.side_by_side and not s.fits(self.n_passes, k):
            raise _PassesDoNotFit
        self.k = k
        on_device = s._accumulate_on_device(self.n_passes, k)
        shape = (s.batch, self.n_passes * k, *s.size)
        if on_device:
            try:
                self.out = torch.zeros(shape, dtype=s.acc_dtype, device=s.device)
            except torch.cuda.OutOfMemoryError:
                logger.warning("accumulator %s does not fit on %s; stitching on the host", shape, s.device)
                on_device = False
        if not on_device:
            self.out = torch.zeros(shape, dtype=s.acc_dtype, device="cpu")
        acc_device = s.device if on_device else torch.device("cpu")
        # Host stitching also when forced on a CPU run: the same code path as on a GPU box.
        self.host = not on_device or cfg.output_device == "cpu"
        importance, self.total = _weight_maps(
            s.size, s.roi, cfg.overlap, cfg.mode, cfg.sigma_scale, str(acc_device)
        )
        self.importance = importance.to(s.acc_dtype)
        self.importance_dev = importance.to(s.device)  # for weighting before a host copy

    def add(self, positions: list[WindowPosition], outputs: list[torch.Tensor]) -> None:
        """Add weighted window outputs: ``outputs[p]`` is ``(n >= len(positions), K, *roi)``."""
        if self.out is None:
            self._allocate(int(outputs[0].shape[1]))
        assert self.out is not None
        roi, k = self.sweep.roi, self.k
        for p, out in enumerate(outputs):
            if self.host:
                # Weight on the compute device, one D2H copy per pass and batch, add on the host.
                out = (out[: len(positions)].float() * self.importance_dev).to("cpu", self.out.dtype)
            for i, (b, start) in enumerate(positions):
                index: tuple[int | slice, ...] = (b, slice(p * k, (p + 1) * k), *_window(start, roi))
                region = self.out[index]
                if self.host:
                    region += out[i]
                else:
                    # One fused multiply-add into the preallocated buffer (MONAI: multiply, copy, add).
                    region.addcmul_(out[i].to(region.dtype), self.importance)

    def _pass(self, p: int, in_place: bool = False) -> torch.Tensor:
        """Blended logits of pass ``p``: ``(B, K, *orig_size)`` float32, padding cropped off."""
        s = self.sweep
        assert self.out is not None, "no window was processed"
        crop = tuple(slice(a, a + n) for a, n in zip(s.lead, s.orig_size, strict=True))
        block = self.out[(slice(None), slice(p * self.k, (p + 1) * self.k), *crop)]
        total = self.total[(slice(None), *crop)]
        if in_place and block.dtype == torch.float32:
            return block.div_(total)  # no second full-size buffer
        return block.float() / total

    def finish_logits(self, p: int) -> torch.Tensor:
        """``(B, K, X, Y, Z)`` float32 blended logits of pass ``p``."""
        return self._pass(p, in_place=True).contiguous()

    def finish_mean_softmax(self, on_pass: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """``(B, K, X, Y, Z)`` float32 probabilities (softmax of logits / temperature), mean over passes.

        ``on_pass(p, probabilities of pass p)`` sees each pass first (it may keep the tensor).
        """
        probs = self._softmax(0)
        if on_pass is not None:
            on_pass(0, probs)
            probs = probs.clone()  # the hook may keep pass 0's tensor
        for p in range(1, self.n_passes):
            member = self._softmax(p)
            if on_pass is not None:
                on_pass(p, member)
            probs.add_(member)
        return probs.div_(self.n_passes) if self.n_passes > 1 else probs

    def _softmax(self, p: int) -> torch.Tensor:
        logits = self._pass(p, in_place=True)
        temperature = self.sweep.cfg.temperature
        if temperature != 1.0:  # 1.0 leaves the uncalibrated path bit for bit as it was
            logits = logits / temperature
        return torch.softmax(logits, dim=1)


def _progress(feeder: WindowFeeder, show: bool, total: int) -> Iterator:
    if not show:
        return iter(feeder)
    from tqdm import tqdm

    return iter(tqdm(feeder, total=total, desc="windows", unit="batch"))


def _host_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 2**30
