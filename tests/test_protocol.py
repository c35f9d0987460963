"""The measurement protocol, driven by a fake clock: what is timed, what is excluded."""
import pytest

from scaling.protocol import Measurement, ProtocolConfig, drive, summarize


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeTrainer:
    """Each step costs `step` seconds; the gap between steps `gap`; evaluation `eval_s`."""

    steps_per_call = 1

    def __init__(self, clock, steps_per_epoch=10, step=0.01, accs=(0.5, 0.98, 0.99), eval_s=1.0):
        self.clock, self.steps_per_epoch, self.step, self.accs, self.eval_s = clock, steps_per_epoch, step, list(accs), eval_s
        self.epochs_begun = []
        self.synced = 0

    def begin_epoch(self, epoch):
        self.epochs_begun.append(epoch)

    def train_steps(self, n):
        self.clock.now += self.step * n

    def sync(self):
        self.synced += 1

    def evaluate(self):
        self.clock.now += self.eval_s
        return 0.1, self.accs[len(self.epochs_begun) - 1]


def test_warmup_excluded_and_throughput_from_wall_clock():
    clock = FakeClock()
    trainer = FakeTrainer(clock)
    meter = Measurement(ProtocolConfig(warmup_steps=5, target_accuracy=0.97), global_batch=64, devices=2,
                        sync=trainer.sync, clock=clock)
    drive(trainer, meter, epochs=3)
    r = meter.result()
    assert r["steps"] == 30
    assert r["timed_steps"] == 25  # 5 warm-up steps excluded
    assert trainer.synced == 30  # every step ends with a device sync
    assert r["timed_samples"] == 25 * 64
    assert r["step_time_s"]["mean"] == pytest.approx(0.01)
    assert r["timed_wall_s"] == pytest.approx(0.25)
    assert r["samples_per_s"] == pytest.approx(25 * 64 / 0.25)
    assert r["samples_per_s_per_device"] == pytest.approx(r["samples_per_s"] / 2)
    assert r["epoch_time_s"] == pytest.approx([0.1, 0.1, 0.1])
    # evaluation time is not training time, but it counts towards time-to-accuracy
    assert r["eval_time_s"] == pytest.approx([1.0, 1.0, 1.0])
    assert r["epochs_to_accuracy"] == 2
    assert r["time_to_accuracy_s"] == pytest.approx(0.1 + 1.0 + 0.1 + 1.0)
    assert r["final_test_accuracy"] == 0.99
    assert r["test_accuracy_per_epoch"] == [0.5, 0.98, 0.99]


def test_gaps_between_steps_are_paid_in_throughput_not_step_time():
    clock = FakeClock()
    meter = Measurement(ProtocolConfig(warmup_steps=0), global_batch=10, devices=1, clock=clock)
    meter.epoch_begin(0)
    for _ in range(4):
        clock.now += 0.5  # input pipeline between steps
        meter.step_begin()
        clock.now += 0.5
        meter.step_end()
    meter.epoch_end(0)
    r = meter.result()
    assert r["step_time_s"]["p50"] == pytest.approx(0.5)
    assert r["samples_per_s"] == pytest.approx(40 / 4.0)


def test_fused_steps_and_partial_batches():
    clock = FakeClock()
    meter = Measurement(ProtocolConfig(warmup_steps=4), global_batch=8, devices=1, clock=clock)
    meter.epoch_begin(0)
    for _ in range(3):  # three calls of four fused steps each
        meter.step_begin()
        clock.now += 0.4
        meter.step_end(4)
    meter.step_begin()
    clock.now += 0.1
    meter.step_end(1, samples=3)  # the last, partial batch
    meter.epoch_end(0)
    r = meter.result()
    assert r["timed_steps"] == 9
    assert r["timed_samples"] == 8 * 8 + 3
    assert r["step_time_s"]["mean"] == pytest.approx((8 * 0.1 + 0.1) / 9)
    assert r["timed_wall_s"] == pytest.approx(0.9)


def test_target_never_reached_and_startup():
    clock = FakeClock()
    trainer = FakeTrainer(clock, accs=(0.5, 0.6))
    meter = Measurement(ProtocolConfig(warmup_steps=0, target_accuracy=0.97), global_batch=4, devices=1, clock=clock)
    drive(trainer, meter, epochs=2, max_steps_per_epoch=3)
    r = meter.result(process_start=meter.train_start_wall() - 2.5)
    assert r["steps"] == 6
    assert r["time_to_accuracy_s"] is None and r["epochs_to_accuracy"] is None
    assert r["startup_s"] == pytest.approx(2.5)


