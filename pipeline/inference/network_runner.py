"""Speed levers of the sliding-window engine: how windows reach the network and how it runs.

Kept apart from :mod:`pipeline.inference.sliding_window` (the blending logic) so each lever can be read,
switched and tested on its own. Nothing here changes results beyond float tolerance:

- :class:`WindowFeeder` gathers window batches into a reused buffer, either from an image that
  was moved to the device once, or (image too big for the device) from the host through pinned
  double buffers copied on a side stream while the previous batch computes.
- :func:`prepare_network` makes an inference copy of a network: eval-mode BatchNorm folded into
  the preceding convolution (one kernel less per conv, as TensorRT/ONNX Runtime do) and/or the
  ``channels_last_3d`` memory format. The caller's module is never modified; the copy is cached
  until the caller's weights change.
- :class:`NetworkRunner` runs every (network, mirror) pass of a window batch in one network call
  per network, with optional ``torch.compile`` (cached per network and input shape, eager
  fallback when compilation fails) and CUDA graphs (captured per shape).
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.inference.config import InferenceConfig

logger = logging.getLogger(__name__)

Entry = tuple[int, tuple[int, int, int]]  # (batch index, window start (x, y, z))


class ModuleCache:
    """A small per-module cache that outlives one sweep (the predictor calls the engine once per
    case; training validation once per epoch) but does not pin many networks in memory.

    Values may hold the module strongly (a compiled module does), so a WeakKeyDictionary would
    never drop them; instead the cache keeps the ``max_modules`` most recently used modules.
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


