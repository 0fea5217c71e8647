"""Implicit differentiation at a fixed point vs differentiation through many unrolled iterations.

The reference gradient is ``jax.grad`` through ``UNROLL`` plain iterations of a contractive map
(``||W||_2 <= 0.9`` and |tanh'| <= 1, so the unrolled iterate is at the fixed point to fp32 precision).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qslm_jax.equilibrium.implicit import SolveLog, fixed_point, fixed_point_with_info, implicit_equilibrium
from qslm_jax.equilibrium.solvers import Anderson, FixedPointIteration, make_solver
from qslm_jax.errors import ConfigError

SOLVERS = ["fixed_point", "anderson"]
UNROLL = 300
TOL = 1e-6
N = 8


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _matrix(n: int, norm: float, seed: int) -> jax.Array:
    w = np.random.default_rng(seed).normal(size=(n, n))
    return jnp.asarray(w / np.linalg.norm(w, 2) * norm, jnp.float32)


def _vector(n: int, seed: int, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=n) * scale, jnp.float32)


def _params(norm: float = 0.9) -> dict:
    return {"W": _matrix(N, norm, 0), "b": _vector(N, 1, 0.5)}


def f_tanh(a, params, x):
    """The test map ``tanh(W a + b + x)``: a contraction when ||W||_2 < 1."""
    return jnp.tanh(params["W"] @ a + params["b"] + x)


def _unrolled(f, a0, *args):
    return jax.lax.fori_loop(0, UNROLL, lambda _, a: f(a, *args), a0)


def _loss(a):
    """A nonlinear scalar loss of the equilibrium."""
    c = _vector(N, 7)
    return jnp.sum(c * a) + jnp.sum(jnp.square(a)) ** 2


def _assert_tree_close(got, want, rtol=1e-4):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        err = np.linalg.norm(np.asarray(g) - np.asarray(w)) / np.linalg.norm(np.asarray(w))
        assert err < rtol, f"relative error {err:.2e} >= {rtol}"


@pytest.mark.parametrize("solver", SOLVERS)
def test_forward_solves_the_fixed_point(solver):
    params, x = _params(), _vector(N, 2)
    a_star, info = jax.jit(lambda p, x: fixed_point_with_info(
        f_tanh, jnp.zeros(N), p, x, solver=solver, tol=TOL, max_iter=500))(params, x)
    assert bool(info.converged) and float(info.residual) <= TOL and 1 <= int(info.iterations) < 500
    np.testing.assert_allclose(a_star, _unrolled(f_tanh, jnp.zeros(N), params, x), atol=1e-6)
    np.testing.assert_allclose(a_star, f_tanh(a_star, params, x), atol=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_gradients_match_unrolled_under_jit(solver):
    params, x = _params(), _vector(N, 2)

    def implicit_loss(p, x):
        return _loss(fixed_point(f_tanh, jnp.zeros(N), p, x, solver=solver, tol=TOL, max_iter=500))

    def unrolled_loss(p, x):
        return _loss(_unrolled(f_tanh, jnp.zeros(N), p, x))

    got = jax.jit(jax.grad(implicit_loss, argnums=(0, 1)))(params, x)
    want = jax.grad(unrolled_loss, argnums=(0, 1))(params, x)
    _assert_tree_close(got, want)


@pytest.mark.parametrize("solver", SOLVERS)
def test_pytree_state_and_args_match_unrolled(solver):
    """A two-population state {h, z} coupled both ways, parameters in a nested dict."""
    params = {"enc": {"W": _matrix(N, 0.6, 3), "U": _matrix(N, 0.3, 4)}, "dec": {"V": _matrix(N, 0.6, 5)}}
    x = _vector(N, 6)

    def f(state, p, x):
        h = jnp.tanh(p["enc"]["W"] @ state["h"] + p["enc"]["U"] @ state["z"] + x)
        return {"h": h, "z": jnp.tanh(p["dec"]["V"] @ state["h"] - 0.5)}

    a0 = {"h": jnp.zeros(N), "z": jnp.zeros(N)}

    def loss(state):
        return _loss(state["h"]) + jnp.sum(jnp.sin(state["z"]))

    got = jax.jit(jax.grad(lambda p, x: loss(fixed_point(f, a0, p, x, solver=solver, tol=TOL)),
                           argnums=(0, 1)))(params, x)
    want = jax.grad(lambda p, x: loss(_unrolled(f, a0, p, x)), argnums=(0, 1))(params, x)
    _assert_tree_close(got, want)


@pytest.mark.parametrize("solver", SOLVERS)
def test_vmap_per_example_and_batched_loss(solver):
    params = _params()
    xs = jnp.stack([_vector(N, 10 + i, scale) for i, scale in enumerate([0.1, 1.0, 3.0, 0.5])])

    def implicit_loss(p, x):
        return _loss(fixed_point(f_tanh, jnp.zeros(N), p, x, solver=solver, tol=TOL, max_iter=500))

    def unrolled_loss(p, x):
        return _loss(_unrolled(f_tanh, jnp.zeros(N), p, x))

    per_example = jax.jit(jax.vmap(jax.grad(implicit_loss, argnums=(0, 1)), in_axes=(None, 0)))(params, xs)
    want = jax.vmap(jax.grad(unrolled_loss, argnums=(0, 1)), in_axes=(None, 0))(params, xs)
    for i in range(len(xs)):
        _assert_tree_close(jax.tree.map(lambda t, i=i: t[i], per_example),
                           jax.tree.map(lambda t, i=i: t[i], want))

    batched = jax.jit(jax.grad(lambda p: jnp.sum(jax.vmap(implicit_loss, in_axes=(None, 0))(p, xs))))(params)
    _assert_tree_close(batched, jax.tree.map(lambda t: jnp.sum(t, axis=0), want[0]))

    _, info = jax.vmap(lambda x: fixed_point_with_info(
        f_tanh, jnp.zeros(N), params, x, solver=solver, tol=TOL, max_iter=500))(xs)
    assert info.converged.shape == (len(xs),) and bool(jnp.all(info.converged))


@pytest.mark.parametrize("solver", SOLVERS)
def test_gradient_reaches_closed_over_arrays(solver):
    """Parameters captured by f's closure (not passed as args) get the implicit gradient too."""
    params, x = _params(), _vector(N, 2)

    def implicit_loss(p):
        return _loss(fixed_point(lambda a, x: f_tanh(a, p, x), jnp.zeros(N), x, solver=solver, tol=TOL))

    got = jax.jit(jax.grad(implicit_loss))(params)
    want = jax.grad(lambda p: _loss(_unrolled(f_tanh, jnp.zeros(N), p, x)))(params)
    _assert_tree_close(got, want)


