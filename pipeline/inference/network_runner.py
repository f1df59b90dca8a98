"""How the network runs over window batches: :class:`NetworkRunner` and :func:`prepare_network`.

Used by :mod:`pipeline.inference.sliding_window` (the blending); windows reach it through
:mod:`pipeline.inference.window_feeder`. Nothing here changes results beyond float tolerance:

- :func:`prepare_network` makes an inference copy of a network: eval-mode BatchNorm folded into
  the preceding convolution (one kernel less per conv, as TensorRT/ONNX Runtime do) and/or the
  ``channels_last_3d`` memory format. The caller's module is never modified; the copy is cached
  until the caller's weights change.
- :class:`NetworkRunner` runs every (network, mirror) pass of a window batch in one network call
  per network, with optional ``torch.compile`` (cached per network and input shape, eager
  fallback when compilation fails) and CUDA graphs (captured per shape).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from pipeline.inference.config import InferenceConfig

logger = logging.getLogger(__name__)


class RecentModulesCache:
    """One value per module for the ``max_modules`` most recently used modules.

    Outlives one sweep (the Segmenter calls the engine once per case; training validation once per
    epoch) but does not pin many networks in memory. Values may hold the module strongly (a
    compiled module does), so a ``WeakKeyDictionary`` would never drop them; hence the bound.
    """

    def __init__(self, max_modules: int = 8) -> None:
        self.max_modules = max_modules
        self._entries: OrderedDict[int, tuple[weakref.ref, Any]] = OrderedDict()

    def get(self, module: nn.Module) -> Any:
        entry = self._entries.get(id(module))
        if entry is None or entry[0]() is not module:  # a new module may reuse a dead one's id
            return None
        self._entries.move_to_end(id(module))
        return entry[1]

    def set(self, module: nn.Module, value: Any) -> None:
        self._entries[id(module)] = (weakref.ref(module), value)
        self._entries.move_to_end(id(module))
        while len(self._entries) > self.max_modules:
            self._entries.popitem(last=False)


#: module -> {(compile backend, compile mode): _CompiledForward}
_COMPILED_FORWARDS = RecentModulesCache()
#: module -> _CudaGraphForward (wrapping that module's eager or compiled forward)
_CUDA_GRAPH_FORWARDS = RecentModulesCache()
#: caller's module -> (weights signature and options, its inference copy, or None for "run the
#: module itself"); the copy never references the original, so weak keys are enough here.
_INFERENCE_COPIES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module | None]] = (
    weakref.WeakKeyDictionary()
)


def first_output(y: Any) -> torch.Tensor:
    """Deep-supervision networks may return a list/tuple (full resolution first): take that."""
    return y[0] if isinstance(y, list | tuple) else y


def _weights_signature(net: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or updated in place (optimizer step,
    ``load_state_dict``, ``.to()``), so a cached inference copy is never stale."""
    tensors = list(net.parameters()) + list(net.buffers())
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


def prepare_network(net: nn.Module, *, fold_batchnorm: bool, channels_last: bool) -> nn.Module:
    """The module to run for ``net`` (eval mode): ``net`` itself, or a cached, optimised copy.

    Args:
        net: the caller's network, in eval mode; never modified.
        fold_batchnorm: fold eval-mode ``BatchNorm`` that directly follows a convolution into it.
        channels_last: convert the copy's weights to ``channels_last_3d``.
    """
    if not (fold_batchnorm or channels_last):
        return net
    key = (_weights_signature(net), fold_batchnorm, channels_last)
    cached = _INFERENCE_COPIES.get(net)
    if cached is not None and cached[0] == key:
        return net if cached[1] is None else cached[1]
    prepared = fold_batchnorm_into_convs(net) if fold_batchnorm else net
    if channels_last:
        prepared = copy.deepcopy(prepared) if prepared is net else prepared
        # Module.to accepts memory_format at run time; torch's typed overloads leave it out.
        prepared.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    prepared.eval()
    _INFERENCE_COPIES[net] = (key, None if prepared is net else prepared)
    return prepared


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _count_batchnorms(net: nn.Module) -> int:
    return sum(isinstance(m, _BATCHNORMS) for m in net.modules())


