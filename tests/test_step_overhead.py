"""benches/step_overhead.py's count of the host-device synchronizations in one step: torch's
sync warnings only (the GPU measurement itself runs in the GPU suite)."""
import warnings

from _bench_script import load as load_bench_script


def test_sync_warnings_counts_synchronizing_calls_not_the_prototype_notice():
    step_overhead = load_bench_script("step_overhead")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect "
                      "all synchronizing operations (Triggered internally at ...)")
        warnings.warn("called a synchronizing CUDA operation (Triggered internally at ...)")
        warnings.warn("an unrelated warning")
        warnings.warn("called a synchronizing CUDA operation")
    found = step_overhead.sync_warnings(caught)
    assert [message for message, _ in found] == [
        "called a synchronizing CUDA operation (Triggered internally at ...)",
        "called a synchronizing CUDA operation"]
    assert all(where.startswith(f"{__file__}:") for _, where in found)  # where each was called


def test_host_time_arithmetic_on_a_made_up_clock(monkeypatch):
    """host_us: host microseconds a call (the warm-up calls not timed); _enqueue_ms: the median
    of its repetitions, in ms. FIXTURE: a clock that reads made-up times."""
    step_overhead = load_bench_script("step_overhead")
    monkeypatch.setattr(step_overhead.torch.cuda, "synchronize", lambda: None)
    clock = iter([1.0, 1.5])  # 4 timed calls in 0.5 s: 125000 us a call
    monkeypatch.setattr(step_overhead.time, "perf_counter", lambda: next(clock))
    assert step_overhead.host_us(lambda: None, n=4) == 125000.0
    # three repetitions of 1, 5 and 2 ticks of 2 ** -10 s (exact in binary): the median 2
    ticks = [0, 1, 8, 13, 16, 18]
    clock = iter([t / 1024 for t in ticks])
    assert step_overhead._enqueue_ms(lambda: None, warmup=0, reps=3) == 2 / 1024 * 1e3
