"""A workload and a dataset are each a module and a YAML, as a backend is: a network (its YAML's
``build.torch``) and a dataset function (its YAML's ``_target_``) added from a temporary folder
(modules on PYTHONPATH, YAMLs on Hydra's search path) train as a cell of an existing backend with
no file of the project touched; the record carries the parameter count of the model it built."""
import textwrap

import pytest
from conftest import run_plugin_cell



WORKLOAD = '''
"""A two-layer network of any width (a workload from outside the package)."""
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.body(x), dim=1)
'''

DATASET = '''
"""Ten bright stripes, one per class, in seeded noise (a dataset from outside the package)."""
import numpy as np

from scaling.data import Dataset


def stripes(name: str, size: int, seed: int = 0, log=print) -> Dataset:
    rng = np.random.default_rng(seed)

    def split(n):
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        x = rng.integers(0, 64, size=(n, 28, 28), dtype=np.uint8)
        for label in range(10):
            x[y == label, 2 + 2 * label, :] = 255
        return x, y

    (train_x, train_y), (test_x, test_y) = split(size), split(size // 4)
    log(f"[data] {name}: {size} generated images")
    return Dataset(name=name, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, num_classes=10,
                   source=f"stripes (seed={seed})")
'''

WORKLOAD_YAML = '''
name: tiny
width: 16
build:
  torch: {_target_: plugin_workload.TinyNet}
'''

DATA_YAML = '''
_target_: plugin_data.stripes
name: stripes
size: 2048
'''


@pytest.mark.multiprocess
def test_a_workload_and_a_dataset_from_modules_and_yamls_train_a_cell(tmp_path):
    pytest.importorskip("torch")
    plugin, conf = tmp_path / "plugin", tmp_path / "conf"
    plugin.mkdir()
    (plugin / "plugin_workload.py").write_text(textwrap.dedent(WORKLOAD))
    (plugin / "plugin_data.py").write_text(textwrap.dedent(DATASET))
    for group, text in (("workload", WORKLOAD_YAML), ("data", DATA_YAML)):
        (conf / group).mkdir(parents=True)
        (conf / group / f"plugin_{group}.yaml").write_text(textwrap.dedent(text))
    proc, rec = run_plugin_cell(plugin, conf, tmp_path / "results", "backend=torch", "workload=plugin_workload",
                                "data=plugin_data", "devices=1", "device=cpu", "train.epochs=2",
                                "train.max_steps_per_epoch=15", "protocol.warmup_steps=5", timeout=300)
    width = 16
    assert rec["config"]["workload"]["parameters"] == 28 * 28 * width + width + width * 10 + 10  # the model's count
    assert rec["config"]["workload"]["build"] == {"torch": {"_target_": "plugin_workload.TinyNet"}}
    assert rec["config"]["data"]["name"] == "stripes" and "[data] stripes: 2048 generated images" in proc.stderr
    m = rec["metrics"]
    assert m["steps"] == 30 and len(m["test_accuracy_per_epoch"]) == 2
    assert m["test_accuracy_per_epoch"][-1] > 0.5  # it learned the stripes


def test_a_target_that_cannot_be_found_is_a_config_error_naming_the_key():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from scaling.config import CONF_DIR, ConfigError, validate

    def cfg(*overrides):
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)

    with pytest.raises(ConfigError, match=r"workload.build.torch._target_='plugin_nowhere.Net'.*Fix: put the module"):
        validate(cfg("workload.build.torch._target_=plugin_nowhere.Net"))
    with pytest.raises(ConfigError, match=r"data._target_='plugin_nowhere.data'.*Fix: put the function's module"):
        validate(cfg("data._target_=plugin_nowhere.data"))
    with pytest.raises(ConfigError, match=r"workload=mlp names no build.tf._target_.*Fix: add build.tf"):
        validate(cfg("backend=tf", "~workload.build.tf"))
    validate(cfg("backend=tf", "workload=cnn", "data=synthetic"))  # the study's own, found without importing them
