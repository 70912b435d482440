"""Complete plug-ins: keys a registered part declares (``add_config``), IMPORTS saved as absolute
paths, the interface checked when a part is built, nearest-name suggestions. Through the real
commands in subprocesses, with docs/examples/max_fusion.py and three broken fusions."""
import os
import subprocess
import sys

import pytest
import yaml

from config import ConfigError, build_cfg
from conftest import ROOT, TINY_OPTS

EXAMPLE = os.path.join(ROOT, "docs", "examples", "max_fusion.py")
FUSION_YAML = "MODEL:\n  SELECTION:\n    NAME: sdtps\n  FUSION:\n    NAME: {name}\n"


def _run(script, args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, script)] + list(args), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _one_error(proc):
    """The single ``error:`` line of a failed command (exit 1, no traceback on the console)."""
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory, synthetic_root):
    """A 1-epoch run of docs/examples/max_fusion.py with its declared MODEL.FUSION.MAX_TEMP set
    on the command line, the config naming the example by a path relative to the repository."""
    tmp = tmp_path_factory.mktemp("plugin_run")
    config = tmp / "user.yml"
    config.write_text("IMPORTS: [docs/examples/max_fusion.py]\n" + FUSION_YAML.format(name="max"))
    out = tmp / "out"
    proc = _run("train_net.py", ["--config_file", str(config)] + TINY_OPTS + [
        "DATASETS.ROOT_DIR", synthetic_root, "SOLVER.MAX_EPOCHS", "1", "OUTPUT_DIR", str(out),
        "MODEL.FUSION.MAX_TEMP", "0.5", "TEST.FEAT", "concat"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_declared_option_is_set_from_the_cli_saved_and_reaches_the_module(plugin_run):
    """MODEL.FUSION.MAX_TEMP (declared by the example, not in config/defaults.py) is set from the
    command line, saved in config.yaml with IMPORTS as an absolute path, and given to the module
    (catches: IMPORTS imported after the file is merged, so the key is unknown; the key saved but
    not passed to from_config; a relative IMPORTS path that breaks elsewhere)."""
    with open(plugin_run / "config.yaml") as f:
        saved = yaml.safe_load(f)
    assert saved["MODEL"]["FUSION"]["MAX_TEMP"] == 0.5
    assert saved["IMPORTS"] == [EXAMPLE]
    cfg = build_cfg(str(plugin_run / "config.yaml"))
    from modeling.registry import FUSION_REGISTRY

    assert FUSION_REGISTRY.get("max").from_config(cfg, 8).temp == 0.5
    assert build_cfg("", ["IMPORTS", f"['{EXAMPLE}']"]).MODEL.FUSION.MAX_TEMP == 0.0  # the default


def test_declared_option_is_validated_like_a_built_in_key(tmp_path):
    """A wrong type or a refused value of the declared key fails naming it (catches: plug-in
    keys merged without yacs' type check or without the part's check_config)."""
    with pytest.raises(ConfigError, match="MODEL.FUSION.MAX_TEMP"):
        build_cfg("", ["IMPORTS", f"['{EXAMPLE}']", "MODEL.FUSION.MAX_TEMP", "warm"])
    with pytest.raises(ConfigError, match="MODEL.FUSION.MAX_TEMP must be >= 0"):
        build_cfg("", ["IMPORTS", f"['{EXAMPLE}']", "MODEL.SELECTION.NAME", "sdtps",
                       "MODEL.FUSION.NAME", "max", "MODEL.FUSION.MAX_TEMP", "-1.0"])
    fresh = subprocess.run([sys.executable, "-c", "from config import build_cfg; "
                            "build_cfg('', ['MODEL.FUSION.MAX_TEMP', '0.5'])"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "unknown config key: MODEL.FUSION.MAX_TEMP" in fresh.stderr  # not declared without the import


def test_a_config_without_the_import_has_none_of_its_keys():
    """The plug-in's keys belong to the configs that import it, also after another config of the
    same process imported it (catches: every imported part's hook run for every config, so a
    config's keys, its saved config.yaml and the run identity of tools/ablate.py would depend on
    what the process imported before)."""
    assert "MAX_TEMP" in build_cfg("", ["IMPORTS", f"['{EXAMPLE}']"]).MODEL.FUSION
    assert "MAX_TEMP" not in build_cfg("").MODEL.FUSION
    with pytest.raises(ConfigError, match="unknown config key: MODEL.FUSION.MAX_TEMP"):
        build_cfg("", ["MODEL.FUSION.MAX_TEMP", "0.5"])


def test_test_net_from_another_directory_with_the_saved_config(plugin_run, tmp_path):
    """``test_net.py --config_file OUTPUT_DIR/config.yaml`` run from another folder imports the
    plug-in and evaluates the checkpoint (catches: IMPORTS saved relative to the repository)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _run("test_net.py", ["--config_file", str(plugin_run / "config.yaml"),
                                "TEST.WEIGHT", str(plugin_run / "checkpoint_epoch1.pth"),
                                "OUTPUT_DIR", str(tmp_path / "eval")], cwd=str(elsewhere))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "eval" / "test_results.json").is_file()


BROKEN = {
    "no_from_config": ("class Fusion(nn.Module):\n"
                       "    def __init__(self, dim):\n        super().__init__()\n        self.out_dim = 3 * dim\n"
                       "    def forward(self, patches, weights):\n        return patches.mean(2).flatten(1)\n",
                       "has no from_config"),
    "bad_out_dim": ("class Fusion(nn.Module):\n"
                    "    def __init__(self, dim):\n        super().__init__()\n        self.out_dim = 1.5 * dim\n"
                    "    @classmethod\n    def from_config(cls, cfg, dim):\n        return cls(dim)\n"
                    "    def forward(self, patches, weights):\n        return patches.mean(2).flatten(1)\n",
                    "out_dim must be a positive int"),
    "bad_width": ("class Fusion(nn.Module):\n"
                  "    def __init__(self, dim):\n        super().__init__()\n        self.out_dim = 3 * dim\n"
                  "    @classmethod\n    def from_config(cls, cfg, dim):\n        return cls(dim)\n"
                  "    def forward(self, patches, weights):\n        return patches.mean(2)  # (B, 3, C)\n",
                  "must return (B, out_dim)"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_plugin_fails_with_one_line_naming_it(name, tmp_path, synthetic_root):
    """A fusion without from_config, with a non-int out_dim, or whose output is not (B, out_dim)
    stops train_net.py with one line naming the entry, its file and the rule (catches: an
    AttributeError deep in the model, a shape error in the fused head's BatchNorm mid-training)."""
    body, rule = BROKEN[name]
    plugin = tmp_path / f"{name}.py"
    plugin.write_text("import torch.nn as nn\nfrom modeling.registry import FUSION_REGISTRY\n\n\n"
                      f"@FUSION_REGISTRY.register({name!r})\n" + body)
    config = tmp_path / "user.yml"
    config.write_text(f"IMPORTS: [{plugin}]\n" + FUSION_YAML.format(name=name))
    proc = _run("train_net.py", ["--config_file", str(config)] + TINY_OPTS + [
        "DATASETS.ROOT_DIR", synthetic_root, "OUTPUT_DIR", str(tmp_path / "out")])
    line = _one_error(proc)
    assert f"fusion '{name}' ({plugin})" in line and rule in line, line


def test_registry_names_suggest_the_nearest(tmp_path):
    """A misspelt part name suggests the registered one (catches: a bare list of names)."""
    with pytest.raises(ConfigError, match=r"did you mean 'dgaf'\?"):
        build_cfg("", ["MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "dgfa"])


def test_add_config_may_not_change_an_existing_key(tmp_path):
    """A hook that overwrites a built-in key fails naming the part (catches: a plug-in silently
    changing every run's defaults)."""
    plugin = tmp_path / "greedy_fusion.py"
    plugin.write_text("from modeling.fusion import MeanFusion\nfrom modeling.registry import FUSION_REGISTRY\n\n\n"
                      "@FUSION_REGISTRY.register('greedy')\nclass Greedy(MeanFusion):\n"
                      "    @staticmethod\n    def add_config(cfg):\n        cfg.MODEL.FUSION.LOSS_WEIGHT = 9.0\n")
    with pytest.raises(ConfigError, match=r"fusion 'greedy' .*changed the existing key\(s\) MODEL.FUSION.LOSS_WEIGHT"):
        build_cfg("", ["IMPORTS", f"['{plugin}']"])
    assert build_cfg("").MODEL.FUSION.LOSS_WEIGHT != 9.0  # a config without it is untouched
