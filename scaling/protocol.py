"""The one measurement protocol every backend runs under.

What counts, in every framework alike:
- a *step* is one optimizer update on one global batch (all devices together);
- the first ``warmup_steps`` steps of the run are excluded from every timing figure (compilation,
  allocator growth, autotuning);
- a step is timed from just before the framework is asked for it until the device has finished it
  (``sync``: ``torch.cuda.synchronize`` on GPU, fetching the loss in TF), so asynchronous
  dispatch cannot make a step look free. With ``sync_every=K`` and a backend that offers device
  events (CUDA), the host waits only every K steps and each step's time is read from the device's
  own timestamps (from the end of the previous step to the end of this one) at that wait;
- throughput is timed samples over the *wall-clock* of the timed part of each epoch, so time a
  framework's loop spends between steps (input pipeline, callbacks) is paid, not hidden;
- evaluation runs after every epoch, outside the timed steps, and feeds time-to-accuracy: the
  wall-clock from the first training step until the end of the first evaluation that reaches the
  target accuracy (training and evaluation time both count, as in MLPerf's time-to-train).

No framework is imported here: backends hand in a ``sync`` callable and their own device memory
probe. The worker calls :func:`drive`: it runs the steps of a backend that exposes them
(:class:`SteppedTrainer`), or hands the meter to a backend whose framework owns the loop
(:class:`LoopOwner`: Keras ``fit``, Lightning, the textbook loops), which makes one call per step
(``step_end``) and one per evaluation (``epoch_end``) from that loop's hooks.
"""
from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable


@dataclass(frozen=True)
class ProtocolConfig:
    warmup_steps: int = 20
    target_accuracy: float = 0.97
    log_every: int = 50
    #: wait for the device every K steps (timing each step by device events where a backend has them)
    sync_every: int = 1


@runtime_checkable
class SteppedTrainer(Protocol):
    """What a backend whose loop the protocol drives provides."""

    steps_per_epoch: int
    #: steps fused into one call (e.g. several steps per ``tf.function`` call); 1 for most loops
    steps_per_call: int

    def begin_epoch(self, epoch: int) -> None: ...
    def train_steps(self, n: int) -> None: ...
    def sync(self) -> None: ...
    def loss(self) -> float: ...
    def evaluate(self) -> tuple[float, float]: ...


@runtime_checkable
class LoopOwner(Protocol):
    """What a backend whose framework runs the loop provides: ``fit`` trains ``epochs`` epochs (at most
    ``max_steps_per_epoch`` steps each), calling ``epoch_begin``, ``step_begin``, ``step_end`` and
    ``epoch_end`` of the meter from that loop's hooks."""

    def fit(self, meter: "Measurement", epochs: int, max_steps_per_epoch: int | None) -> None: ...


@runtime_checkable
class StepEvents(Protocol):
    """Device timestamps (CUDA events) a backend offers so the host need not wait every step."""

    def mark(self) -> object:
        """Queue a timestamp behind the work queued so far; returns its handle."""

    def seconds(self, start: object, end: object) -> float:
        """Device time between two marks; called only after a sync has passed both."""


def process_start_time() -> float:
    """Epoch seconds when this worker (or, if set, its launcher) started."""
    launched = os.environ.get("SCALING_LAUNCH_TIME")
    if launched:
        return float(launched)
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil missing or /proc unreadable: fall back to import time
        return _IMPORT_TIME


_IMPORT_TIME = time.time()


