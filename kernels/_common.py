"""Small helpers shared by the launchers."""
import functools
import os
import warnings

import torch
from triton.runtime.autotuner import Heuristics


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (CPU tensors, one program at a time).
    Read once: Triton itself fixes the mode when the kernels are decorated, at import."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Host-side integer helpers. triton.cdiv and triton.next_power_of_2 are constexpr functions in
# Triton 3.6+, ~3 us per host call, and the launchers make a few hundred calls per training step.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (asked at launch time, never at import)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Triton's autotuner rebuilds its cache key from every argument on every launch (a dict of the
# ~40 arguments, the dtype of each tensor): about a fifth of the host time Triton's Python takes
# for a launch (benches/host_cost.py --launch-path python). launch_tuned builds that key itself
# and, when the autotuner already holds a configuration for it, launches the kernel directly.
def launch_tuned(tuned, grid, key_values, *args, **kwargs):
    """tuned[grid](*args, **kwargs), the kernel run with the configuration the autotuner would
    pick: its only one, or the one it cached for its key -- ``key_values`` (the values of its
    ``key`` arguments, in order) then the dtype of every tensor argument, as Autotuner.run builds
    it (tensors are passed positionally). A miss (a new key, or a key this function builds
    differently) goes through the autotuner. A triton.heuristics layer under the autotuner is
    evaluated here too, on the key arguments and the meta-parameters (all its functions may
    read; Heuristics.run would first build a dict of every argument)."""
    if len(tuned.configs) > 1:
        key = key_values + tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
        config = tuned.cache.get(key)
    else:
        config = tuned.configs[0]
    if config is None or config.pre_hook is not None:
        tuned[grid](*args, **kwargs)
        return
    fn, derived = tuned.fn, {}
    if isinstance(fn, Heuristics):
        meta = {**dict(zip(tuned.keys, key_values)), **kwargs, **config.kwargs}
        derived = {name: value(meta) for name, value in fn.values.items()}
        fn = fn.fn
    fn[grid](*args, **kwargs, **config.all_kwargs(), **derived)


# What keep_faster measured, for reports: (forced_env, key) -> {name: ms, or None if it raised}
TIMINGS = {}


def keep_faster(choices, key, forced_env, runs, default):
    """The name of the faster of ``runs`` ({name: zero-argument callable doing the whole
    computation one way}) for ``key``, whose last item is the device: each is timed on the
    first call of a key on a CUDA device and the winner is kept in ``choices`` (a dict). The
    environment variable ``forced_env`` (one of the names) forces one; the interpreter, CPU
    devices and a call during CUDA-graph capture (nothing may be timed then) get ``default``
    without timing. A way that raises while it is timed is not kept (a warning says why), as long
    as another one runs."""
    forced = os.environ.get(forced_env, "").strip().lower()
    if forced:
        if forced not in runs:
            raise ValueError(f"{forced_env} must be one of {tuple(runs)}, got {forced!r}")
        return forced
    choice = choices.get(key)
    if choice is not None:
        return choice
    if interpreting() or key[-1].type != "cuda" or torch.cuda.is_current_stream_capturing():
        return default
    from triton.testing import do_bench
    times, errors = {}, {}
    for name, run in runs.items():
        try:
            times[name] = do_bench(run, warmup=5, rep=20)
        except Exception as exc:  # noqa: BLE001 -- the other way is kept; re-raised if none runs
            errors[name] = exc
    if not times:
        raise next(iter(errors.values()))
    TIMINGS[(forced_env, key)] = {name: times.get(name) for name in runs}
    for name, exc in errors.items():
        warnings.warn(f"{forced_env}: the {name!r} way failed on {key[:-1]} and is not used: "
                      f"{type(exc).__name__}: {exc}")
    choices[key] = min(times, key=times.get)
    return choices[key]
