"""int4 weight layout of ``trt::Int4GroupwiseGemmPlugin``, checked against the contract text (section 3.5).

The expected bytes are built here from the contract's own description, independently of the packer:
the 32-entry column permutation is written out as a literal, and each 16-bit word is filled with plain
loops from "word w[g, 64j+p] holds row 4g + p//16, columns 64j + 4(p%16) .. +3 (after the shuffle)".
"""

from __future__ import annotations

import numpy as np
import pytest

from edgellm_steps.plugins.int4_gemm import int4_gemm_reference, pack_int4, unpack_int4

#: Contract 3.5: stored codes are u = q + 8 (zero point 8), one scale per 128 consecutive inputs.
ZERO_POINT = 8
GROUP_SIZE = 128

#: Within each block of 32 columns, position f holds original column PERMUTATION[f]: the contract's
#: shuffle a*8+b*2+c <- b*8+a*2+c followed by e*4+d <- d*2+e inside each group of 8.
PERMUTATION = [0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27,
               4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31]  # fmt: skip


def expected_bytes(codes: list[list[int]]) -> np.ndarray:
    """Contract 3.5 spelled out with loops: codes u [N][K] (0..15) -> int8 [N/2, K]."""
    n, k = len(codes), len(codes[0])
    stream = bytearray()
    for g in range(n // 4):  # int16 array w [N/4, K], row-major, little-endian
        for j in range(k // 64):
            for p in range(64):
                row = 4 * g + p // 16
                word = 0
                for i in range(4):
                    shuffled = 64 * j + 4 * (p % 16) + i
                    original = (shuffled // 32) * 32 + PERMUTATION[shuffled % 32]
                    word |= codes[row][original] << (4 * i)
                stream += bytes([word & 0xFF, word >> 8])
    return np.frombuffer(bytes(stream), dtype=np.int8).reshape(n // 2, k)


def pack_codes(codes: list[list[int]]) -> np.ndarray:
    return pack_int4(np.array(codes, dtype=np.int8) - ZERO_POINT)


def as_bytes(packed: np.ndarray) -> np.ndarray:
    return packed.view(np.uint8)


def test_permutation_literal_matches_the_two_shuffles_of_the_contract():
    step1 = {a * 8 + b * 2 + c: b * 8 + a * 2 + c for a in range(4) for b in range(4) for c in range(2)}
    step2 = {e * 4 + d: d * 2 + e for e in range(2) for d in range(4)}
    composed = [step1[(f // 8) * 8 + step2[f % 8]] for f in range(32)]
    assert composed == PERMUTATION


def test_hand_worked_bytes_codes_equal_column_mod_16():
    # u[n, k] = k % 16, N=4, K=64. Word p of row group 0 holds permuted columns 4(p%16)..+3. For
    # t = p % 16 < 8 those are original columns PERMUTATION[4t..4t+3] = 8d + t (d = 0..3) in the
    # first 32-block, codes t, t+8, t, t+8 -> word 0x(t+8)t(t+8)t, both bytes 0x(t+8)t. For t >= 8 the
    # same columns of the second 32-block, codes t-8, t, t-8, t -> both bytes 0x t(t-8), i.e. the
    # same eight values again. Every row holds the same codes, so packed rows 0 and 1 are equal.
    codes = [[k % 16 for k in range(64)] for _ in range(4)]
    packed = as_bytes(pack_codes(codes))
    assert packed.shape == (2, 64)
    assert packed[0, 0] == 0x80  # word 0 = 0x8080: cols 0, 8, 16, 24 -> codes 0, 8, 0, 8
    assert packed[0, 1] == 0x80
    assert packed[0, 2] == 0x91  # word 1 = 0x9191: cols 1, 9, 17, 25 -> codes 1, 9, 1, 9
    assert packed[0, 4] == 0xA2  # word 2 = 0xA2A2: cols 2, 10, 18, 26
    assert packed[0, 14] == 0xF7  # word 7 = 0xF7F7: cols 7, 15, 23, 31
    assert packed[0, 16] == 0x80  # word 8 = 0x8080: cols 32, 40, 48, 56 -> codes 0, 8, 0, 8
    assert packed[1, 0] == 0x80  # word 32 = row 2, cols 0, 8, 16, 24
    row = [0x80 + 0x11 * t for t in range(8) for _ in range(2)] * 4
    assert packed.tolist() == [row, row]
    assert np.array_equal(pack_codes(codes), expected_bytes(codes))


def test_hand_worked_bytes_codes_encode_row_and_column_block():
    # u[n, k] = (5n + k // 16) % 16, N=4, K=64: word p holds row p // 16, so the row shows in the
    # codes; permuted columns 0..3 are original 0, 8, 16, 24 (k // 16 = 0, 0, 1, 1) and permuted
    # columns 32..35 are original 32, 40, 48, 56 (k // 16 = 2, 2, 3, 3).
    codes = [[(5 * n + k // 16) % 16 for k in range(64)] for n in range(4)]
    packed = as_bytes(pack_codes(codes))
    assert packed[0, 0] == 0x00 and packed[0, 1] == 0x11  # word 0: row 0 codes 0, 0, 1, 1 -> 0x1100
    assert packed[0, 16] == 0x22 and packed[0, 17] == 0x33  # word 8: row 0 codes 2, 2, 3, 3 -> 0x3322
    assert packed[0, 32] == 0x55 and packed[0, 33] == 0x66  # word 16: row 1 codes 5, 5, 6, 6 -> 0x6655
    assert packed[1, 0] == 0xAA and packed[1, 1] == 0xBB  # word 32: row 2 codes 10, 10, 11, 11 -> 0xBBAA
    assert packed[1, 32] == 0xFF and packed[1, 33] == 0x00  # word 48: row 3 codes 15, 15, 0, 0 -> 0x00FF
    assert np.array_equal(pack_codes(codes), expected_bytes(codes))


@pytest.mark.parametrize(
    "pattern",
    [
        lambda n, k: k % 16,
        lambda n, k: (n * 5 + k // 16) % 16,
        lambda n, k: (n * 3 + k // 64 * 7 + k % 32 // 8 * 2 + k % 2) % 16,
    ],
    ids=["column", "row-and-16-block", "row-block-and-sub-block"],
)
def test_two_row_groups_and_two_column_blocks_match_the_contract(pattern):
    codes = [[pattern(n, k) for k in range(128)] for n in range(8)]
    assert np.array_equal(pack_codes(codes), expected_bytes(codes))


def test_random_codes_match_the_contract():
    codes = np.random.default_rng(1).integers(0, 16, (12, 192)).tolist()
    assert np.array_equal(pack_codes(codes), expected_bytes(codes))


def test_unpack_inverts_pack():
    q = np.random.default_rng(0).integers(-8, 8, (12, 256)).astype(np.int8)
    packed = pack_int4(q)
    assert packed.shape == (6, 256) and packed.dtype == np.int8
    assert np.array_equal(unpack_int4(packed), q)


@pytest.mark.parametrize("shape", [(2, 64), (4, 32), (6, 64), (4, 96)])
def test_pack_refuses_shapes_outside_the_layout(shape):
    with pytest.raises(ValueError, match="multiple of"):
        pack_int4(np.zeros(shape, dtype=np.int8))


def test_cpu_reference_equals_dequantized_matmul():
    rng = np.random.default_rng(2)
    n, k = 12, 256
    q = rng.integers(-8, 8, (n, k)).astype(np.int8)
    scales = rng.uniform(0.001, 0.05, (k // GROUP_SIZE, n)).astype(np.float16)
    x = rng.standard_normal((3, 5, k)).astype(np.float16)
    w = np.empty((n, k), dtype=np.float32)
    for row in range(n):
        for col in range(k):
            w[row, col] = float(q[row, col]) * float(scales[col // GROUP_SIZE, row])
    expected = x.astype(np.float32) @ w.T
    got = int4_gemm_reference(x, pack_int4(q), scales, group_size=GROUP_SIZE)
    assert got.shape == (3, 5, n) and got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