def fold_batchnorm_into_convs(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every eval-mode BatchNorm fed only by a convolution folded into it.

    torch's pass does it (``torch.fx.experimental.optimization.fuse``: an fx trace, then
    ``torch.nn.utils.fusion.fuse_conv_bn_eval`` per ``Conv{1,2,3}d -> BatchNorm`` pair whose
    convolution feeds nothing else). Returns ``net`` itself when there is nothing to fold or
    ``net`` cannot be traced.

    Why torch's whole-model pass rather than ``fuse_conv_bn_eval`` per pair: finding the pairs
    needs the data flow (a module tree does not say which conv feeds which norm), i.e. a trace,
    which is what ``fuse`` does. Checked in torch 2.13 on the registry's networks with
    ``norm="batch"``: ``unet`` (MONAI DynUNet) traces and every BatchNorm folds; the residual
    U-Nets (data-dependent control flow), ``swin_unetr`` and ``unetr`` cannot be fx-traced and run
    unfused (as with the former hand-written fx pass, which needed the same trace). By default
    they use InstanceNorm, which has nothing to fold. torch's pass does not fold
    ``ConvTranspose -> BatchNorm`` (MONAI's ``AttentionUnet`` has two such pairs, in its
    up-convolutions): those stay BatchNorm layers, with the same result.
    """
    n_batchnorms = _count_batchnorms(net)
    if not n_batchnorms:
        return net
    try:
        # One deep copy in eval mode (fuse_conv_bn_eval needs eval), then fused in place.
        folded = fuse(copy.deepcopy(net).eval(), inplace=True)
    except Exception as exc:  # noqa: BLE001 - untraceable Python control flow: run unfused
        logger.debug("BatchNorm folding skipped: %s cannot be fx-traced (%s)", type(net).__name__, exc)
        return net
    left = _count_batchnorms(folded)
    if left == n_batchnorms:
        return net
    logger.debug(
        "folded %d of %d BatchNorm layers of %s", n_batchnorms - left, n_batchnorms, type(net).__name__
    )
    return folded


def network_autocast(cfg: InferenceConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context the network calls of a sweep run in (``cfg.amp`` on CUDA, ``cfg.amp_on_cpu``)."""
    dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
    if device.type == "cuda" and cfg.amp:
        # The weight-cast cache cannot live across CUDA graph replays.
        return torch.autocast("cuda", dtype=dtype, cache_enabled=not cfg.cuda_graphs)
    if device.type == "cpu" and cfg.amp_on_cpu:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class NetworkRunner:
    """Runs all passes of a window batch: returns one ``(n, K, *roi)`` tensor per pass.

    Pass order is network-major, mirror-minor (``for net in networks: for m in mirrors``). The
    mirrored copies of the windows are concatenated along the batch axis so each network runs
    once per window batch; the outputs are flipped back.
    """

    def __init__(
        self,
        networks: Sequence[nn.Module],
        mirrors: Sequence[tuple[int, ...]],
        cfg: InferenceConfig,
        device: torch.device,
    ) -> None:
        self.mirrors = list(mirrors)
        self.max_batch = cfg.max_network_batch
        self.forwards = [self._forward_for(net, cfg, device) for net in networks]

    @staticmethod
    def _forward_for(net: nn.Module, cfg: InferenceConfig, device: torch.device) -> Callable:
        """The callable to run for ``net``: its inference copy, compiled and/or graphed as ``cfg`` says."""
        net = prepare_network(net, fold_batchnorm=cfg.fold_batchnorm, channels_last=cfg.channels_last)
        fwd: Callable = net
        if cfg.compile:
            per_net = _COMPILED_FORWARDS.get(net)
            if per_net is None:
                per_net = {}
                _COMPILED_FORWARDS.set(net, per_net)
            key = (cfg.compile_backend, cfg.compile_mode)
            if key not in per_net:
                per_net[key] = _CompiledForward(net, cfg.compile_backend, cfg.compile_mode)
            fwd = per_net[key]
        if cfg.cuda_graphs and device.type == "cuda":
            graphed = _CUDA_GRAPH_FORWARDS.get(net)
            if graphed is None or graphed.fn is not fwd:
                graphed = _CudaGraphForward(fwd)
                _CUDA_GRAPH_FORWARDS.set(net, graphed)
            fwd = graphed
        return fwd

    def __call__(self, windows: torch.Tensor) -> list[torch.Tensor]:
        n = windows.shape[0]
        if len(self.mirrors) == 1 and not self.mirrors[0]:
            x = windows
        else:
            x = torch.cat([windows.flip(m) if m else windows for m in self.mirrors])
        outputs = []
        step = self.max_batch or x.shape[0]
        for fwd in self.forwards:
            if step >= x.shape[0]:
                y = first_output(fwd(x))
            else:  # bound activation memory when mirrors multiply the batch
                y = self._chunked(fwd, x, step)
            for j, m in enumerate(self.mirrors):
                part = y[j * n : (j + 1) * n]
                outputs.append(part.flip(m) if m else part)
        return outputs

    @staticmethod
    def _chunked(fwd: Callable, x: torch.Tensor, step: int) -> torch.Tensor:
        """``fwd`` over ``x`` in chunks of ``step`` samples, written into one output tensor.

        Each chunk is copied out before the next call: a CUDA-graph forward returns its static
        output buffer, which the next replay overwrites (a list of chunks would alias it).
        """
        y: torch.Tensor | None = None
        for i in range(0, x.shape[0], step):
            part = first_output(fwd(x[i : i + step]))
            if y is None:
                y = part.new_empty((x.shape[0], *part.shape[1:]))
            y[i : i + part.shape[0]].copy_(part)
        assert y is not None
        return y