def peak_host_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def summarize(values: list[float]) -> dict[str, float | int | None]:
    """mean, p50, p95, min, max, coefficient of variation and count of a list of durations."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "min": None, "max": None, "cv": None}
    ordered = sorted(values)
    mean = sum(ordered) / n
    var = sum((v - mean) ** 2 for v in ordered) / n
    return {
        "n": n,
        "mean": mean,
        "p50": _percentile(ordered, 50),
        "p95": _percentile(ordered, 95),
        "min": ordered[0],
        "max": ordered[-1],
        "cv": math.sqrt(var) / mean if mean > 0 else None,
    }


def _percentile(ordered: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an already sorted list."""
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Measurement:
    """Collects the protocol's figures for one worker; rank 0's become the run's record."""

    def __init__(
        self,
        config: ProtocolConfig,
        *,
        global_batch: int,
        devices: int,
        sync: Callable[[], None] = lambda: None,
        device_memory_peak: Callable[[], int | None] = lambda: None,
        observers: "list[Observer] | tuple[Observer, ...]" = (),
        clock: Callable[[], float] = time.perf_counter,
        events: StepEvents | None = None,
    ) -> None:
        if global_batch <= 0 or devices <= 0:
            raise ValueError("global_batch and devices must be positive")
        self.config = config
        self.global_batch = global_batch
        self.devices = devices
        self._sync = sync
        self._device_memory_peak = device_memory_peak
        self._observers = list(observers)
        self._step_begins = [o.step_begin for o in self._observers if hasattr(o, "step_begin")]
        self._window: list[float] = []  # timed step times since the last log point
        self._clock = clock
        self._wall_at_clock0 = time.time() - clock()
        # without device events every step is synchronized, whatever sync_every says
        self._events = events if config.sync_every > 1 else None
        self.sync_every = config.sync_every if self._events is not None else 1
        self._pending: list[tuple[object, int, int, bool]] = []  # (end mark, steps, samples, warm)
        self._chain_mark: object = None
        self.syncs = 0

        self.step_times: list[float] = []
        self.epoch_times: list[float] = []
        self.eval_times: list[float] = []
        self.accuracy_per_epoch: list[float] = []
        self.loss_per_epoch: list[float] = []
        self.steps_done = 0
        self.timed_samples = 0
        self.timed_wall = 0.0
        self.train_loss: list[tuple[int, float]] = []  # (step, loss) every log_every steps
        self.time_to_accuracy: float | None = None
        self.epoch_reaching_target: int | None = None
        #: (step, what) of the first loss that was not finite: the run diverged there
        self.diverged: tuple[int, str] | None = None

        self._train_start: float | None = None
        self._epoch_start: float | None = None
        self._epoch = 0
        self._region_start: float | None = None
        self._last_step_end: float | None = None
        self._step_start: float | None = None

    # -- hooks ------------------------------------------------------------------------------
    def epoch_begin(self, epoch: int) -> None:
        now = self._clock()
        if self._train_start is None:
            self._train_start = now
        self._epoch_start = now
        self._region_start = now if self.steps_done >= self.config.warmup_steps else None
        self._last_step_end = None
        self._epoch = epoch
        for o in self._observers:
            o.epoch_begin(epoch)

    def step_begin(self) -> None:
        for begin in self._step_begins:
            begin()
        self._step_start = self._clock()
        if self._events is not None and not self._pending:
            self._chain_mark = self._events.mark()

    def step_end(self, steps: int = 1, samples: int | None = None, loss: Callable[[], float] | None = None) -> None:
        """Close a call of ``steps`` optimizer steps (``samples`` global samples; default full batches).

        ``loss`` returns the global batch's training loss; it is called (and recorded) only when the
        call crossed a multiple of ``log_every``, since fetching it may wait for the device or all-reduce.
        """
        before = self.steps_done
        self._close_step(steps, samples)
        if loss is not None and self.wants_loss(before):
            self.record_loss(loss())

    def _close_step(self, steps: int, samples: int | None) -> None:
        if self._step_start is None:
            raise RuntimeError("step_end without step_begin")
        samples = self.global_batch * steps if samples is None else samples
        warm = self.steps_done >= self.config.warmup_steps
        self.steps_done += steps
        if self._events is None:
            self._sync()
            self.syncs += 1
            now = self._clock()
            if warm:
                self._timed((now - self._step_start) / steps, steps, samples)
                self._last_step_end = now
            elif self.steps_done >= self.config.warmup_steps:
                # the warm-up ends with this call: the timed region starts here
                self._region_start = now
        else:
            self._pending.append((self._events.mark(), steps, samples, warm))
            ends_warmup = not warm and self.steps_done >= self.config.warmup_steps
            if len(self._pending) >= self.sync_every or ends_warmup:
                self.flush()
        self._step_start = None
        for o in self._observers:
            o.advance(steps)
        self._log_window(steps)

    def flush(self) -> None:
        """Wait for the device and time the steps queued since the last wait from their events."""
        if not self._pending:
            return
        self._sync()
        self.syncs += 1
        now = self._clock()
        prev = self._chain_mark
        for mark, steps, samples, warm in self._pending:
            if warm:
                self._timed(self._events.seconds(prev, mark) / steps, steps, samples)
            prev = mark
        last_warm = self._pending[-1][3]
        self._pending.clear()
        if last_warm:
            self._last_step_end = now
        elif self.steps_done >= self.config.warmup_steps:
            self._region_start = now

    def _timed(self, per_step: float, steps: int, samples: int) -> None:
        self.step_times.extend([per_step] * steps)
        self._window.extend([per_step] * steps)
        self.timed_samples += samples

    def _log_window(self, steps: int) -> None:
        every = self.config.log_every
        if self._observers and every > 0 and self.steps_done // every > (self.steps_done - steps) // every and self._window:
            mean = sum(self._window) / len(self._window)
            values = {"epoch": self._epoch, "step_time_s": mean, "samples_per_s": self.global_batch / mean,
                      "samples_per_s_per_device": self.global_batch / mean / self.devices}
            self._window = []
            for o in self._observers:
                o.logged(self.steps_done, values)

    def wants_loss(self, steps_before: int) -> bool:
        """Whether the call that just ended crossed a multiple of ``log_every``."""
        every = self.config.log_every
        return every > 0 and self.steps_done // every > steps_before // every

    def _check_finite(self, value: float, what: str) -> None:
        if self.diverged is None and not math.isfinite(value):
            self.diverged = (self.steps_done, f"{what} {value}")

    def record_loss(self, loss: float) -> None:
        self._check_finite(float(loss), "train loss")
        self.train_loss.append((self.steps_done, float(loss)))
        for o in self._observers:
            o.logged(self.steps_done, {"train_loss": float(loss)})

    def epoch_end(self, epoch: int, evaluate: Callable[[], tuple[float, float]] | None = None) -> None:
        """Close the epoch's timing; with ``evaluate`` (returning test loss and accuracy), run and
        time the evaluation after it and record its result (:meth:`evaluated`)."""
        self._close_epoch()
        if evaluate is not None:
            t0 = self._clock()
            loss, accuracy = evaluate()
            self.evaluated(epoch, loss, accuracy, self._clock() - t0)

    def _close_epoch(self) -> None:
        self.flush()
        now = self._clock()
        assert self._epoch_start is not None, "epoch_end without epoch_begin"
        self.epoch_times.append(now - self._epoch_start)
        if self._region_start is not None and self._last_step_end is not None:
            self.timed_wall += self._last_step_end - self._region_start
        self._epoch_start = None

    def evaluated(self, epoch: int, loss: float, accuracy: float, eval_seconds: float) -> None:
        """Record the test-set result after ``epoch``; call once the evaluation has finished."""
        now = self._clock()
        self._check_finite(float(loss), "test loss")
        self.eval_times.append(eval_seconds)
        self.loss_per_epoch.append(float(loss))
        self.accuracy_per_epoch.append(float(accuracy))
        if self.time_to_accuracy is None and accuracy >= self.config.target_accuracy:
            assert self._train_start is not None
            self.time_to_accuracy = now - self._train_start
            self.epoch_reaching_target = epoch + 1
        for o in self._observers:
            o.evaluated(epoch, loss, accuracy)

    # -- result -------------------------------------------------------------------------------
    def train_start_wall(self) -> float | None:
        """Epoch seconds of the first training step, for the startup figure."""
        if self._train_start is None:
            return None
        return self._wall_at_clock0 + self._train_start

    def result(self, process_start: float | None = None) -> dict:
        throughput = self.timed_samples / self.timed_wall if self.timed_wall > 0 else None
        start_wall = self.train_start_wall()
        startup = None
        if process_start is not None and start_wall is not None:
            startup = start_wall - process_start
        return {
            "samples_per_s": throughput,
            "samples_per_s_per_device": throughput / self.devices if throughput else None,
            "global_batch": self.global_batch,
            "devices": self.devices,
            "warmup_steps": self.config.warmup_steps,
            "steps": self.steps_done,
            "timed_steps": len(self.step_times),
            "timed_samples": self.timed_samples,
            "timed_wall_s": self.timed_wall,
            "step_time_s": summarize(self.step_times),
            "sync_every": self.sync_every,
            "syncs": self.syncs,
            "epoch_time_s": self.epoch_times,
            "eval_time_s": self.eval_times,
            "train_time_s": sum(self.epoch_times),
            "startup_s": startup,
            "target_accuracy": self.config.target_accuracy,
            "time_to_accuracy_s": self.time_to_accuracy,
            "epochs_to_accuracy": self.epoch_reaching_target,
            "train_loss": self.train_loss,
            "test_accuracy_per_epoch": self.accuracy_per_epoch,
            "test_loss_per_epoch": self.loss_per_epoch,
            "final_test_accuracy": self.accuracy_per_epoch[-1] if self.accuracy_per_epoch else None,
            "final_test_loss": self.loss_per_epoch[-1] if self.loss_per_epoch else None,
            "peak_host_rss_bytes": peak_host_rss_bytes(),
            "peak_device_memory_bytes": self._device_memory_peak(),
        }


