"""Bit-exactness of bit operations and fault models against numpy views."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxfi

FORMATS = [np.float32, jnp.bfloat16, np.float16, np.int8, np.uint8, np.int16, np.int32,
           ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _raw_values(dtype, n=512, seed=0):
    """Every kind of bit pattern, NaNs and infinities included, as dtype."""
    dt = np.dtype(dtype)
    raw = np.random.default_rng(seed).integers(0, 2 ** (8 * dt.itemsize), n, dtype=np.uint64)
    return raw.astype(UINT[dt.itemsize]).view(dt)


def _view(x):
    x = np.asarray(x)
    return x.view(UINT[x.dtype.itemsize])


@pytest.mark.parametrize("dtype", FORMATS, ids=lambda d: np.dtype(d).name)
def test_flip_set_clear_match_numpy_views(dtype):
    x = _raw_values(dtype)
    width = np.dtype(dtype).itemsize * 8
    for bits in ([0], [width - 1], list(range(0, width, 3))):
        mask = UINT[width // 8](sum(1 << b for b in bits))
        np.testing.assert_array_equal(_view(jaxfi.flip_bits(x, bits)), _view(x) ^ mask)
        np.testing.assert_array_equal(_view(jaxfi.set_bits(x, bits)), _view(x) | mask)
        np.testing.assert_array_equal(_view(jaxfi.clear_bits(x, bits)), _view(x) & ~mask)


@pytest.mark.parametrize("dtype", FORMATS, ids=lambda d: np.dtype(d).name)
def test_flip_twice_is_identity(dtype):
    x = _raw_values(dtype, seed=1)
    once = jaxfi.flip_bits(x, "all")
    np.testing.assert_array_equal(_view(jaxfi.flip_bits(once, "all")), _view(x))


@pytest.mark.parametrize("dtype", FORMATS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_bitflip_model_flips_n_distinct_bits(dtype, n):
    x = _raw_values(dtype, seed=2)
    y = jaxfi.BitFlip(bits="all", n=n)(jax.random.key(n), x)
    diff = _view(x) ^ _view(y)
    np.testing.assert_array_equal(np.vectorize(lambda v: bin(int(v)).count("1"))(diff), n)


@pytest.mark.parametrize("dtype", FORMATS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("value", [0, 1])
def test_stuck_at_forces_bit(dtype, value):
    x = _raw_values(dtype, seed=3)
    width = np.dtype(dtype).itemsize * 8
    y = _view(jaxfi.StuckAt(value, bits=[width - 2])(jax.random.key(0), x))
    np.testing.assert_array_equal((y >> (width - 2)) & 1, value)
    untouched = ~UINT[width // 8](1 << (width - 2))
    np.testing.assert_array_equal(y & untouched, _view(x) & untouched)


def test_named_bit_sets():
    f32 = jaxfi.format_of(np.float32)
    assert f32.bits("sign") == (31,)
    assert f32.bits("exponent") == tuple(range(23, 31))
    assert f32.bits("mantissa") == tuple(range(23))
    bf16 = jaxfi.format_of(jnp.bfloat16)
    assert bf16.bits("exponent") == tuple(range(7, 15))
    e4m3 = jaxfi.format_of(ml_dtypes.float8_e4m3fn)
    assert (e4m3.bits("sign"), e4m3.bits("exponent"), e4m3.bits("mantissa")) == ((7,), (3, 4, 5, 6), (0, 1, 2))
    e5m2 = jaxfi.format_of(ml_dtypes.float8_e5m2)
    assert e5m2.bits("exponent") == (2, 3, 4, 5, 6)
    assert jaxfi.format_of(np.int8).bits("sign") == (7,)
    assert f32.bits(range(20, 23)) == (20, 21, 22)
    assert f32.bits([5, 3, 5]) == (3, 5)


@pytest.mark.parametrize("dtype,bit", [(np.float32, 32), (jnp.bfloat16, 16), (np.int8, 8),
                                       (ml_dtypes.float8_e5m2, 9), (np.float32, -1)])
def test_bit_outside_format_names_format_and_width(dtype, bit):
    width = np.dtype(dtype).itemsize * 8
    with pytest.raises(ValueError, match=rf"{np.dtype(dtype).name}.*width is {width}"):
        jaxfi.flip_bits(jnp.zeros(3, dtype), [bit])


def test_bad_bit_sets_and_dtypes():
    with pytest.raises(ValueError, match="no sign bits"):
        jaxfi.format_of(np.uint8).bits("sign")
    with pytest.raises(ValueError, match="unknown bit set 'exponent'.*int32"):
        jaxfi.format_of(np.int32).bits("exponent")
    with pytest.raises(TypeError, match="complex64 is not supported"):
        jaxfi.format_of(np.complex64)
    with pytest.raises(ValueError, match="float64 needs 64-bit JAX"):
        jaxfi.format_of(np.float64)


def test_signalling_nan_payload_survives_bfloat16_injection():
    snan = np.array([0x7F81, 0x3F80, 0x3F80, 0x3F80], np.uint16).view(jnp.bfloat16)
    params = {"w": jnp.asarray(snan)}
    plan = jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(bits=[0]), count=4)
    faulty, _ = jax.jit(jaxfi.inject, static_argnums=2)(jax.random.key(0), params, plan)
    np.testing.assert_array_equal(_view(faulty["w"]), _view(snan) ^ np.uint16(1))


def test_random_value_finite_only():
    for dtype in (np.float32, jnp.bfloat16, np.float16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
        x = jnp.zeros(4096, dtype)
        y = jaxfi.RandomValue(finite_only=True)(jax.random.key(0), x)
        assert np.isfinite(np.asarray(y).astype(np.float32)).all()
    y = jaxfi.RandomValue()(jax.random.key(0), jnp.zeros(4096, jnp.float16))
    assert not np.isfinite(np.asarray(y).astype(np.float32)).all()


def test_burst_zero_custom():
    x = jnp.ones(256, jnp.float32)
    y = _view(jaxfi.Burst(length=3, bits="mantissa")(jax.random.key(0), x))
    diff = y ^ _view(x)
    low = diff & -diff
    np.testing.assert_array_equal(diff, low * 7)
    assert (diff < (1 << 23)).all()
    np.testing.assert_array_equal(_view(jaxfi.Zero()(jax.random.key(0), x)), 0)
    neg = jaxfi.Custom(lambda k, v: -v)(jax.random.key(0), x)
    np.testing.assert_array_equal(np.asarray(neg), -1.0)
    with pytest.raises(ValueError, match="must return shape"):
        jaxfi.Custom(lambda k, v: v[:2])(jax.random.key(0), x)
    with pytest.raises(ValueError, match="no run of 9 adjacent bits"):
        jaxfi.Burst(length=9, bits="exponent")(jax.random.key(0), x)


def test_float64_with_x64_in_subprocess():
    code = textwrap.dedent("""
        import jax, numpy as np
        jax.config.update("jax_enable_x64", True)
        import jaxfi
        x = np.random.default_rng(0).normal(size=64)
        y = np.asarray(jaxfi.flip_bits(x, [0, 52, 63]))
        assert (y.view(np.uint64) == x.view(np.uint64) ^ np.uint64((1 << 52) | (1 << 63) | 1)).all()
        params = {"w": jax.numpy.asarray(x), "v": jax.numpy.ones(8, np.float32)}
        plan = jaxfi.Plan(jaxfi.Params(), count=5)
        out, rec = jaxfi.inject(jax.random.key(0), params, plan)
        assert rec.before.dtype == np.uint64
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