def test_nnx_state_args_match_unrolled():
    layer = nnx.Linear(N, N, rngs=nnx.Rngs(0))
    layer.kernel[...] = _matrix(N, 0.8, 8)
    graphdef, state = nnx.split(layer)
    x = _vector(N, 9)

    def f(a, state, x):
        return jnp.tanh(nnx.merge(graphdef, state)(a) + x)

    got = jax.jit(jax.grad(lambda s: _loss(fixed_point(f, jnp.zeros(N), s, x, tol=TOL))))(state)
    want = jax.grad(lambda s: _loss(_unrolled(f, jnp.zeros(N), s, x)))(state)
    assert jax.tree.structure(got) == jax.tree.structure(state)
    _assert_tree_close(got, want)


def test_integer_args_and_initial_guess_get_no_gradient():
    table = jnp.stack([_vector(N, 20 + i) for i in range(5)])
    idx = jnp.array([4, 0, 2, 2, 1, 3, 0, 4])
    w = _matrix(N, 0.9, 0)

    def f(a, w, table, idx):  # idx is an integer array argument
        return jnp.tanh(w @ a + table[idx, jnp.arange(N)])

    def implicit_loss(w, table, a0):
        return _loss(fixed_point(f, a0, w, table, idx, solver="anderson", tol=TOL))

    g_w, g_table, g_a0 = jax.grad(implicit_loss, argnums=(0, 1, 2))(w, table, jnp.full(N, 0.3))
    want = jax.grad(lambda w, t: _loss(_unrolled(f, jnp.zeros(N), w, t, idx)), argnums=(0, 1))(w, table)
    _assert_tree_close((g_w, g_table), want)
    np.testing.assert_array_equal(g_a0, np.zeros(N))


