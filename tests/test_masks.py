"""The mask primitives: exact top-k counts, straight-through gradients, bit packing, statistics."""
import math

import pytest
import torch

from propetl.methods import masks


@pytest.mark.parametrize("n,sparsity,zeros", [(10, 0.3, 3), (100, 0.57, 57), (49152, 0.5, 24576),
                                              (24576, 0.9, 22118), (98304, 0.9, 88473), (7, 0.0, 0)])
def test_zero_count_is_floor_of_sparsity_times_n(n, sparsity, zeros):
    assert masks.zeros_per_mask(n, sparsity) == zeros
    assert masks.ones_per_mask(n, sparsity) == n - zeros


def test_reference_examples():
    """paper.md §2.1: the reference's kept fraction k gives n - floor((1-k) n) ones."""
    assert masks.ones_per_mask(49_152, 0.5) == 24_576
    assert masks.ones_per_mask(24_576, 0.9) == 2_458
    assert masks.ones_per_mask(98_304, 0.9) == 9_831


def test_binarize_keeps_largest_magnitudes_per_layer():
    scores = torch.tensor([[[0.1, -0.9], [0.5, -0.2]], [[-3.0, 0.0], [1.0, 2.0]]])   # [2 layers, 2, 2]
    got = masks.binarize(scores, 0.5)
    assert got.tolist() == [[[0, 1], [1, 0]], [[1, 0], [0, 1]]]


def test_ties_still_give_exact_counts():
    got = masks.binarize(torch.ones(3, 10), 0.4)
    assert got.sum(dim=1).tolist() == [6, 6, 6]


def test_straight_through_gradient_is_sign_of_score():
    scores = torch.tensor([[0.5, -0.2, 0.1, -0.7]], requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    (masks.binarize(scores, 0.5) * upstream).sum().backward()
    assert scores.grad.tolist() == [[1.0, -2.0, 3.0, -4.0]]     # dL/dm * sign(s), also for masked-out entries


def test_scores_init_kaiming_uniform_bounds():
    layer_masks = masks.LayerMasks(4, (16, 64), sparsity=0.5)
    bound = 1 / math.sqrt(64)                                       # kaiming_uniform(a=sqrt 5) on fan_in 64
    assert layer_masks.scores.abs().max() <= bound
    assert layer_masks.scores.abs().max() > 0.9 * bound


def test_score_range_follows_the_given_fan_in():
    """A method can ask for the reference's layout (adapter: transposed; prefix: one [L, P, 2h] tensor)."""
    layer_masks = masks.LayerMasks(4, (16, 64), sparsity=0.5, score_fan_in=16 * 64)
    bound = 1 / 32
    assert bound * 0.9 < layer_masks.scores.abs().max() <= bound
    multi = masks.TaskLayerMasks(3, 4, (16, 64), 0.5, score_fan_in=16)
    for stack in (torch.stack(list(multi.tasks.scores)), multi.layers.scores):
        assert 0.25 * 0.9 < stack.abs().max() <= 0.25


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_invalid_sparsity(sparsity):
    with pytest.raises(ValueError, match="mask.sparsity"):
        masks.LayerMasks(2, (3, 3), sparsity)


def test_load_binary_reproduces_mask_exactly():
    layer_masks = masks.LayerMasks(3, (4, 6), sparsity=0.75)
    target = masks.LayerMasks(3, (4, 6), sparsity=0.75, kind="random", seed=7)()
    layer_masks.load_binary(target)
    assert torch.equal(layer_masks(), target)
    with pytest.raises(ValueError, match="ones per layer"):
        layer_masks.load_binary(torch.ones(3, 4, 6))


# ----------------------------------------------------------------------------- tasks x layers (multi-task)

def test_combine_truth_tables():
    task = torch.tensor([0.0, 0.0, 1.0, 1.0])
    layers = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    assert masks.combine(task, layers, "or").tolist() == [[0, 1, 1, 1]]
    assert masks.combine(task, layers, "and").tolist() == [[0, 0, 0, 1]]
    assert masks.combine(task, layers, "task_only").tolist() == [[0, 0, 1, 1]]
    assert masks.combine(task, layers, "layer_only").tolist() == [[0, 1, 0, 1]]
    with pytest.raises(ValueError, match="mask.combine='xor'.*or, and, task_only, layer_only"):
        masks.combine(task, layers, "xor")


def test_or_gradient_is_the_other_mask_complement():
    """d/dm_task of 1 - (1 - t)(1 - l) is (1 - l), summed over layers; d/dm_layer is (1 - t)."""
    task = torch.tensor([0.0, 1.0, 0.0], requires_grad=True)
    layers = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]], requires_grad=True)
    masks.combine(task, layers, "or").sum().backward()
    assert task.grad.tolist() == [1.0, 2.0, 0.0]
    assert layers.grad.tolist() == [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_task_layer_masks_exact_per_task_density_and_gradients(sparsity):
    torch.manual_seed(0)
    shape = (8, 16)
    m = masks.TaskLayerMasks(num_tasks=3, num_layers=4, shape=shape, sparsity=sparsity, how="or")
    ones = masks.ones_per_mask(128, sparsity)
    assert m.tasks().reshape(3, -1).sum(dim=1).tolist() == [ones] * 3          # exact per-task density
    assert m.layers().reshape(4, -1).sum(dim=1).tolist() == [ones] * 4
    combined = m(1)
    assert combined.shape == (4, *shape)
    assert set(combined.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(combined >= m.layers()) and torch.all(combined >= m.tasks()[1])   # OR keeps both
    combined.sum().backward()
    assert m.tasks.scores[1].grad.abs().sum() > 0 and m.layers.scores.grad.abs().sum() > 0
    assert m.tasks.scores[0].grad is None and m.tasks.scores[2].grad is None   # other tasks: no gradient at all
    assert {p.data_ptr() for p in m.tasks.scores}.isdisjoint({m.layers.scores.data_ptr()})   # no task/layer aliasing
