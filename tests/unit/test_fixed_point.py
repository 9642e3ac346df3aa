"""The query int8 keys are dotted with: 15-bit fixed point per row (kv/fixed_point.py)."""

import torch

from ferrolm.kv.fixed_point import FIXED_POINT_MAX, query_exponent, round_query


def _edge_rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(8, 64, generator=g) * torch.logspace(-30, 30, 8).view(8, 1)
    rows[0] = 0.0
    rows[1, :4] = torch.tensor([16256.0, 0.5, 1.5, -2.5])  # the largest exactly at the limit, ties
    rows[1, 4:] = 0.0
    rows[2, :2] = torch.tensor([16257.0, 3.0])  # just past it: one exponent up
    rows[2, 2:] = 0.0
    rows[3] = torch.randn(64, generator=g) * 1e-39  # subnormal: the exponent floor
    return rows


def test_rows_become_integers_of_at_most_16256_steps():
    q = _edge_rows()
    e = query_exponent(q)
    r = round_query(q)
    ints = torch.ldexp(r, -e)
    assert torch.equal(ints, ints.round())
    assert ints.abs().max() <= FIXED_POINT_MAX
    assert torch.equal(e[1], torch.tensor([0], dtype=e.dtype)) and torch.equal(e[2], e[1] + 1)
    assert r[1, :4].tolist() == [16256.0, 0.0, 2.0, -2.0]  # round half to even
    assert int(e[3]) == -126
    # e is the smallest that fits: the largest element uses more than half the range
    big = q.abs().amax(dim=1) > 2.0**-100
    assert (ints.abs().amax(dim=1)[big] >= FIXED_POINT_MAX / 2).all()
    # within half a step of q (at most 2^-14 of the row's largest element), idempotent
    step = torch.ldexp(torch.ones_like(q[:, :1]), e)
    assert ((r - q).abs() <= step / 2).all()
    assert torch.equal(round_query(r), r)


def test_splits_into_an_int8_high_part_and_a_low_part():
    ints = torch.ldexp(round_query(_edge_rows()), -query_exponent(_edge_rows()))
    hi = torch.round(ints / 128)
    lo = ints - 128 * hi
    assert hi.abs().max() <= 127 and lo.abs().max() <= 64
