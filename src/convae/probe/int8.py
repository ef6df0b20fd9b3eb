"""A streaming pass's two products on 8-bit codes, in exact int8 arithmetic.

On 8-bit codes (the probe's ``--dtype uint8``) a float32 pass converts each chunk to float32
and runs two skinny float32 products, 4 k flops per byte read: bound by the cores, not by the
memory. Here the chunk becomes int8 (``code - 128``, exact) and both products run on
``torch._int_mm`` (int8 x int8 -> int32 through oneDNN: VNNI or AMX), with the float operand
split into a few int8 digits of 7 bits each (a base-128 expansion scaled to its row's largest
magnitude), one product column per digit: the sums are exact integers, so the rounding is the
digits' truncation, 2^-27 of a weight row's largest weight and 2^-20 of a residual column's
largest residual, and the gradient's sums made float32 (24 bits) to combine their digits,
against float32's 2^-24 on every term of the float32 path's sums. torch's bf16 products were
no substitute: on the CPU they round their output to bf16.

A pass with 2 workers (an Intel host with AMX, 2026-12-07, a scratch benchmark on random
codes, 10 classes, 8 MiB chunks) ran 1.22x as fast as the float32 conversion's at 32,000 columns
(0.245 against 0.300 s for 20,000 rows: 2.6 GB/s of codes read), 1.28x at 22,400 and 1.44x at
3,200; the objective within 1e-8 and the gradient within 1.5e-6 (of its largest entry) of the
float32 pass's; ``benchmarks/linear_probe.py --dtype uint8`` times both paths (50,000 x 32,000
codes: 1.26x, 3.6x a copy of the same bytes against 5.5; 24 MiB chunks since, 1.1-1.2x faster
again, see CHUNK_BYTES). What holds it back is the gradient's product,
whose wide operand (the chunk) oneDNN reorders on every call: about 4 GB/s, against 8 for the
scores' and 9 for the read itself.
"""

from __future__ import annotations

import functools

import torch

_DIGIT_BITS = 7
_DIGIT = float(1 << _DIGIT_BITS)
WEIGHT_DIGITS = 4  # 27 bits: a weight's quantum far below the steps L-BFGS takes near its optimum
RESIDUAL_DIGITS = 3  # 20 bits: the residuals' rounding below float32's sums over a chunk
_MAX_DIGIT = 65  # |a digit| <= 64, the leading one 64 + a carry of rounding
# int32 sums stay exact: |code - 128| <= 128 times a digit, over the columns (the scores) ...
MAX_COLUMNS = (2**31 - 1) // (128 * _MAX_DIGIT)
# ... and a code <= 255 times a digit over a chunk's rows (the gradient). Made float32 for the
# digits' combination, sums past 2^24 round to float32's precision, as the float32 path's do; the
# cap was 2^24 / (255 x 65) = 1,012 rows (exact in float32), which kept chunks of narrow codes
# small: `benchmarks/linear_probe.py --rows 10000 --dims 2048 --dtype uint8` passed in 0.015-0.016 s
# with it, 0.010-0.012 without (with the chunk softmax of linear._chunk_loss; RESULTS.md)
MAX_CHUNK_ROWS = (2**31 - 1) // (255 * _MAX_DIGIT)
# codes a chunk: each chunk pays for its digits and its (digits x k, d) sums whatever its rows, so
# larger chunks win until the rows pass the cache: 24 MiB against 8, passes over the synthetic
# codes of benchmarks/linear_probe.py interleaved (2 workers): 0.46-0.50 s against 0.54-0.58 at
# 32,000 columns, 0.39-0.41 against 0.42-0.46 at 44,800; random codes 1.15-1.2x at 22,400-44,800
CHUNK_BYTES = 24 << 20


@functools.cache
def available() -> bool:
    """Whether this torch multiplies int8 on the CPU (checked once, on a tiny product): builds
    without the kernel then take the float32 path instead of failing a fit."""
    try:
        ones = torch.ones((2, 8), dtype=torch.int8)
        return bool((torch._int_mm(ones, ones.T.contiguous()) == 8).all())
    except (RuntimeError, NotImplementedError):
        return False


