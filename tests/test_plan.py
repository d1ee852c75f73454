"""PruningPlan: construction, masks, validation and JSON round trips."""

from __future__ import annotations

import pytest
import torch
from conftest import random_plan

from ppkit.errors import PlanError
from ppkit.plan import LayerPlan, PruningPlan, sorted_unique


def test_keep_all_and_counts():
    plan = PruningPlan.keep_all(3, 4, 10)
    assert plan.num_layers == 3
    assert plan.heads_per_layer == [4, 4, 4] and plan.neurons_per_layer == [10, 10, 10]
    assert plan.validate(3, 4, 10) is plan


def test_masks_round_trip_through_from_masks():
    plan = random_plan(4, 6, 20, seed=3, kind="zeros")
    head_mask, neuron_mask = plan.head_mask(), plan.neuron_mask()
    assert len(head_mask) == 4 and all(len(r) == 6 for r in head_mask)
    assert [sum(r) for r in head_mask] == plan.heads_per_layer
    assert [sum(r) for r in neuron_mask] == plan.neurons_per_layer
    assert head_mask[0] == [0.0] * 6  # "zeros": layer 0 keeps no heads
    for layer, row in zip(plan.layers, neuron_mask):
        assert [i for i, v in enumerate(row) if v] == list(layer.neurons)
    again = PruningPlan.from_masks(torch.tensor(head_mask), torch.tensor(neuron_mask))
    assert again.layers == plan.layers and (again.num_heads, again.ffn_dim) == (6, 20)


def test_from_masks_layer_mismatch():
    with pytest.raises(PlanError, match="layers"):
        PruningPlan.from_masks([[1, 0]], [[1, 1, 1], [0, 1, 1]])


def test_json_round_trip(tmp_path):
    plan = random_plan(3, 4, 16, seed=1)
    plan.meta = {"strategy": "test", "threshold": 0.25}
    path = tmp_path / "plan.json"
    plan.to_json(path)
    for source in (path, str(path), path.read_text()):
        loaded = PruningPlan.from_json(source)
        assert loaded.layers == plan.layers
        assert (loaded.num_heads, loaded.ffn_dim, loaded.meta) == (4, 16, plan.meta)


@pytest.mark.parametrize(
    "layers,match",
    [
        ([LayerPlan((0, 4), (0,))], "out of range"),
        ([LayerPlan((1, 0), (0,))], "sorted and unique"),
        ([LayerPlan((1, 1), (0,))], "sorted and unique"),
        ([LayerPlan((0,), (-1,))], "out of range"),
        ([], "no layers"),
    ],
)
def test_validate_rejects_bad_indices(layers, match):
    with pytest.raises(PlanError, match=match):
        PruningPlan(layers, 4, 8).validate()


def test_validate_against_model_shape():
    plan = PruningPlan.keep_all(2, 4, 8)
    with pytest.raises(PlanError, match="2 layers but the model has 3"):
        plan.validate(3, 4, 8)
    with pytest.raises(PlanError, match="4 heads"):
        plan.validate(2, 6, 8)
    with pytest.raises(PlanError, match="8 FFN neurons"):
        plan.validate(2, 4, 16)


def test_from_json_errors(tmp_path):
    with pytest.raises(PlanError, match="not found"):
        PruningPlan.from_json(tmp_path / "missing.json")
    with pytest.raises(PlanError, match="not valid JSON"):
        PruningPlan.from_json("{nope")
    with pytest.raises(PlanError, match="not a ppkit plan"):
        PruningPlan.from_json('{"layers": []}')
    with pytest.raises(PlanError, match="malformed"):
        PruningPlan.from_json('{"format": "ppkit-plan", "num_heads": 2}')
    bad = PruningPlan([LayerPlan((0, 2), (0,))], 2, 4).to_json()  # head 2 of 2 is out of range
    with pytest.raises(PlanError, match="out of range"):
        PruningPlan.from_json(bad)


def test_plain_tuples_are_coerced():
    plan = PruningPlan([([1, 0.0 + 2], [3])], 4, 8)
    assert plan.layers == [LayerPlan((1, 2), (3,))]
    assert sorted_unique([3, 1, 3, 2]) == (1, 2, 3)