_COMPILED = ModuleCache()  # module -> {(backend, mode): _CompiledForward}
_GRAPHS = ModuleCache()  # module -> _GraphedForward
# module -> (weights signature, optimised copy or None for "run the module itself"); the copy
# never references the original, so weak keys are enough here.
_PREPARED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module | None]] = weakref.WeakKeyDictionary()


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
    cached = _PREPARED.get(net)
    if cached is not None and cached[0] == key:
        return net if cached[1] is None else cached[1]
    prepared = fold_batchnorm_into_convs(net) if fold_batchnorm else net
    if channels_last:
        prepared = copy.deepcopy(prepared) if prepared is net else prepared
        # Module.to accepts memory_format at run time; torch's typed overloads leave it out.
        prepared.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    prepared.eval()
    _PREPARED[net] = (key, None if prepared is net else prepared)
    return prepared


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm_into_convs(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every eval-mode BatchNorm fed only by a convolution folded into it.

    Traces with ``torch.fx``; returns ``net`` itself when it cannot be traced or has nothing to
    fold. Why hand-written: torch ships the per-pair fusion (``fuse_conv_bn_eval``) but no pass
    over a whole traced model outside the quantization tooling.
    """
    from torch.fx import symbolic_trace
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if not any(isinstance(m, _BNS) for m in net.modules()):
        return net
    try:
        traced = symbolic_trace(copy.deepcopy(net).eval())
    except Exception as exc:  # noqa: BLE001 - untraceable Python control flow: run unfused
        logger.info("BatchNorm folding skipped: %s cannot be traced (%s)", type(net).__name__, exc)
        return net
    modules = dict(traced.named_modules())
    folded = 0
    for node in list(traced.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, _BNS) or not bn.track_running_stats or bn.running_mean is None:
            continue
        src: Any = node.args[0] if node.args else None  # an fx Node when it is a call_module (checked below)
        conv = modules.get(src.target) if getattr(src, "op", None) == "call_module" else None
        if not isinstance(conv, _CONVS) or len(src.users) != 1:
            continue
        fused = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.modules.conv._ConvTransposeNd))
        parent, _, name = src.target.rpartition(".")
        setattr(traced.get_submodule(parent) if parent else traced, name, fused)
        node.replace_all_uses_with(src)
        traced.graph.erase_node(node)
        folded += 1
    if not folded:
        return net
    traced.graph.lint()
    traced.recompile()
    traced.delete_all_unused_submodules()
    logger.debug("folded %d BatchNorm layers of %s", folded, type(net).__name__)
    return traced


class WindowFeeder:
    """Iterates ``(entries, windows)``: windows ``(n, C, *roi)`` on ``device`` for each batch.

    Args:
        image: ``(B, C, X, Y, Z)`` tensor (host or device).
        batches: per network call, the ``(batch index, start)`` of each window.
        roi: window size.
        device: where the network runs.
        stream: keep the image on the host and gather windows there (pinned + side-stream
            prefetch on CUDA); else move the image to ``device`` once.
        fixed_batch: always yield ``sw_batch_size`` windows (the tail of the last batch repeats
            stale windows whose outputs are ignored), so compiled/graphed shapes never change.
        channels_last: allocate window buffers in ``channels_last_3d``.
    """

    def __init__(
        self,
        image: torch.Tensor,
        batches: list[list[Entry]],
        roi: Sequence[int],
        device: torch.device,
        *,
        stream: bool = False,
        fixed_batch: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.batches, self.roi, self.device = batches, tuple(roi), device
        self.stream, self.fixed = stream, fixed_batch
        self.fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.image = image if stream else image.to(device)
        self.width = max(len(b) for b in batches)

    def __len__(self) -> int:
        return len(self.batches)

    def _buffer(self, device: torch.device, pin: bool = False) -> torch.Tensor:
        shape = (self.width, self.image.shape[1], *self.roi)
        buf = torch.zeros(shape, dtype=self.image.dtype, device=device).contiguous(memory_format=self.fmt)
        return buf.pin_memory() if pin else buf

    def _gather(self, entries: list[Entry], buf: torch.Tensor) -> torch.Tensor:
        for i, (b, s) in enumerate(entries):
            index: tuple[int | slice, ...] = (
                b,
                slice(None),
                *(slice(a, a + r) for a, r in zip(s, self.roi, strict=True)),
            )
            buf[i].copy_(self.image[index])
        return buf if self.fixed else buf[: len(entries)]

    def __iter__(self) -> Iterator[tuple[list[Entry], torch.Tensor]]:
        if self.stream and self.device.type == "cuda":
            yield from self._prefetching()
            return
        if self.stream:
            host = self._buffer(torch.device("cpu"))
            for entries in self.batches:
                yield entries, self._gather(entries, host).to(self.device)
            return
        buf = self._buffer(self.device)
        for entries in self.batches:
            yield entries, self._gather(entries, buf)

    def _prefetching(self) -> Iterator[tuple[list[Entry], torch.Tensor]]:
        """Double-buffered: batch i+1 is gathered on the host and copied while batch i runs."""
        copy_stream = torch.cuda.Stream(self.device)
        host = [self._buffer(torch.device("cpu"), pin=True) for _ in range(2)]
        dev = [self._buffer(self.device) for _ in range(2)]
        copied: list[torch.cuda.Event | None] = [None, None]
        used: list[torch.cuda.Event | None] = [None, None]

        def issue(i: int) -> None:
            slot = i % 2
            done_copy, done_use = copied[slot], used[slot]
            if done_copy is not None:
                done_copy.synchronize()  # the pinned buffer is free again
            self._gather(self.batches[i], host[slot])
            with torch.cuda.stream(copy_stream):
                if done_use is not None:
                    copy_stream.wait_event(done_use)  # the device buffer was consumed
                dev[slot].copy_(host[slot], non_blocking=True)
                event = torch.cuda.Event()
                event.record(copy_stream)
                copied[slot] = event

        issue(0)
        for i, entries in enumerate(self.batches):
            if i + 1 < len(self.batches):
                issue(i + 1)
            slot = i % 2
            ready = copied[slot]
            assert ready is not None  # issue(i) recorded it
            torch.cuda.current_stream(self.device).wait_event(ready)
            yield entries, dev[slot] if self.fixed else dev[slot][: len(entries)]
            consumed = torch.cuda.Event()
            consumed.record(torch.cuda.current_stream(self.device))
            used[slot] = consumed


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
        self.forwards = [self._prepare(net, cfg, device) for net in networks]

    @staticmethod
    def _prepare(net: nn.Module, cfg: InferenceConfig, device: torch.device) -> Callable:
        net = prepare_network(net, fold_batchnorm=cfg.fold_batchnorm, channels_last=cfg.channels_last)
        fwd: Callable = net
        if cfg.compile:
            per_net = _COMPILED.get(net)
            if per_net is None:
                per_net = {}
                _COMPILED.set(net, per_net)
            key = (cfg.compile_backend, cfg.compile_mode)
            if key not in per_net:
                per_net[key] = _CompiledForward(net, cfg.compile_backend, cfg.compile_mode)
            fwd = per_net[key]
        if cfg.cuda_graphs and device.type == "cuda":
            graphed = _GRAPHS.get(net)
            if graphed is None or graphed.fn is not fwd:
                graphed = _GraphedForward(fwd)
                _GRAPHS.set(net, graphed)
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
        self.status: dict[tuple, bool] = {}  # signature -> compiled call worked

    @staticmethod
    def signature(x: torch.Tensor) -> tuple:
        amp = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        return (tuple(x.shape), x.dtype, x.device.type, tuple(x.stride()), amp)

    def __call__(self, x: torch.Tensor) -> Any:
        key = self.signature(x)
        ok = self.status.get(key)
        if ok is False:
            return self.net(x)
        if ok is None:
            try:
                y = self.compiled(x)
            except Exception as exc:  # noqa: BLE001 - any compiler failure must fall back
                logger.warning("torch.compile failed for input %s (%s); running eager", key[0], exc)
                self.status[key] = False
                return self.net(x)
            self.status[key] = True
            return y
        return self.compiled(x)


class _GraphedForward:
    """CUDA-graph replay of a forward per input signature; eager when capture fails."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor] | None] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = _CompiledForward.signature(x)
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
