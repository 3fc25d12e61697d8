"""The tolerance table itself: every bound has a reason, and no family is stricter in a coarser dtype."""

import pytest
import torch

from tests.tolerances import NORMWISE, TOLERANCES, normwise, tol

FINEST_FIRST = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("family", sorted(TOLERANCES))
def test_every_bound_has_a_reason_and_coarser_dtypes_are_no_stricter(family):
    rows = TOLERANCES[family]
    for bound in rows.values():
        assert bound.rtol >= 0 and bound.atol >= 0 and len(bound.why) > 20
    rtols = [rows[d].rtol for d in FINEST_FIRST if d in rows]
    assert rtols == sorted(rtols), f"{family}: rtol must not shrink from float64 to bfloat16"


@pytest.mark.parametrize("family", sorted(NORMWISE))
def test_normwise_bounds_have_reasons_and_coarser_dtypes_are_no_stricter(family):
    rows = NORMWISE[family]
    assert all(0 < bound < 1 and len(why) > 20 for bound, why in rows.values())
    bounds = [rows[d][0] for d in FINEST_FIRST if d in rows]
    assert bounds == sorted(bounds)


def test_lookup():
    assert tol("norm", torch.float32) == {"rtol": 1e-5, "atol": 1e-5}
    assert tol("matmul", torch.float32, scale=10.0) == {"rtol": 1e-4, "atol": pytest.approx(1e-3)}
    assert normwise("gram", torch.float16) == 2e-3
    with pytest.raises(KeyError, match="no tolerance for"):
        tol("norm", torch.int8)
