"""DataLoader workers hand their batches to the training process through shared-memory slots they reuse.

torch's DataLoader gives every batch a fresh shared-memory segment: the worker faults in (and the kernel zero-fills)
every page it writes, and the training process faults every page again when it reads them. For a GPU's batches
(8 puzzles of 8 x 64³ float32 cubes: 64 MB) that page work, not the sampler, bounded the feed: one worker delivered
about 100 puzzles/s while its sampler made about 1,000/s (RESULTS §21). Here each worker keeps SLOTS batch buffers
in shared memory for the whole run; a thread of the training process keeps them mapped, copies each batch out
(into pinned memory for a GPU, into its own memory on a CPU) and marks the slot free. The batches are those of a
DataLoader over the same SampleStream (the same samples in the same order), so a run trains the same weights either
way."""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import signal
import threading
import time
import weakref
from collections.abc import Iterator

import numpy as np
import torch

from RubikSSLLib import stopping
from RubikSSLLib.sampling import SampleStream

PREFETCH = 2  # batches a worker makes ahead (the DataLoader's prefetch_factor)
# A worker's batches in flight: PREFETCH asked for (one being made) and the one being copied out, so a worker
# never waits for a slot; the extra one keeps that true if torch asks one batch earlier than this counts.
SLOTS = PREFETCH + 2
SLOT_KEY = "_slot"  # (worker, slot) of a batch, taken out before the batch is handed on
WAIT_S = 120.0  # a slot busy this long while the training process lives: a defect, said as an error


class SlotBatches(torch.utils.data.IterableDataset):
    """Batches of `batch_size` samples of `stream`, written into a worker's reused shared-memory slots. Iterate it
    only through SlotLoader, which frees the slots."""

    def __init__(self, stream: SampleStream, batch_size: int, workers: int) -> None:
        super().__init__()
        self.stream, self.batch_size = stream, batch_size
        self.busy = torch.zeros((workers, SLOTS), dtype=torch.uint8).share_memory_()
        self.closing = torch.zeros(1, dtype=torch.uint8).share_memory_()  # 1: the workers may be terminated

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        parent = os.getppid()  # the training process (as torch's own worker watchdog assumes)
        samples = iter(self.stream)
        buffers: list[dict[str, torch.Tensor]] = []
        for slot in itertools.cycle(range(SLOTS)):
            first = next(samples)
            if len(buffers) < SLOTS:
                buffers.append({key: torch.empty((self.batch_size, *value.shape), dtype=value.dtype).share_memory_()
                                for key, value in first.items()})
            if not self.wait_until_free(worker, slot, parent):
                return  # the training process is gone (killed): nobody will free the slot
            batch = buffers[slot]
            _write(batch, 0, first)
            for position in range(1, self.batch_size):
                _write(batch, position, next(samples))
            self.busy[worker, slot] = 1
            yield batch | {SLOT_KEY: torch.tensor([worker, slot])}

    def wait_until_free(self, worker: int, slot: int, parent: int) -> bool:
        """Wait until the training process has copied the slot's last batch out; False if that process (`parent`,
        its pid) is gone. Never waits in a run that goes on: SLOTS exceeds what a worker has in flight."""
        waited = time.monotonic()
        while self.busy[worker, slot]:
            if os.getppid() != parent:
                return False
            if time.monotonic() - waited > WAIT_S:
                raise RuntimeError(f"DataLoader worker {worker}: batch slot {slot} was not freed in {WAIT_S:.0f} s")
            time.sleep(0.001)
        return True


def ignore_stop_signals(worker: int) -> None:
    """A cancel is the training process's to carry out: the panel's SIGTERM and a terminal's Ctrl-C go to the whole
    process group, and a worker they killed makes torch raise in the training process at once, wherever it is (its
    SIGCHLD handler), so the cancel's checkpoint was never written (and a run with nothing saved yet was removed).
    The workers ignore both; a SIGTERM only ends one once the training process has marked its workers as closing
    (torch's fallback when a worker does not stop, the interpreter's exit). A kill of the group still ends them at
    once; orphaned by a kill -9 of the training process alone they stop by themselves (torch's watchdog)."""
    closing = torch.utils.data.get_worker_info().dataset.closing
    for number in stopping.SIGNALS:
        signal.signal(number, signal.SIG_IGN)

    def on_terminate(signum: int, frame: object) -> None:
        if closing[0]:
            os._exit(0)

    signal.signal(signal.SIGTERM, on_terminate)


