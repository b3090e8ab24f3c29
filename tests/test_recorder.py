"""FeatureRecorder: records what hooked modules return, owns its handles, and fails loudly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from experiments.engine.recorder import FeatureRecorder


class TupleOut(nn.Module):
    def forward(self, x):
        return x + 1, x * 2


class DictOut(nn.Module):
    def forward(self, x):
        return {"a": x - 1, "b": x.sum()}


class Net(nn.Module):
    """conv -> (tuple) -> (dict); ``unused`` is never called by forward."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.pair = TupleOut()
        self.named = DictOut()
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        first, _ = self.pair(self.body(x))
        return self.named(first)["a"]


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not module._forward_hooks for module in model.modules())


def test_records_tensor_tuple_and_dict_outputs_as_returned():
    model, x = Net(), torch.randn(2, 3, 5, 5)
    with FeatureRecorder(model, ["body", "body.0", "pair", "named"]) as rec:
        out = model(x)
    body = model.body(x)
    torch.testing.assert_close(rec.get("body"), body)
    torch.testing.assert_close(rec.get("body.0"), model.body[0](x))
    assert isinstance(rec.outputs["pair"], tuple) and len(rec.outputs["pair"]) == 2
    torch.testing.assert_close(rec.outputs["pair"][1], body * 2)
    assert set(rec.outputs["named"]) == {"a", "b"}
    torch.testing.assert_close(rec.outputs["named"]["a"], out)
    assert rec.calls == {"body": 1, "body.0": 1, "pair": 1, "named": 1}


def test_handles_removed_after_exit_and_after_remove():
    model = Net()
    with FeatureRecorder(model, ["body", "named"]):
        assert model.body._forward_hooks and model.named._forward_hooks
        model(torch.randn(1, 3, 4, 4))
    assert _no_hooks_left(model)

    rec = FeatureRecorder(model, ["pair"])
    rec.remove()
    rec.remove()  # idempotent
    assert _no_hooks_left(model)
    model(torch.randn(1, 3, 4, 4))
    assert rec.outputs == {}


def test_unknown_name_raises_value_error_naming_it_and_close_names():
    model = Net()
    with pytest.raises(ValueError, match=r'"bdy\.0" is not a submodule of Net.*body\.0'):
        FeatureRecorder(model, ["body", "bdy.0"])
    assert _no_hooks_left(model)  # nothing registered when construction fails
    with pytest.raises(ValueError, match='"" is not a submodule'):
        FeatureRecorder(model, [""])
    with pytest.raises(TypeError):
        FeatureRecorder(model, "body")


def test_module_that_never_fired_raises_on_get_and_on_exit():
    model = Net()
    # The recorder exits first (inner context) and its RuntimeError reaches pytest.raises.
    with (
        pytest.raises(RuntimeError, match='"unused" never fired'),
        FeatureRecorder(model, ["body", "unused"]) as rec,
    ):
        model(torch.randn(1, 3, 4, 4))
        rec.get("body")
        with pytest.raises(RuntimeError, match='"unused" never fired'):
            rec.get("unused")
    assert _no_hooks_left(model)  # removed even though exiting raised


def test_exception_in_body_is_not_masked_by_the_fired_check():
    model = Net()
    with pytest.raises(ZeroDivisionError), FeatureRecorder(model, ["unused"]):
        raise ZeroDivisionError
    assert _no_hooks_left(model)


def test_clear_forgets_outputs_so_stale_features_are_never_reused():
    model = Net()
    rec = FeatureRecorder(model, ["body"])
    model(torch.randn(1, 3, 4, 4))
    assert rec.calls["body"] == 1
    rec.clear()
    with pytest.raises(RuntimeError, match='"body" never fired since the last clear'):
        rec.get("body")
    x = torch.randn(1, 3, 4, 4)
    model(x)
    torch.testing.assert_close(rec.get("body"), model.body(x))
    with pytest.raises(KeyError, match="not recorded by this recorder"):
        rec.get("pair")
    rec.remove()


def test_detach_option_and_default_keeps_graph():
    model = Net()
    x = torch.randn(1, 3, 4, 4)
    with FeatureRecorder(model, ["body", "named"]) as kept:
        model(x)
    assert kept.get("body").requires_grad
    with FeatureRecorder(model, ["body", "named"], detach=True) as detached:
        model(x)
    assert not detached.get("body").requires_grad
    assert not detached.get("named")["a"].requires_grad
    torch.testing.assert_close(detached.get("body"), kept.get("body").detach())


def test_last_call_wins_and_calls_are_counted():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(2, 3)
    with FeatureRecorder(model, ["0", "0"]) as rec:  # duplicate names are hooked once
        out = model(x)
    assert rec.names == ("0",)
    assert rec.calls["0"] == 2
    torch.testing.assert_close(rec.get("0"), out)
