"""Two forced JAX host devices in a subprocess, shared by the tests that run
`keras.distribution.DataParallel` on CPU.

XLA's CPU client runs each device's share of a multi-device program on a
thread of its own pool, and a collective waits in a rendezvous until every
device's share has arrived (40 s, then the whole process aborts). The pool
has max(cores, devices) threads: 2 on a 2-core machine, so one thread taken
by another program's share leaves a collective waiting for a thread that never
comes. On this project's 2-core CI machine that aborted a run (SIGABRT,
"Expected 2 threads to join the rendezvous, but only 1 of them arrived"); with
three busy processes beside it, `tests/support/noise_scale_check.py --data-parallel`
aborted or hung in 2 of 12 runs, with Eigen's pool off and the rendezvous
timeout raised as well. `NPROC` sets XLA's idea of the core count, so the pool
gets 8 threads: no run failed under the same load (30 runs).
"""

TWO_HOST_DEVICES = "--xla_force_host_platform_device_count=2"
"""XLA_FLAGS for two host devices."""

POOL_THREADS = "8"
"""NPROC: XLA's CPU thread pools' size (see the module docstring)."""


def with_two_host_devices(env):
    """`env` (a dict) with two forced host devices and room in XLA's thread
    pools for both devices' shares of more than one program."""
    return dict(env, XLA_FLAGS=TWO_HOST_DEVICES, NPROC=POOL_THREADS)


def with_host_devices(env, count):
    """`env` with `count` forced host devices and XLA thread pools of
    `max(8, 2 * count)` threads (see the module docstring)."""
    return dict(
        env,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={count}",
        NPROC=str(max(int(POOL_THREADS), 2 * count)),
    )
