import pytest
import torch

from megatron_ualm.codebooks.delay import apply_delay, delay_valid_mask, delayed_length, revert_delay

EMPTY = -1


def slow_apply(codes: torch.Tensor, empty: int) -> torch.Tensor:
    B, K, T = codes.shape
    out = torch.full((B, K, T + K - 1), empty, dtype=codes.dtype)
    for b in range(B):
        for k in range(K):
            for t in range(T):
                out[b, k, t + k] = codes[b, k, t]
    return out


def test_worked_example_from_docstring():
    codes = torch.tensor([[[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]])
    S = EMPTY
    expected = torch.tensor([[[1, 2, 3, 4, S, S], [S, 5, 6, 7, 8, S], [S, S, 9, 10, 11, 12]]])
    assert torch.equal(apply_delay(codes, EMPTY), expected)


@pytest.mark.parametrize("B,K,T", [(1, 1, 5), (2, 3, 4), (3, 8, 1), (2, 8, 37), (1, 4, 0)])
def test_apply_matches_slow_loop_and_reverts(B, K, T):
    codes = torch.randint(0, 1024, (B, K, T))
    delayed = apply_delay(codes, EMPTY)
    assert delayed.shape == (B, K, delayed_length(T, K))
    assert torch.equal(delayed, slow_apply(codes, EMPTY)) if T else delayed.numel() == 0
    assert torch.equal(revert_delay(delayed, T), codes)


@pytest.mark.parametrize("K,T", [(3, 4), (8, 10), (1, 3)])
def test_valid_mask_marks_exactly_the_code_cells(K, T):
    codes = torch.randint(0, 50, (1, K, T))
    delayed = apply_delay(codes, EMPTY)[0]
    assert torch.equal(delay_valid_mask(K, T), delayed != EMPTY)
    assert int(delay_valid_mask(K, T).sum()) == K * T


def test_revert_ignores_trailing_steps_and_rejects_too_short():
    codes = torch.randint(0, 9, (2, 4, 6))
    delayed = torch.cat([apply_delay(codes, EMPTY), torch.full((2, 4, 3), 7)], dim=2)
    assert torch.equal(revert_delay(delayed, 6), codes)
    with pytest.raises(ValueError):
        revert_delay(delayed[:, :, :5], 6)
