"""Small ``@triton.jit`` helpers shared by the kernels of this package.

* Welford/Chan merging of ``(count, mean, m2)`` triples, for lane reductions and split merges.
* ``last_arrival``: the "last program finishes the job" ticket (one atomic per program) that
  lets a split reduction merge its partials inside the same launch instead of a second one.
* ``tanh`` without libdevice (the interpreter has no libdevice).

This module is imported lazily by ``runtime.kernels()`` (together with every kernel module) so
that the choice between compiled and interpreted kernels (``TRITON_INTERPRET``) is made at first
use.
"""
import triton
import triton.language as tl


@triton.jit
def welford_mean(mean, v, delta, w):
    """``mean + delta * w`` (delta = v - mean), or ``mean + v`` where delta is not finite: the
    mean of values holding an Inf is Inf (NaN for Inf - Inf), never Inf + (v - Inf) * w = NaN
    (C++: ``nf::coef::merged_mean``)."""
    return tl.where(delta - delta == 0.0, mean + delta * w, mean + v)


@triton.jit
def welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan's merge of two partial ``(mean, m2, count)`` triples; empty partials are fine.

    A mean of +-Inf / NaN merges as in ``welford_mean`` (Inf stays Inf, as nn.BatchNorm)."""
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.where(n > 0, n, 1.0), 0.0)
    delta = mean_b - mean_a
    return welford_mean(mean_a, mean_b, delta, w_b), m2_a + m2_b + delta * delta * n_a * w_b, n


@triton.jit
def last_arrival(counter_ptr, expected):
    """True in exactly one program: the last of ``expected`` programs that call this on the same
    counter.  Every store a program made before the call is visible to that last program, which
    must read them with ``cache_modifier=".cg"`` (L2, not a stale L1) and reset the counter to 0
    with ``reset_counter`` so that the buffer can be reused by the next launch on the stream.

    The barrier makes all threads' stores happen before the single-thread acq_rel atomic that
    Triton emits for a scalar atomic (followed by a broadcast barrier), the classic
    threadfence-reduction pattern.
    """
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return ticket == expected - 1


@triton.jit
def reset_counter(counter_ptr):
    tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def tanh(x):
    """tanh through exp of a non-positive argument: accurate near 0 and saturating cleanly."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)) without overflow warnings for large negative x."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def relu(x):
    """max(x, 0) that keeps NaN, as torch.relu (tl.maximum would turn NaN into 0)."""
    return tl.where(x <= 0, 0.0, x)


@triton.jit
def finite_or_zero(x):
    """The shift of a merge: 0 where ``x`` is not finite, so an Inf plane gives an Inf mean (as
    nn.BatchNorm) instead of Inf - Inf = NaN in every relative mean."""
    return tl.where(x - x == 0, x, 0.0)


@triton.jit
def total(x, axis: tl.constexpr):
    """``tl.sum`` without calling ``triton.language.standard.sum``: that ``@jit`` helper is
    compiled or interpreted for good when triton is first imported, while our kernels follow
    ``TRITON_INTERPRET`` at their first use.  Reducing with the standard ``_sum_combine`` keeps
    the interpreter on its numpy fast path.  (The kernels use ``tl.full``, not ``tl.zeros``, for
    the same reason.)"""
    return tl.reduce(x, axis, tl.standard._sum_combine)