def chunk_rows(n: int, d: int, device: torch.device, asked: int | None) -> int:
    """Rows of an int8 chunk of n x d codes on `device` (`asked`, or CHUNK_BYTES of codes, at
    most MAX_CHUNK_ROWS and n); 0 where the products cannot run on int8 (a GPU, too many
    columns, a torch without the CPU kernel)."""
    if device.type != "cpu" or d > MAX_COLUMNS or not available():
        return 0
    return max(1, min(int(asked or CHUNK_BYTES // max(d, 1)), MAX_CHUNK_ROWS, n))


def to_signed(codes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``codes - 128`` as int8 into `out` (flipping the top bit is that subtraction)."""
    return torch.bitwise_xor(codes.view(torch.int8), -128, out=out)


def digits(M: torch.Tensor, n_digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `M` (r, m) as `n_digits` int8 rows, most significant first: the int8
    (n_digits * r, m) matrix D and float64 (r, n_digits) weights w with
    ``M[i] ~= sum_j w[i, j] * D[j * r + i]``, the error at most 2^-(7 n - 1) of the row's largest |value|.

    The arithmetic runs in M's dtype: float32 is exact for up to 3 digits, float64 for 7.
    """
    top = M.abs().amax(1, keepdim=True)
    top = torch.where(top > 0, top, torch.ones_like(top))  # a zero row: zero digits, any weight
    bits = _DIGIT_BITS * n_digits - 1
    q = torch.round(M / top * 2.0**bits)  # |q| <= 2^bits: an integer, exact in M's dtype
    rows = []
    for _ in range(n_digits - 1):
        high = torch.round(q / _DIGIT)  # balanced digits: q - 128 * high in [-64, 64]
        rows.append(q - _DIGIT * high)
        q = high
    rows.append(q)
    D = torch.cat(rows[::-1]).to(torch.int8)
    scales = torch.tensor([_DIGIT ** (n_digits - 1 - j) / 2.0**bits for j in range(n_digits)], dtype=torch.float64)
    return D, top.double() * scales


class Weights:
    """A pass's weights A (k, d) and intercepts c, ready for int8 chunks.

    `exact` is A as the digits hold it (float64): the pass computes the scores of these weights.
    """

    def __init__(self, A: torch.Tensor, c: torch.Tensor):
        k, _ = A.shape
        D, w = digits(A.double(), WEIGHT_DIGITS)
        self.exact = (w.T.reshape(WEIGHT_DIGITS, k, 1) * D.double().view(WEIGHT_DIGITS, k, -1)).sum(0)
        self.digits_t = D.T.contiguous()  # (d, digits * k): the chunk's rows first
        # scores = (codes - 128) @ exact.T + (c + 128 * row sums): the shift folded in
        self.intercepts = (c.double() + 128.0 * self.exact.sum(1)).view(1, k)
        self.combine = _stacked_diagonals(w)  # (digits * k, k)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """float32 scores (rows, k) of an int8 chunk (codes - 128)."""
        sums = torch._int_mm(x, self.digits_t)  # (rows, digits * k) int32, exact
        return torch.addmm(self.intercepts, sums.double(), self.combine).float()


def add_gradient(acc: torch.Tensor, residual: torch.Tensor, x: torch.Tensor, buffer) -> None:
    """``acc += residual.T @ x`` (acc: (k, d) float32; residual: (rows, k) float32; x: int8 chunk).

    x holds codes - 128: the digits' 128 x row sums, added to their int32 sums, make them the
    exact sums over the codes themselves (the shift added back in float would cancel against them:
    errors of 2e-5 of the gradient in near-constant columns, measured). ``buffer(name, shape,
    dtype)`` gives the calling thread's scratch tensors, reused by every chunk.
    """
    k, d = acc.shape
    D, w = digits(residual.T, RESIDUAL_DIGITS)  # (digits * k, rows)
    sums = torch._int_mm(D, x, out=buffer("int8.sums", (RESIDUAL_DIGITS * k, d), torch.int32))
    sums.add_(D.sum(1, dtype=torch.int32).mul_(128).view(-1, 1))
    floats = buffer("int8.floats", (RESIDUAL_DIGITS * k, d), torch.float32)
    floats.copy_(sums)  # float32's rounding past 2^24 (MAX_CHUNK_ROWS)
    combine = _stacked_diagonals(w).T.float()  # (k, digits * k)
    acc.addmm_(combine, floats)


def _stacked_diagonals(w: torch.Tensor) -> torch.Tensor:
    """(n * k, k): diag(w[:, 0]) above diag(w[:, 1]) ...: the digits' product columns (k each, in
    digit order) summed into the k values they stand for, each by its digit's weight."""
    return torch.cat([torch.diag(w[:, j]) for j in range(w.shape[1])])