@pytest.mark.parametrize("solver", SOLVERS)
def test_feedforward_map_reduces_to_straight_through(solver):
    """df/da = 0: the adjoint is beta = g, i.e. the gradient of f(a*) + stop_gradient(a* - f(a*)).

    As in SpikingBERT, a* comes from elsewhere (here: rates that are not f's value) and is returned unchanged.
    """
    params, x = _params(), _vector(N, 2)
    a_sim = jnp.round(jax.nn.sigmoid(_vector(N, 30)) * 16) / 16  # stand-in for T = 16 simulated rates

    def f(a, p, x):  # no dependence on a
        return jax.nn.sigmoid(p["W"] @ x + p["b"])

    def implicit_loss(p, x):
        return _loss(implicit_equilibrium(f, a_sim, p, x, solver=solver, tol=TOL))

    def straight_through_loss(p, x):
        fa = f(a_sim, p, x)
        return _loss(fa + jax.lax.stop_gradient(a_sim - fa))

    np.testing.assert_array_equal(implicit_equilibrium(f, a_sim, params, x), a_sim)
    got = jax.jit(jax.grad(implicit_loss, argnums=(0, 1)))(params, x)
    want = jax.jit(jax.grad(straight_through_loss, argnums=(0, 1)))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(got))


@pytest.mark.parametrize("solver", SOLVERS)
def test_supplied_equilibrium_with_feedback_matches_unrolled(solver):
    params, x = _params(), _vector(N, 2)
    a_sim = _unrolled(f_tanh, jnp.zeros(N), params, x)  # the "external simulation"

    got = jax.grad(lambda p: _loss(implicit_equilibrium(f_tanh, a_sim, p, x, solver=solver, tol=TOL)))(params)
    want = jax.grad(lambda p: _loss(_unrolled(f_tanh, jnp.zeros(N), p, x)))(params)
    _assert_tree_close(got, want)


def test_anderson_needs_fewer_iterations_on_a_slow_contraction():
    q, _ = np.linalg.qr(np.random.default_rng(11).normal(size=(N, N)))
    w = jnp.asarray(q @ np.diag(np.linspace(-0.97, 0.97, N)) @ q.T, jnp.float32)  # spectral radius 0.97
    params, x = {"W": w, "b": jnp.zeros(N)}, _vector(N, 12, 0.01)  # nearly linear: Picard rate ~0.97
    # tol 1e-5: Picard on this map stalls at a relative residual ~1.2e-6 (fp32 rounding floor)
    runs = {s: fixed_point_with_info(f_tanh, jnp.zeros(N), params, x, solver=s, tol=1e-5, max_iter=2000)
            for s in SOLVERS}
    for _, info in runs.values():
        assert bool(info.converged)
    np.testing.assert_allclose(runs["anderson"][0], runs["fixed_point"][0], atol=1e-5)
    assert int(runs["anderson"][1].iterations) * 4 < int(runs["fixed_point"][1].iterations)


def test_unstable_fixed_point_is_capped_and_reported():
    """tanh(-2 a): the fixed point 0 has |f'| = 2 > 1; Picard iteration falls into a 2-cycle."""
    def f(a, w):
        return jnp.tanh(w * a)

    run = jax.jit(lambda a0, nan: fixed_point_with_info(
        f, a0, jnp.float32(-2.0), max_iter=25, tol=TOL, nan_on_failure=nan), static_argnums=1)
    a, info = run(jnp.full(3, 0.5), False)
    assert not bool(info.converged) and int(info.iterations) == 25 and float(info.residual) > 1.0
    assert bool(jnp.all(jnp.isfinite(a)))
    a_nan, _ = run(jnp.full(3, 0.5), True)
    assert bool(jnp.all(jnp.isnan(a_nan)))
    a_exact, info_exact = run(jnp.zeros(3), True)  # starting on the fixed point: converged at once
    assert bool(info_exact.converged) and int(info_exact.iterations) == 0
    np.testing.assert_array_equal(a_exact, np.zeros(3))


