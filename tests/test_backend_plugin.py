"""A backend is a module and a YAML, nothing else: one added from a temporary folder (its module on
PYTHONPATH, its YAML on Hydra's search path) runs as a 2-worker local cell with no file of the
project touched, built from its YAML's arguments and launched by its ``runs_on`` facts."""
import textwrap

import pytest
from conftest import run_plugin_cell


pytestmark = pytest.mark.multiprocess

MODULE = '''
"""DDP written from the shared pieces only (a backend from outside the package)."""
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling.backends import RunContext, check_one_per_device, rank_seed
from scaling.backends import torch_common as tc


class PluginDDP(tc.DrivenSteps):
    def __init__(self, ctx: RunContext, process_group: str = "auto", marker: str = "") -> None:
        self.place(ctx)
        check_one_per_device("plugin_ddp", self.world, ctx.geometry.devices)
        self.marker = marker
        self.group = tc.init_process_group(self.device, self.rank, self.world, process_group)
        torch.manual_seed(ctx.seed)
        self.load_resident()
        self.model = DDP(self.build_model())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=ctx.geometry.lr_at(0))
        torch.manual_seed(rank_seed(ctx.seed, self.rank))
        self.steps = tc.ShardedSteps(self.model, self.optimizer, self.x, self.y, ctx.geometry, ctx.seed, self.rank)

    @property
    def digest_model(self) -> torch.nn.Module:
        return self.model.module

    def environment(self) -> dict:
        return {**tc.environment(self.device), "process_group": self.group, "plugin_marker": self.marker}

    def close(self) -> None:
        torch.distributed.destroy_process_group()
'''

YAML = '''
_target_: plugin_backend.PluginDDP
name: plugin_ddp
process_group: gloo
marker: from-the-yaml
runs_on:
  framework: torch
  launcher: torchrun
'''


def test_a_backend_from_a_module_and_a_yaml_runs_a_two_worker_cell(tmp_path, mnist_cache):
    pytest.importorskip("torch")
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "plugin_backend.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "conf" / "backend").mkdir(parents=True)
    (tmp_path / "conf" / "backend" / "plugin_ddp.yaml").write_text(textwrap.dedent(YAML))
    _, rec = run_plugin_cell(tmp_path / "plugin", tmp_path / "conf", tmp_path / "results", "backend=plugin_ddp",
                             "devices=2", "train.epochs=2", "train.max_steps_per_epoch=15", "protocol.warmup_steps=5")
    # built from the YAML's arguments, launched as its runs_on says (torchrun: one process per device)
    assert rec["environment"]["plugin_marker"] == "from-the-yaml" and rec["environment"]["process_group"] == "gloo"
    assert rec["config"]["backend"]["runs_on"] == {"framework": "torch", "launcher": "torchrun"}
    m = rec["metrics"]
    assert m["devices"] == 2 and m["steps"] == 30 and len(m["test_accuracy_per_epoch"]) == 2
    digests = [d for r in rec["ranks"] for d in r["param_digests"]]
    assert len(digests) == 2 and len(set(digests)) == 1 and m["ranks_in_sync"] is True, rec["ranks"]
    assert m["test_accuracy_per_epoch"][-1] > 0.5  # and it learned