def test_summarize():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4 and s["mean"] == 2.5 and s["p50"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["p95"] == pytest.approx(3.85)
    assert s["cv"] == pytest.approx((1.25 ** 0.5) / 2.5)
    assert summarize([])["mean"] is None


class Recorder:
    def __init__(self):
        self.events = []

    def epoch_begin(self, epoch):
        self.events.append(("epoch", epoch))

    def advance(self, steps):
        pass

    def logged(self, step, values):
        self.events.append(("log", step, values))

    def evaluated(self, epoch, loss, accuracy):
        self.events.append(("eval", epoch, accuracy))

    def close(self):
        pass


def test_observers_get_windowed_figures_losses_and_evaluations():
    clock = FakeClock()
    trainer = FakeTrainer(clock, steps_per_epoch=10, step=0.02)
    trainer.loss = lambda: 0.5
    rec = Recorder()
    meter = Measurement(ProtocolConfig(warmup_steps=2, log_every=4), global_batch=8, devices=2, clock=clock,
                        observers=[rec])
    drive(trainer, meter, epochs=1)
    logs = [e for e in rec.events if e[0] == "log"]
    timing = [e for e in logs if "step_time_s" in e[2]]
    assert [e[1] for e in timing] == [4, 8]  # every log_every steps, warm-up steps not in the window
    assert timing[0][2]["step_time_s"] == pytest.approx(0.02)
    assert timing[0][2]["samples_per_s"] == pytest.approx(400) and timing[0][2]["samples_per_s_per_device"] == pytest.approx(200)
    assert [e[1] for e in logs if "train_loss" in e[2]] == [4, 8]
    assert meter.result()["train_loss"] == [(4, 0.5), (8, 0.5)]
    assert rec.events[0] == ("epoch", 0) and rec.events[-1] == ("eval", 0, 0.5)


class FakeEvents:
    """Device timestamps on the fake clock: a mark is the time its work would finish."""

    def __init__(self, clock):
        self.clock = clock

    def mark(self):
        return self.clock.now

    def seconds(self, start, end):
        return end - start


def test_sync_every_k_steps_times_each_step_from_device_events():
    durations = [0.01 * (1 + i % 3) for i in range(12)]  # 10, 20, 30 ms, repeating
    clock = FakeClock()
    synced = []
    meter = Measurement(ProtocolConfig(warmup_steps=2, sync_every=4), global_batch=8, devices=1,
                        sync=lambda: synced.append(clock.now), clock=clock, events=FakeEvents(clock))
    meter.epoch_begin(0)
    for d in durations:
        meter.step_begin()
        clock.now += d
        meter.step_end()
    meter.epoch_end(0)
    r = meter.result()
    # every timed step keeps its own duration, though the host waited only at the warm-up's end,
    # then every 4 steps, and at the epoch's end
    assert meter.step_times == pytest.approx(durations[2:])
    assert r["sync_every"] == 4 and r["syncs"] == len(synced) == 1 + 3
    assert r["timed_wall_s"] == pytest.approx(sum(durations[2:]))
    assert r["samples_per_s"] == pytest.approx(10 * 8 / sum(durations[2:]))


def test_sync_every_without_device_events_syncs_every_step():
    clock = FakeClock()
    synced = []
    meter = Measurement(ProtocolConfig(warmup_steps=0, sync_every=8), global_batch=8, devices=1,
                        sync=lambda: synced.append(1), clock=clock)
    meter.epoch_begin(0)
    for _ in range(5):
        meter.step_begin()
        clock.now += 0.01
        meter.step_end()
    meter.epoch_end(0)
    assert len(synced) == 5 and meter.result()["sync_every"] == 1


def test_a_loop_the_framework_owns_makes_one_call_per_step_and_one_per_evaluation():
    """Keras fit, Lightning and the textbook loops call step_end and epoch_end from their hooks: the
    loss is fetched only at log points, the evaluation is timed, and drive closes the backend."""
    clock = FakeClock()
    fetched = []

    def loss():
        fetched.append(clock.now)
        return 0.5

    def evaluate():
        clock.now += 1.0
        return 0.2, 0.98

    class Owner:
        closed = False

        def fit(self, meter, epochs, max_steps_per_epoch):
            for epoch in range(epochs):
                meter.epoch_begin(epoch)
                for _ in range(max_steps_per_epoch):
                    meter.step_begin()
                    clock.now += 0.01
                    meter.step_end(1, loss=loss)
                meter.epoch_end(epoch, evaluate)

        def close(self):
            self.closed = True

    owner = Owner()
    meter = Measurement(ProtocolConfig(warmup_steps=2, log_every=4), global_batch=8, devices=1, clock=clock)
    drive(owner, meter, epochs=2, max_steps_per_epoch=6)
    assert [step for step, _ in meter.train_loss] == [4, 8, 12] and len(fetched) == 3
    assert meter.eval_times == pytest.approx([1.0, 1.0]) and meter.accuracy_per_epoch == [0.98, 0.98]
    assert meter.steps_done == 12 and len(meter.step_times) == 10 and meter.epoch_reaching_target == 1
    assert owner.closed
