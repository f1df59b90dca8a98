"""How windows reach the network: :class:`WindowFeeder` gathers window batches into reused buffers.

Either from an image that was moved to the device once, or (image too big for the device) from the
host through pinned double buffers copied on a side stream while the previous batch computes.
Used by :mod:`pipeline.inference.sliding_window`; nothing here changes results.

Why hand-written: MONAI's ``sliding_window_inference`` slices windows one by one and
``torch.cat``-s them per batch (a new tensor each time) and has no prefetch of host windows;
``torch.utils.data.DataLoader`` would copy each window through worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

#: Where one window of a batch is taken from: ``(batch index, window start (x, y, z))`` in voxels.
WindowPosition = tuple[int, tuple[int, int, int]]


class WindowFeeder:
    """Iterates ``(positions, windows)``: windows ``(n, C, *roi)`` on ``device`` for each batch.

    Args:
        image: ``(B, C, X, Y, Z)`` tensor (host or device).
        batches: per network call, the :data:`WindowPosition` of each window.
        roi: window size ``(X, Y, Z)`` in voxels.
        device: where the network runs.
        stream: keep the image on the host and gather windows there (pinned + side-stream
            prefetch on CUDA); else move the image to ``device`` once.
        fixed_batch: always yield as many windows as the widest batch (the tail of the last
            batch repeats stale windows whose outputs are ignored), so compiled/graphed shapes
            never change.
        channels_last: allocate window buffers in ``channels_last_3d``.
    """

    def __init__(
        self,
        image: torch.Tensor,
        batches: list[list[WindowPosition]],
        roi: Sequence[int],
        device: torch.device,
        *,
        stream: bool = False,
        fixed_batch: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.batches, self.roi, self.device = batches, tuple(roi), device
        self.stream, self.fixed_batch = stream, fixed_batch
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.image = image if stream else image.to(device)
        self.windows_per_buffer = max(len(b) for b in batches)

    def __len__(self) -> int:
        return len(self.batches)

    def _window_buffer(self, device: torch.device, pin: bool = False) -> torch.Tensor:
        shape = (self.windows_per_buffer, self.image.shape[1], *self.roi)
        buf = torch.zeros(shape, dtype=self.image.dtype, device=device).contiguous(
            memory_format=self.memory_format
        )
        return buf.pin_memory() if pin else buf

    def _gather(self, positions: list[WindowPosition], buf: torch.Tensor) -> torch.Tensor:
        for i, (b, s) in enumerate(positions):
            index: tuple[int | slice, ...] = (
                b,
                slice(None),
                *(slice(a, a + r) for a, r in zip(s, self.roi, strict=True)),
            )
            buf[i].copy_(self.image[index])
        return buf if self.fixed_batch else buf[: len(positions)]

    def __iter__(self) -> Iterator[tuple[list[WindowPosition], torch.Tensor]]:
        if self.stream and self.device.type == "cuda":
            yield from self._prefetching()
            return
        if self.stream:
            host = self._window_buffer(torch.device("cpu"))
            for positions in self.batches:
                yield positions, self._gather(positions, host).to(self.device)
            return
        buf = self._window_buffer(self.device)
        for positions in self.batches:
            yield positions, self._gather(positions, buf)

    def _prefetching(self) -> Iterator[tuple[list[WindowPosition], torch.Tensor]]:
        """Double-buffered: batch i+1 is gathered on the host and copied while batch i runs."""
        copy_stream = torch.cuda.Stream(self.device)
        host = [self._window_buffer(torch.device("cpu"), pin=True) for _ in range(2)]
        dev = [self._window_buffer(self.device) for _ in range(2)]
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
        for i, positions in enumerate(self.batches):
            if i + 1 < len(self.batches):
                issue(i + 1)
            slot = i % 2
            ready = copied[slot]
            assert ready is not None  # issue(i) recorded it
            torch.cuda.current_stream(self.device).wait_event(ready)
            yield positions, dev[slot] if self.fixed_batch else dev[slot][: len(positions)]
            consumed = torch.cuda.Event()
            consumed.record(torch.cuda.current_stream(self.device))
            used[slot] = consumed