SHUTDOWN_S = 30.0  # the copy thread may be waiting for a worker's batch, which takes well under this


def _shut_down(stop: threading.Event, thread: threading.Thread, closing: torch.Tensor) -> None:
    closing[0] = 1  # from now on a SIGTERM from torch's shutdown ends a worker
    stop.set()
    thread.join(timeout=SHUTDOWN_S)  # the thread drops the DataLoader, which shuts its workers down


def _write(batch: dict[str, torch.Tensor], position: int, sample: dict[str, torch.Tensor]) -> None:
    if sample.keys() != batch.keys():
        raise ValueError(f"a sample has the fields {sorted(sample)}, the batch {sorted(batch)}")
    for key, value in sample.items():
        if value.shape != batch[key].shape[1:]:
            raise ValueError(f"sample field {key!r} is {tuple(value.shape)}, the batch's {tuple(batch[key].shape[1:])}:"
                             " every sample of a run must have the same shape")
        batch[key][position].copy_(value)


READY = 2  # batches copied out ahead of the step (what torch's pin-memory thread keeps)


class SlotLoader:
    """Batches of SlotBatches from `workers` DataLoader workers (at least 1). A thread of the training process takes
    each batch, copies it out of its slot (into pinned memory for a CUDA device, for an asynchronous copy to it;
    into the process's own memory on a CPU) and frees the slot, while the step runs: the caller may keep a batch
    as long as it likes. close() (or dropping the loader, or the interpreter's exit) stops the thread, which shuts
    the workers down."""

    def __init__(self, stream: SampleStream, batch_size: int, workers: int, device: torch.device) -> None:
        if workers < 1:
            raise ValueError("SlotLoader needs at least one worker; without workers use a DataLoader")
        self.batches = SlotBatches(stream, batch_size, workers)
        loader = iter(torch.utils.data.DataLoader(self.batches, batch_size=None, num_workers=workers,
                                                  prefetch_factor=PREFETCH, persistent_workers=True,
                                                  worker_init_fn=ignore_stop_signals))
        self.ready: queue.Queue = queue.Queue(maxsize=READY)
        stop = threading.Event()
        self.thread = threading.Thread(target=_copy_batches, args=(loader, self.batches.busy, device, self.ready, stop),
                                       daemon=True, name="slot-copy")
        self.thread.start()
        self._close = weakref.finalize(self, _shut_down, stop, self.thread, self.batches.closing)
        # Run at exit before multiprocessing's own handler (registered earlier, so run later), which terminates the
        # workers, and before the interpreter tears down under a copy thread still inside torch (an abort).
        atexit.register(self._close)

    def close(self) -> None:
        """Stop the copy thread and the workers, and wait for them (at most about SHUTDOWN_S)."""
        self._close()
        atexit.unregister(self._close)  # nothing left for the exit to do (in-process runs follow one another)

    def __iter__(self) -> SlotLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while True:
            try:
                item = self.ready.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the slot loader was closed; make a new one") from None
        if isinstance(item, BaseException):
            raise item
        return item


def _copy_batches(loader: Iterator[dict[str, torch.Tensor]], busy: torch.Tensor, device: torch.device,
                  ready: queue.Queue, stop: threading.Event) -> None:
    """The copy thread: batches out of their slots into `ready` until `stop`; an error is handed on as an item."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # this rank's GPU: pinned memory is registered with its context
    # Every slot's tensors held here keep its shared memory mapped in this process: torch's storage cache then
    # hands the slot's next batch over without mapping (and faulting in) its pages again.
    mapped: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    try:
        while not stop.is_set():
            batch = next(loader)
            worker, slot = (int(i) for i in batch.pop(SLOT_KEY))
            mapped[worker, slot] = batch
            copied = {key: copy_out(value, device) for key, value in batch.items()}
            busy[worker, slot] = 0
            _hand_on(ready, copied, stop)
    except BaseException as error:  # noqa: BLE001 - the training process raises it at its next batch
        _hand_on(ready, error, stop)


def _hand_on(ready: queue.Queue, item: object, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def copy_out(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of a slot's tensor, complete when this returns (the slot may be rewritten after): in pinned memory for
    a CUDA device (the step's move_batch then copies it asynchronously), else in this process's memory."""
    if device.type == "cuda":
        return torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value)
    # numpy asks for huge pages even where torch was not told to (hugepages.py)
    return torch.from_numpy(np.array(value.numpy(), copy=True))