def drive(trainer: "SteppedTrainer | LoopOwner", meter: Measurement, epochs: int,
          max_steps_per_epoch: int | None = None) -> None:
    """The training loop: epochs of timed calls of a backend's steps, each followed by evaluation.

    A :class:`LoopOwner` runs its framework's loop instead, calling the same meter hooks. Either
    way the backend's ``close`` (leaving its process group) runs last, whatever happened.
    """
    try:
        if isinstance(trainer, LoopOwner):
            trainer.fit(meter, epochs, max_steps_per_epoch)
        else:
            _drive_steps(trainer, meter, epochs, max_steps_per_epoch)
    finally:
        close = getattr(trainer, "close", None)
        if close is not None:
            close()


def _drive_steps(trainer: SteppedTrainer, meter: Measurement, epochs: int, max_steps_per_epoch: int | None) -> None:
    steps = trainer.steps_per_epoch
    if max_steps_per_epoch:
        steps = min(steps, max_steps_per_epoch)
    for epoch in range(epochs):
        trainer.begin_epoch(epoch)
        meter.epoch_begin(epoch)
        done = 0
        while done < steps:
            k = min(trainer.steps_per_call, steps - done)
            meter.step_begin()
            trainer.train_steps(k)
            meter.step_end(k, loss=lambda: trainer.loss())
            done += k
        meter.epoch_end(epoch, trainer.evaluate)


class Observer:
    """Something rank 0 tells about the run as it goes (a progress bar, an experiment tracker).

    Every method is optional to override; none may raise into training (trackers catch their own).
    """

    def epoch_begin(self, epoch: int) -> None:
        pass

    def step_begin(self) -> None:
        """Just before each call of steps is timed (the rank clock marks it)."""

    def advance(self, steps: int) -> None:
        pass

    def logged(self, step: int, values: dict[str, float]) -> None:
        """Every ``log_every`` steps: step time and throughput over the window, or the train loss."""

    def evaluated(self, epoch: int, loss: float, accuracy: float) -> None:
        pass

    def close(self) -> None:
        pass