@pytest.mark.parametrize("solver", SOLVERS)
def test_map_without_fixed_point_is_capped_for_every_solver(solver):
    def f(a):  # every point is sent to the other side of 0: no fixed point
        return jnp.where(a >= 0, -1.0, 1.0)

    a, info = jax.jit(lambda a0: fixed_point_with_info(f, a0, solver=solver, max_iter=40))(jnp.full(4, 0.3))
    assert not bool(info.converged) and int(info.iterations) == 40 and float(info.residual) > 0.5
    assert bool(jnp.all(jnp.isfinite(a)))


def test_non_contractive_adjoint():
    """f(a, w) = 2 a + w has the fixed point a* = -w, so dL/dw = -dL/da*; the adjoint map has slope 2.

    Picard cannot solve the adjoint (NaN with nan_on_failure); Anderson solves it (a linear problem).
    """
    w = _vector(N, 13)
    a_star = -w

    def f(a, w):
        return 2.0 * a + w

    def grad_for(solver, nan):
        return jax.grad(lambda w: _loss(implicit_equilibrium(
            f, a_star, w, solver=solver, tol=TOL, max_iter=30, nan_on_failure=nan)))(w)

    want = -jax.grad(_loss)(a_star)
    _assert_tree_close(grad_for("anderson", True), want)
    assert bool(jnp.all(jnp.isnan(grad_for("fixed_point", True))))
    assert bool(jnp.all(jnp.isfinite(grad_for("fixed_point", False))))


def test_solver_settings_and_errors():
    assert make_solver("anderson", tol=1e-3) == Anderson(tol=1e-3)
    assert make_solver(Anderson(memory=3), max_iter=7) == Anderson(memory=3, max_iter=7)
    assert make_solver(FixedPointIteration(tol=1e-2)) == FixedPointIteration(tol=1e-2)
    with pytest.raises(ConfigError, match="unknown fixed-point solver 'broyden'"):
        make_solver("broyden")
    with pytest.raises(ConfigError, match="or an instance"):
        make_solver(object())
    for bad in ({"tol": -1.0}, {"max_iter": 0}, {"memory": 0}, {"damping": 0.0}, {"regularization": -1.0}):
        with pytest.raises(ConfigError):
            Anderson(**bad)


def test_map_with_wrong_output_structure_is_rejected():
    with pytest.raises(ConfigError, match="structure, shapes and dtypes"):
        fixed_point(lambda a, w: jnp.concatenate([a, w]), jnp.zeros(3), jnp.ones(2))
    with pytest.raises(ConfigError, match="structure, shapes and dtypes"):
        implicit_equilibrium(lambda a: {"a": a}, jnp.zeros(3))


@pytest.mark.parametrize("solver", SOLVERS)
def test_solve_log_records_forward_and_adjoint_solves_under_jit(solver):
    """The adjoint solve runs inside the backward pass; its statistics still reach the log, once per call."""
    params, x = _params(), _vector(N, 2)
    log = SolveLog()
    grad = jax.jit(jax.grad(lambda p: _loss(fixed_point(f_tanh, jnp.zeros(N), p, x, solver=solver, tol=TOL,
                                                        log=log))))
    assert all(not rows for rows in log.records.values())  # nothing is recorded before the call runs
    for _ in range(2):
        jax.block_until_ready(grad(params))
    _, info = fixed_point_with_info(f_tanh, jnp.zeros(N), params, x, solver=solver, tol=TOL)
    summary = log.summary()
    for kind in SolveLog.KINDS:
        stats = summary[kind]
        assert stats["solves"] == 2 and stats["unconverged"] == 0
        assert 1 < stats["iterations_max"] < 300 and 0 <= stats["residual_max"] <= TOL
        assert stats["iterations"] == [stats["iterations_max"]] * 2
    assert summary["forward"]["iterations"][0] == int(info.iterations)

    capped = SolveLog()  # an adjoint that runs out of iterations is counted as unconverged
    jax.grad(lambda p: _loss(implicit_equilibrium(f_tanh, jnp.zeros(N), p, x, solver=solver, tol=TOL,
                                                  max_iter=1, log=capped)))(params)
    assert capped.summary()["adjoint"]["unconverged"] == 1 and capped.summary()["forward"] == {"solves": 0}
