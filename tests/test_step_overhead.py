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
