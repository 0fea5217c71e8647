"""Implicit differentiation at an equilibrium ``a* = f(a*, *args)`` (extreme_kd.md, "Equilibrium training").

Forward: the equilibrium is found with gradients stopped (:func:`fixed_point`) or supplied by an external
simulation, e.g. SpikingBERT's T-step IF network (:func:`implicit_equilibrium`). Backward (a
``jax.custom_vjp``): with ``g = dL/da*``, solve the adjoint fixed point

    beta = (df/da)^T beta + g          (i.e. (I - J_f)^T beta = g at a*)

and return ``dL/dargs = beta^T df/dargs`` from one ``jax.vjp`` of f at a* (implicit function theorem; Bai et
al., "Deep Equilibrium Models", 2019; Xiao et al., "Training Feedback Spiking Neural Networks by Implicit
Differentiation on the Equilibrium State", 2021). Memory does not grow with the number of forward iterations
or time steps. For a feed-forward f (df/da = 0) the adjoint solve stops at once with ``beta = g``: the
gradient of the straight-through form ``f(a*) + stop_gradient(a* - f(a*))`` used by SpikingBERT.

Gradients reach every array in ``args`` and every traced array f closes over (hoisted with
``jax.closure_convert``); the starting point / supplied equilibrium gets none. ``args`` are pytrees of arrays
(parameter dicts, ``nnx.State``, ``nnx.Module``); static settings belong in f's Python closure.

Non-convergence policy: a solve stops after ``max_iter`` iterations whatever its residual. By default the
last iterate is used; :func:`fixed_point_with_info` reports the forward residual and a ``converged`` flag.
With ``nan_on_failure=True`` an unconverged forward solve returns NaN, and an unconverged adjoint solve NaN
gradients, so a bad step shows in the loss or gradient norm (``optax.apply_if_finite`` can then skip it).

Solver statistics: the adjoint solve runs inside the backward pass, where no auxiliary output can leave a
``jax.grad``; a :class:`SolveLog` passed as ``log`` receives the :class:`SolveInfo` of every forward and
adjoint solve on the host (``jax.debug.callback``), also under ``jit``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qslm_jax.equilibrium.solvers import PyTree, SolveInfo, Solver, make_solver
from qslm_jax.errors import ConfigError


class SolveLog:
    """Host-side record of the solves of :func:`fixed_point_with_info` / :func:`implicit_equilibrium`.

    ``records[kind]`` (kind ``"forward"`` or ``"adjoint"``) lists ``(iterations, residual, converged)`` per
    solve in the order they ran (one entry per element when the solve was ``vmap``-ped). Filled through
    ``jax.debug.callback``, so it works under ``jit`` and inside the backward pass; nothing is recorded while
    a function is only traced or compiled.
    """

    KINDS = ("forward", "adjoint")

    def __init__(self):
        self.records: dict[str, list[tuple[int, float, bool]]] = {kind: [] for kind in self.KINDS}

    def record(self, kind: str, info: SolveInfo) -> None:
        """Append the (possibly batched) ``info`` of one solve of ``kind``."""
        columns = (np.ravel(np.asarray(x)).tolist() for x in (info.iterations, info.residual, info.converged))
        self.records[kind].extend(zip(*columns, strict=True))

    def summary(self) -> dict[str, Any]:
        """Per kind: number of solves, mean / max iterations, max / last relative residual, how many missed
        ``tol``, and the series of iterations and residuals (one entry per solve)."""
        out: dict[str, Any] = {}
        for kind, rows in self.records.items():
            if not rows:
                out[kind] = {"solves": 0}
                continue
            iterations, residuals, converged = zip(*rows, strict=True)
            out[kind] = {"solves": len(rows), "iterations_mean": float(np.mean(iterations)),
                         "iterations_max": int(max(iterations)), "residual_max": float(max(residuals)),
                         "residual_last": float(residuals[-1]), "unconverged": int(len(rows) - sum(converged)),
                         "iterations": list(iterations), "residuals": list(residuals)}
        return out


def _log_solve(log: SolveLog | None, kind: str, info: SolveInfo) -> None:
    """Send ``info`` to ``log`` from inside a traced computation (no-op without a log)."""
    if log is not None:
        jax.debug.callback(partial(log.record, kind), info)


def _nan_unless(converged: jax.Array, tree: PyTree, nan_on_failure: bool) -> PyTree:
    """``tree`` unchanged, or all NaN where ``nan_on_failure`` and the solve did not converge."""
    if not nan_on_failure:
        return tree
    return jax.tree.map(lambda x: jnp.where(converged, x, jnp.nan), tree)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _with_implicit_grad(f, adjoint: Solver, nan_on_failure: bool, log: SolveLog | None, a_star: PyTree,
                        params: tuple) -> PyTree:
    """Identity on ``a_star`` whose VJP is the implicit gradient through ``a* = f(a*, *params)``."""
    return a_star


def _implicit_fwd(f, adjoint, nan_on_failure, log, a_star, params):
    return a_star, (a_star, params)


def _implicit_bwd(f, adjoint, nan_on_failure, log, residuals, g):
    a_star, params = residuals
    _, vjp = jax.vjp(lambda a, p: f(a, *p), a_star, params)
    beta, info = adjoint(lambda b: jax.tree.map(jnp.add, vjp(b)[0], g), g)
    _log_solve(log, "adjoint", info)
    beta = _nan_unless(info.converged, beta, nan_on_failure)
    return jax.tree.map(jnp.zeros_like, a_star), vjp(beta)[1]


_with_implicit_grad.defvjp(_implicit_fwd, _implicit_bwd)


def _convert(f, a: PyTree, args: tuple):
    """Check that ``f(a, *args)`` has a's structure, shapes and dtypes; return ``(f(a, *params), params)``.

    ``params`` are ``args`` followed by the traced arrays f closes over, so that they receive gradients.
    """
    want = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), a)
    got = jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(f, a, *args))
    if jax.tree.structure(want) != jax.tree.structure(got) or jax.tree.leaves(want) != jax.tree.leaves(got):
        raise ConfigError(
            f"the equilibrium map must return its first argument's structure, shapes and dtypes: expected "
            f"{want}, got {got}; make f(a, *args) return an array pytree shaped like a"
        )
    converted, consts = jax.closure_convert(f, a, *args)
    return converted, (*args, *consts)


def implicit_equilibrium(
    f,
    a_star: PyTree,
    *args: PyTree,
    solver: str | Solver = "fixed_point",
    tol: float | None = None,
    max_iter: int | None = None,
    nan_on_failure: bool = False,
    log: SolveLog | None = None,
) -> PyTree:
    """The supplied equilibrium ``a*`` (value unchanged, no gradient of its own) with the implicit backward.

    ``f(a, *args) -> a`` is the equilibrium map (for SpikingBERT: the steady-state surrogate of the IF
    network) and ``a*`` its fixed point computed elsewhere (the simulated average spike rates). The VJP
    w.r.t. ``args`` is ``beta^T df/dargs`` at a*, with ``beta = (df/da)^T beta + dL/da*`` solved by
    ``solver`` (starting from ``beta = dL/da*``); its statistics go to ``log`` (kind ``"adjoint"``).
    """
    adjoint = make_solver(solver, tol=tol, max_iter=max_iter)
    a_star = jax.lax.stop_gradient(a_star)
    converted, params = _convert(f, a_star, args)
    return _with_implicit_grad(converted, adjoint, nan_on_failure, log, a_star, params)


def fixed_point_with_info(
    f,
    a0: PyTree,
    *args: PyTree,
    solver: str | Solver = "fixed_point",
    tol: float | None = None,
    max_iter: int | None = None,
    adjoint: str | Solver | None = None,
    nan_on_failure: bool = False,
    log: SolveLog | None = None,
) -> tuple[PyTree, SolveInfo]:
    """Solve ``a* = f(a*, *args)`` from ``a0``; return ``(a*, SolveInfo)``, a* implicitly differentiable.

    The forward solve runs with gradients stopped; the backward is that of :func:`implicit_equilibrium`,
    with the ``adjoint`` solver (default: the forward one; ``tol``/``max_iter`` apply to both).
    ``SolveInfo`` holds the forward relative residual ``||f(a) - a|| / ||f(a)||``, the iterations used and
    whether ``tol`` was met. With a ``log``, the forward and adjoint solves' statistics are recorded there.
    """
    forward = make_solver(solver, tol=tol, max_iter=max_iter)
    backward = forward if adjoint is None else make_solver(adjoint, tol=tol, max_iter=max_iter)
    a0 = jax.lax.stop_gradient(a0)
    converted, params = _convert(f, a0, args)
    frozen = jax.lax.stop_gradient(params)
    a_star, info = forward(lambda a: converted(a, *frozen), a0)
    _log_solve(log, "forward", info)
    a_star = _nan_unless(info.converged, a_star, nan_on_failure)
    return _with_implicit_grad(converted, backward, nan_on_failure, log, a_star, params), info


def fixed_point(
    f,
    a0: PyTree,
    *args: PyTree,
    solver: str | Solver = "fixed_point",
    tol: float | None = None,
    max_iter: int | None = None,
    adjoint: str | Solver | None = None,
    nan_on_failure: bool = False,
    log: SolveLog | None = None,
) -> PyTree:
    """The equilibrium ``a* = f(a*, *args)`` with implicit gradients to ``args``; see fixed_point_with_info.

    ``solver``: ``"fixed_point"`` (Picard), ``"anderson"``, or a solver instance from
    :mod:`qslm_jax.equilibrium.solvers`; ``tol``/``max_iter`` override its defaults (1e-5, 100).
    """
    a_star, _ = fixed_point_with_info(
        f, a0, *args, solver=solver, tol=tol, max_iter=max_iter, adjoint=adjoint,
        nan_on_failure=nan_on_failure, log=log,
    )
    return a_star
