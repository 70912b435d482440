"""Loading model weights strictly and non-strictly (utils.checkpoint.load_model_weights,
engine.defaults.load_weights)."""
import pytest
import torch
import torch.nn as nn

from utils.checkpoint import load_model_weights


def _net(width: int = 4, out: int = 2) -> nn.Module:
    torch.manual_seed(width * 10 + out)
    return nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width), nn.Linear(width, out))


def _partial_checkpoint():
    """State of a model (fresh values) whose keys partly match _net(): '0.*' and '1.*' match,
    '2.weight' has another shape, '2.bias' is missing, 'extra.weight' is unexpected."""
    state = {k: v + 1.0 for k, v in _net(4, 2).state_dict().items() if not k.startswith("2.")}
    state["2.weight"] = torch.randn(5, 4)
    state["extra.weight"] = torch.randn(3)
    return state


def test_non_strict_load_copies_every_matching_tensor():
    """Matching keys (parameters and buffers) get the checkpoint's values, the rest keep theirs.
    Catches breakage non-strict-loads-nothing."""
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = _partial_checkpoint()
    assert load_model_weights(model, state, strict=False, source="partial.pth")  # not a clean load
    after = model.state_dict()
    matching = [k for k in before if k in state and state[k].shape == before[k].shape]
    assert sorted(matching) == sorted(k for k in before if k.startswith(("0.", "1.")))
    for k in matching:
        assert torch.equal(after[k], state[k]), k
        assert not torch.equal(after[k], before[k]), k  # the value really changed
    for k in ("2.weight", "2.bias"):
        assert torch.equal(after[k], before[k]), k


def test_non_strict_load_reports_missing_unexpected_and_shape():
    """The returned problems name the missing, unexpected and wrong-shape keys."""
    problems = load_model_weights(_net(), _partial_checkpoint(), strict=False, source="partial.pth")
    text = "\n".join(problems)
    assert len(problems) == 3
    assert "missing keys (1): 2.bias" in text
    assert "unexpected keys (1): extra.weight" in text
    assert "2.weight: checkpoint (5, 4) vs model (2, 4)" in text


def test_strict_load_refuses_and_leaves_model_untouched():
    """strict=True raises naming the keys and the MODEL.LOAD_STRICT hint; nothing is loaded."""
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError) as err:
        load_model_weights(model, _partial_checkpoint(), strict=True, source="partial.pth")
    msg = str(err.value)
    assert "partial.pth" in msg and "2.bias" in msg and "extra.weight" in msg
    assert "MODEL.LOAD_STRICT False" in msg
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_exact_checkpoint_loads_strictly_without_problems():
    model, source = _net(), _net(4, 2)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    assert load_model_weights(model, source.state_dict(), strict=True, source="same.pth") == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k


def test_load_weights_non_strict_from_config(tmp_path):
    """engine.defaults.load_weights with MODEL.LOAD_STRICT False: a checkpoint of a model with
    an extra fused head and 5 classes loads into a 4-class model without it: every tensor of
    the same name and shape comes from the file, the classifiers keep their own values.
    Catches breakage non-strict-loads-nothing."""
    from config import build_cfg
    from engine.defaults import load_weights
    from modeling.model import build_model
    from tests.conftest import TINY_OPTS

    torch.manual_seed(1)
    source = build_model(build_cfg("", TINY_OPTS + ["MODEL.FUSION.NAME", "mean"]), 5, 4)
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model": source.state_dict(), "epoch": 1}, path)

    cfg = build_cfg("", TINY_OPTS + ["TEST.WEIGHT", path, "MODEL.LOAD_STRICT", "False"])
    torch.manual_seed(2)
    model = build_model(cfg, 4, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_weights(cfg, model)
    after, saved = model.state_dict(), source.state_dict()
    loaded = [k for k in before if k in saved and saved[k].shape == before[k].shape]
    kept = [k for k in before if k not in loaded]
    assert any(k.startswith("backbone.") for k in loaded)
    assert kept == ["heads.ori.classifier.weight"]
    for k in loaded:
        assert torch.equal(after[k], saved[k]), k
    assert torch.equal(after[kept[0]], before[kept[0]])
    assert any(not torch.equal(before[k], saved[k]) for k in loaded if k.startswith("backbone."))

    strict = build_cfg("", TINY_OPTS + ["TEST.WEIGHT", path, "MODEL.LOAD_STRICT", "True"])
    with pytest.raises(RuntimeError, match="heads.fused"):
        load_weights(strict, build_model(strict, 4, 4))