class _CompiledForward:
    """``torch.compile`` of a network with an eager fallback, remembered per input signature."""

    def __init__(self, net: nn.Module, backend: str, mode: str | None) -> None:
        self.net = net
        self.compiled = torch.compile(net, backend=backend, mode=mode, dynamic=False)
        self.compile_worked: dict[tuple, bool] = {}  # input signature -> the compiled call worked

    @staticmethod
    def input_signature(x: torch.Tensor) -> tuple:
        amp = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        return (tuple(x.shape), x.dtype, x.device.type, tuple(x.stride()), amp)

    def __call__(self, x: torch.Tensor) -> Any:
        key = self.input_signature(x)
        ok = self.compile_worked.get(key)
        if ok is False:
            return self.net(x)
        if ok is None:
            try:
                y = self.compiled(x)
            except Exception as exc:  # noqa: BLE001 - any compiler failure must fall back
                logger.warning("torch.compile failed for input %s (%s); running eager", key[0], exc)
                self.compile_worked[key] = False
                return self.net(x)
            self.compile_worked[key] = True
            return y
        return self.compiled(x)


class _CudaGraphForward:
    """CUDA-graph replay of a forward per input signature; eager when capture fails.

    Why not ``torch.cuda.make_graphed_callables``: it captures forward and backward for autograd
    and raises on a capture failure; inference needs no backward and must fall back to eager.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor] | None] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = _CompiledForward.input_signature(x)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x)
        entry = self.graphs[key]
        if entry is None:
            return first_output(self.fn(x))
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        # The caller consumes the output before the next replay overwrites it (same stream).
        return static_out

    def _capture(self, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor] | None:
        try:
            static_in = x.clone()
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: cuDNN autotuning and lazy inits outside the capture
                    first_output(self.fn(static_in))
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = first_output(self.fn(static_in))
            return graph, static_in, static_out
        except Exception as exc:  # noqa: BLE001 - capture failures must fall back, not crash
            logger.warning("CUDA graph capture failed for input %s (%s); running eager", tuple(x.shape), exc)
            return None
