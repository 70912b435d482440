"""Config merging, validation and the command-line shortcuts."""
import pytest
import yaml

from config import ConfigError, build_cfg, default_argument_parser, cfg_from_args
from config.defaults import get_cfg_defaults
from tests.conftest import RUN_CONFIGS


def test_every_default_key_has_a_comment():
    text = open("config/defaults.py").read().splitlines()
    for i, line in enumerate(text):
        if line.startswith("_C.") and "= CN()" not in line:
            assert text[i - 1].lstrip().startswith("#"), f"no comment above: {line}"


def test_unknown_key_in_opts_names_the_key():
    with pytest.raises(ConfigError, match="MODEL.NOT_A_KEY"):
        build_cfg("", ["MODEL.NOT_A_KEY", "1"])


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("SOLVER:\n  MAX_EPOCH: 3\n")
    with pytest.raises(ConfigError) as err:
        build_cfg(str(path))
    assert "MAX_EPOCH" in str(err.value) and "bad.yml" in str(err.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="SOLVER.MAX_EPOCHS"):
        build_cfg("", ["SOLVER.MAX_EPOCHS", "'ten'"])


def test_flags_are_booleans():
    cfg = build_cfg("", ["MODEL.PIFE.ENABLED", "True"])
    assert cfg.MODEL.PIFE.ENABLED is True
    with pytest.raises(ConfigError, match="MODEL.SDTPS.GATE_NORM"):
        build_cfg("", ["MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "mean",
                       "MODEL.SDTPS.GATE_NORM", "yes"])


