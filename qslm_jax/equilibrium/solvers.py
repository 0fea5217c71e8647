"""Fixed-point solvers ``x = F(x)`` that run under ``jit`` and ``vmap`` (one ``lax.while_loop`` each).

Both solvers are used twice by :mod:`qslm_jax.equilibrium.implicit`: for the forward equilibrium
``a* = f(a*, x)`` and for the adjoint ``beta = (df/da)^T beta + g`` (extreme_kd.md, "Equilibrium training").

* :class:`FixedPointIteration` - Picard iteration ``x_{k+1} = F(x_k)``; converges when F is a contraction.
* :class:`Anderson` - Anderson acceleration (type II, Walker & Ni 2011) with a window of ``memory`` past
  iterates; typically several times fewer evaluations of F, and it also solves some non-contractive linear
  adjoints.

Convergence test (both): the relative residual ``||F(x) - x||_2 / ||F(x)||_2 <= tol`` (0/0 counts as
converged, so an exact fixed point stops at once). The loop stops at ``max_iter`` iterations whatever the
residual; the returned :class:`SolveInfo` says whether ``tol`` was met, so a non-convergent map never hangs
and the caller decides what to do. In fp32 a slowly contracting map can stall at a relative residual of
~1e-6 (rounding floor): ask for ``tol >= 1e-5`` there. Iterates are pytrees, flattened to one vector
internally.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from qslm_jax.errors import ConfigError

PyTree = Any


class SolveInfo(NamedTuple):
    """Outcome of a solve: final relative residual, number of loop iterations, and ``residual <= tol``."""

    residual: jax.Array
    iterations: jax.Array
    converged: jax.Array


class Solver(Protocol):
    """A fixed-point solver: ``solver(F, x0) -> (x, SolveInfo)`` with ``x ~= F(x)``."""

    tol: float
    max_iter: int

    def __call__(self, fn, x0: PyTree) -> tuple[PyTree, SolveInfo]: ...


def _relative_residual(x: jax.Array, fx: jax.Array) -> jax.Array:
    """``||fx - x|| / ||fx||`` with 0/0 = 0."""
    num = jnp.linalg.norm(fx - x)
    den = jnp.linalg.norm(fx)
    return jnp.where(num == 0, 0.0, num / jnp.where(den == 0, 1.0, den)).astype(x.dtype)


def _check_limits(tol: float, max_iter: int) -> None:
    if not tol >= 0:
        raise ConfigError(f"solver tol must be >= 0, got {tol!r}: pass e.g. tol=1e-5")
    if int(max_iter) != max_iter or max_iter < 1:
        raise ConfigError(f"solver max_iter must be an integer >= 1, got {max_iter!r}")


def _flat_problem(fn, x0: PyTree):
    """Flatten a pytree fixed-point problem to vectors; returns ``(F_flat, x0_flat, unravel)``."""
    x0_flat, unravel = ravel_pytree(x0)

    def fn_flat(v):
        return ravel_pytree(fn(unravel(v)))[0]

    return fn_flat, x0_flat, unravel


def _run(step, init_extra, fn, x0: PyTree, tol: float, max_iter: int) -> tuple[PyTree, SolveInfo]:
    """Shared driver: ``while k < max_iter and residual > tol: state = step(state)``.

    The loop state is ``(k, x, F(x), residual, extra)``; ``step`` maps it to the next state. Returns
    ``F(x_K)`` (one free Picard step beyond the last iterate) and the residual of ``x_K``.
    """
    fn_flat, x, unravel = _flat_problem(fn, x0)
    fx = fn_flat(x)
    state = (jnp.zeros((), jnp.int32), x, fx, _relative_residual(x, fx), init_extra(x))

    def cond(s):
        k, _, _, res, _ = s
        return (k < max_iter) & ~(res <= tol)

    def body(s):
        k, x, fx, _, extra = s
        x_new, extra = step(k, x, fx, extra)
        fx_new = fn_flat(x_new)
        return k + 1, x_new, fx_new, _relative_residual(x_new, fx_new), extra

    k, _, fx, res, _ = jax.lax.while_loop(cond, body, state)
    return unravel(fx), SolveInfo(residual=res, iterations=k, converged=res <= tol)


@dataclass(frozen=True)
class FixedPointIteration:
    """Picard iteration ``x_{k+1} = F(x_k)`` until the relative residual is ``<= tol`` or ``max_iter``."""

    tol: float = 1e-5
    max_iter: int = 100

    def __post_init__(self):
        _check_limits(self.tol, self.max_iter)

    def __call__(self, fn, x0: PyTree) -> tuple[PyTree, SolveInfo]:
        """Solve ``x = fn(x)`` from ``x0``; returns ``(x, SolveInfo)``."""
        return _run(lambda k, x, fx, extra: (fx, extra), lambda x: (), fn, x0, self.tol, self.max_iter)


@dataclass(frozen=True)
class Anderson:
    """Anderson acceleration of ``x = F(x)`` (type II; Walker & Ni, SIAM J. Numer. Anal. 49, 2011).

    With the last ``memory`` iterates ``x_i``, images ``g_i = F(x_i)`` and residuals ``r_i = g_i - x_i``
    (current index k), solve the regularised least-squares problem

        gamma = argmin_gamma ||r_k + sum_i gamma_i (r_i - r_k)||^2 + lam ||gamma||^2,
        lam = regularization * max_i ||r_i - r_k||^2,

    and step to

        x_{k+1} = (1 - damping) (x_k + sum_i gamma_i (x_i - x_k)) + damping (g_k + sum_i gamma_i (g_i - g_k)).

    Working with differences to the current iterate (rather than the bordered system in the mixing weights)
    keeps the fp32 solve accurate near convergence, where all ``g_i`` are almost equal.
    """

    tol: float = 1e-5
    max_iter: int = 100
    memory: int = 5
    damping: float = 1.0
    regularization: float = 1e-6

    def __post_init__(self):
        _check_limits(self.tol, self.max_iter)
        if int(self.memory) != self.memory or self.memory < 1:
            raise ConfigError(f"Anderson memory must be an integer >= 1, got {self.memory!r}")
        if not 0 < self.damping <= 1:
            raise ConfigError(f"Anderson damping must be in (0, 1], got {self.damping!r}")
        if not self.regularization >= 0:
            raise ConfigError(f"Anderson regularization must be >= 0, got {self.regularization!r}")

    def __call__(self, fn, x0: PyTree) -> tuple[PyTree, SolveInfo]:
        """Solve ``x = fn(x)`` from ``x0``; returns ``(x, SolveInfo)``."""
        m = self.memory

        def init(x):
            return jnp.zeros((m, x.size), x.dtype), jnp.zeros((m, x.size), x.dtype)

        def step(k, x, fx, history):
            xs, gs = history
            slot = k % m
            xs, gs = xs.at[slot].set(x), gs.at[slot].set(fx)
            idx = jnp.arange(m)
            others = (idx < jnp.minimum(k + 1, m)) & (idx != slot)
            r = fx - x
            d_r = jnp.where(others[:, None], (gs - xs) - r, 0.0)
            gram = d_r @ d_r.T
            lam = self.regularization * jnp.max(jnp.diag(gram)) + jnp.finfo(x.dtype).tiny
            # Unused slots get a unit diagonal and a zero right-hand side, hence gamma_i = 0.
            lhs = gram + jnp.diag(jnp.where(others, lam, 1.0))
            gamma = jnp.linalg.solve(lhs, -(d_r @ r))
            x_bar = x + gamma @ jnp.where(others[:, None], xs - x, 0.0)
            g_bar = fx + gamma @ jnp.where(others[:, None], gs - fx, 0.0)
            return (1.0 - self.damping) * x_bar + self.damping * g_bar, (xs, gs)

        return _run(step, init, fn, x0, self.tol, self.max_iter)


SOLVERS: dict[str, type] = {"fixed_point": FixedPointIteration, "anderson": Anderson}


def make_solver(solver: str | Solver, *, tol: float | None = None, max_iter: int | None = None) -> Solver:
    """A solver from a name in :data:`SOLVERS` or an instance; ``tol``/``max_iter`` override when given."""
    overrides = {k: v for k, v in (("tol", tol), ("max_iter", max_iter)) if v is not None}
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ConfigError(f"unknown fixed-point solver {solver!r}: expected one of {sorted(SOLVERS)}")
        return SOLVERS[solver](**overrides)
    if not isinstance(solver, tuple(SOLVERS.values())):
        raise ConfigError(f"solver must be a name in {sorted(SOLVERS)} or an instance of one, got {solver!r}")
    return dataclasses.replace(solver, **overrides)