def test_selection_and_fusion_names_come_from_the_registries():
    """NAME keys are checked against the registries (a typo names the key and the choices, with a
    suggestion); a selection needs a fusion; the modules' own checks name their key."""
    cfg = build_cfg("", ["MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "dgaf"])
    assert (cfg.MODEL.SELECTION.NAME, cfg.MODEL.FUSION.NAME) == ("sdtps", "dgaf")
    with pytest.raises(ConfigError, match=r"MODEL.FUSION.NAME = 'dgfa' is not one of none, .*dgaf"):
        build_cfg("", ["MODEL.FUSION.NAME", "dgfa"])
    with pytest.raises(ConfigError, match="MODEL.SELECTION.NAME sdtps needs a fusion"):
        build_cfg("", ["MODEL.SELECTION.NAME", "sdtps"])
    with pytest.raises(ConfigError, match=r"MODEL.SDTPS.SPARSE_RATIO: .*\(0, 1\]"):
        build_cfg("", ["MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "mean",
                       "MODEL.SDTPS.SPARSE_RATIO", "1.5"])
    with pytest.raises(ConfigError, match=r"MODEL.DGAF.INIT_ALPHA: .*\(0, 1\)"):
        build_cfg("", ["MODEL.FUSION.NAME", "dgaf", "MODEL.DGAF.INIT_ALPHA", "1.0"])
    # options of a module that is not selected are not its business
    assert build_cfg("", ["MODEL.DGAF.INIT_ALPHA", "1.0"]).MODEL.FUSION.NAME == "none"
    with pytest.raises(ConfigError, match="DATASETS.NAMES = 'RGBNT20' is not one of"):
        build_cfg("", ["DATASETS.NAMES", "RGBNT20"])
    assert build_cfg("", ["DATASETS.NAMES", "rgbnt201"]).DATASETS.NAMES == "rgbnt201"  # any case


def test_keys_of_earlier_versions_name_their_replacement(tmp_path):
    """An old config fails with one line saying what to write instead (not "unknown key")."""
    with pytest.raises(ConfigError, match="MODEL.SDTPS.ENABLED was replaced by MODEL.SELECTION.NAME sdtps"):
        build_cfg("", ["MODEL.SDTPS.ENABLED", "True"])
    path = tmp_path / "old.yml"
    path.write_text("MODEL:\n  DGAF:\n    ENABLED: True\n")
    with pytest.raises(ConfigError, match="old.yml: MODEL.DGAF.ENABLED was replaced by MODEL.FUSION.NAME dgaf"):
        build_cfg(str(path))
    with pytest.raises(ConfigError, match="MODEL.FUSION.LOSS_WEIGHT"):
        build_cfg("", ["MODEL.SDTPS.LOSS_WEIGHT", "2.0"])


def test_gate_norm_choices_and_legacy_booleans(tmp_path):
    """GATE_NORM is none | patches | heads; the earlier False / True still mean none / patches, in
    a file and on the command line (catches old configs and grids breaking)."""
    assert build_cfg("", ["MODEL.SDTPS.GATE_NORM", "heads"]).MODEL.SDTPS.GATE_NORM == "heads"
    assert build_cfg("", ["MODEL.SDTPS.GATE_NORM", "True"]).MODEL.SDTPS.GATE_NORM == "patches"
    assert build_cfg("", ["MODEL.SDTPS.GATE_NORM", "False"]).MODEL.SDTPS.GATE_NORM == "none"
    path = tmp_path / "old.yml"
    path.write_text("MODEL:\n  SDTPS:\n    GATE_NORM: True\n")
    assert build_cfg(str(path)).MODEL.SDTPS.GATE_NORM == "patches"


def test_retrieval_features_need_their_heads():
    with pytest.raises(ConfigError, match="TEST.REPORT_FEATS fused needs the 'fused' head.*MODEL.FUSION.NAME"):
        build_cfg("", ["TEST.REPORT_FEATS", "['ori', 'fused']"])
    with pytest.raises(ConfigError, match="TEST.FEAT hdm needs the 'hdm' head.*MODEL.HDM.ENABLED"):
        build_cfg("", ["TEST.FEAT", "hdm"])
    with pytest.raises(ConfigError, match="TEST.FEAT hdm .*with ATMoE the head is moe"):
        build_cfg("", ["TEST.FEAT", "hdm", "MODEL.HDM.ENABLED", "True", "MODEL.ATMOE.ENABLED", "True"])
    assert build_cfg("", ["TEST.FEAT", "fused", "MODEL.FUSION.NAME", "mean"]).TEST.FEAT == "fused"
    with pytest.raises(ConfigError, match="INPUT.RE_AREA"):
        build_cfg("", ["INPUT.RE_AREA", "[0.4, 0.2]"])


def test_odd_number_of_opts():
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        build_cfg("", ["SOLVER.MAX_EPOCHS"])


def test_enumerated_values_are_checked():
    with pytest.raises(ConfigError, match="TEST.FEAT"):
        build_cfg("", ["TEST.FEAT", "everything"])
    with pytest.raises(ConfigError, match="SOLVER.AMP"):
        build_cfg("", ["SOLVER.AMP", "fp8"])


def test_batch_must_be_multiple_of_instances():
    with pytest.raises(ConfigError, match="IMS_PER_BATCH"):
        build_cfg("", ["SOLVER.IMS_PER_BATCH", "30", "DATALOADER.NUM_INSTANCE", "8"])


def test_missing_config_file_names_path():
    with pytest.raises(FileNotFoundError, match="nowhere.yml"):
        build_cfg("configs/nowhere.yml")


def test_base_inheritance_and_override_order(tmp_path):
    (tmp_path / "base.yml").write_text("SOLVER:\n  MAX_EPOCHS: 7\n  SEED: 3\n")
    (tmp_path / "child.yml").write_text("_BASE_: base.yml\nSOLVER:\n  SEED: 5\n")
    cfg = build_cfg(str(tmp_path / "child.yml"), ["SOLVER.SEED", "9"])
    assert cfg.SOLVER.MAX_EPOCHS == 7 and cfg.SOLVER.SEED == 9
    assert cfg.is_frozen()


def test_init_scale_bias_override_file_and_opts(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("MODEL:\n  SDTPS:\n    GATE_INIT_SCALE: 1.0\n")
    parser = default_argument_parser()
    args = parser.parse_args(["--config_file", str(path), "--init_scale", "0.3", "--init_bias", "0.7",
                              "MODEL.SDTPS.GATE_INIT_BIAS", "0.1"])
    cfg = cfg_from_args(args)
    assert cfg.MODEL.SDTPS.GATE_INIT_SCALE == pytest.approx(0.3)
    assert cfg.MODEL.SDTPS.GATE_INIT_BIAS == pytest.approx(0.7)
    dumped = yaml.safe_load(cfg.dump())
    assert dumped["MODEL"]["SDTPS"]["GATE_INIT_SCALE"] == pytest.approx(0.3)


def test_help_lists_init_flags(capsys):
    with pytest.raises(SystemExit):
        default_argument_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--init_scale" in out and "--init_bias" in out and "--resume" in out
    with pytest.raises(SystemExit):  # evaluation has no use for them
        default_argument_parser(training=False).parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--init_scale" not in out and "--resume" not in out and "--overwrite" not in out


def test_defaults_are_not_shared():
    a = get_cfg_defaults()
    a.SOLVER.SEED = 42
    assert get_cfg_defaults().SOLVER.SEED != 42


@pytest.mark.parametrize("path", RUN_CONFIGS)
def test_shipped_configs_load(path):
    """Every shipped config builds, and the model has what the file (or its _BASE_ chain, else
    the default) says: heads, PIFE / HDM / ATMoE, selection and fusion modules and their head
    counts, feature width, loss weights (catches MODEL.FUSION.LOSS_WEIGHT or the ID / triplet
    weights not reaching the objective, a module built or left out against the file)."""
    import os

    from modeling.model import head_names
    from modeling.model_size import build_on_meta
    from modeling.registry import FUSION_REGISTRY, SELECTION_REGISTRY

    def file_value(file, key):
        with open(file) as f:
            content = yaml.safe_load(f) or {}
        node = content
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
        if content.get("_BASE_"):
            return file_value(os.path.join(os.path.dirname(file), content["_BASE_"]), key)
        node = get_cfg_defaults()
        for part in key.split("."):
            node = node[part]
        return node

    def value(key):
        return file_value(path, key)

    cfg = build_cfg(path, ["MODEL.PRETRAIN_PATH", ""])
    model = build_on_meta(cfg, 10, 4)
    hdm, atmoe = value("MODEL.HDM.ENABLED"), value("MODEL.ATMOE.ENABLED")
    selection, fusion = value("MODEL.SELECTION.NAME"), value("MODEL.FUSION.NAME")
    heads = ["ori"] if value("MODEL.DIRECT") else ["ori_rgb", "ori_ni", "ori_ti"]
    heads += (["moe" if atmoe else "hdm"] if hdm else []) + (["fused"] if fusion != "none" else [])
    assert tuple(model.heads) == head_names(cfg) == tuple(heads)
    assert (model.pife is not None, model.hdm is not None, model.atmoe is not None) == (
        value("MODEL.PIFE.ENABLED"), hdm, atmoe)

    dim = model.backbone.out_dim
    if value("MODEL.PROJ_DIM") > 0:
        assert dim == value("MODEL.PROJ_DIM")
    widths = {"ori": 3 * dim, "hdm": 7 * dim, "moe": 7 * dim, "fused": 3 * dim}
    for name, head in model.heads.items():
        width = widths.get(name, dim)
        assert (head.bn.num_features, head.classifier.out_features) == (width, 10), name
        assert sum(p.numel() for p in head.parameters()) == 2 * width + 10 * width, name

    if selection == "none":
        assert model.selection is None
    else:
        assert isinstance(model.selection, SELECTION_REGISTRY.get(selection))
    if selection == "sdtps":
        assert model.selection.num_heads == value("MODEL.SDTPS.NUM_HEADS")
        assert model.selection.sparse_ratio == value("MODEL.SDTPS.SPARSE_RATIO")
    if fusion == "none":
        assert model.fusion is None
    else:
        assert isinstance(model.fusion, FUSION_REGISTRY.get(fusion))
    if fusion == "dgaf":
        assert model.fusion.num_heads == value("MODEL.DGAF.NUM_HEADS")

    fused_weight = value("MODEL.FUSION.LOSS_WEIGHT")
    assert model.loss_weights == {h: (fused_weight if h == "fused" else 1.0) for h in heads}
    assert list(model.objectives) == list(value("MODEL.LOSSES"))
    if "reid" in model.objectives:
        reid = model.objectives["reid"]
        assert reid.head_weights == model.loss_weights
        assert (reid.id_weight, reid.triplet_weight) == (value("MODEL.ID_LOSS_WEIGHT"),
                                                         value("MODEL.TRIPLET_LOSS_WEIGHT"))
        assert reid.id_loss.epsilon == value("MODEL.LABEL_SMOOTH")
        assert reid.triplet_loss.soft_margin == value("MODEL.TRIPLET_SOFT_MARGIN")
