"""Tab completion as a bash user installs it: ``eval "$(scaling -sc install=bash)"``."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def complete(line: str) -> list[str]:
    words = line.split() + ([""] if line.endswith(" ") else [])
    script = ('eval "$(scaling -sc install=bash)" && COMP_LINE="$1" && COMP_POINT=${#COMP_LINE} && '
              'COMP_WORDS=($1) && COMP_CWORD=' + str(len(words) - 1) + ' && hydra_bash_completion && '
              'printf "%s\\n" "${COMPREPLY[@]}" && complete -p scaling')
    proc = subprocess.run(["bash", "-c", script, "bash", line], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    *replies, rule = proc.stdout.strip().splitlines()
    assert rule.endswith("-F hydra_bash_completion scaling")  # the rule is for `scaling`, not `scaling run`
    return replies


@pytest.mark.skipif(shutil.which("scaling") is None, reason="the scaling command is not installed")
def test_bash_completion_completes_verbs_groups_and_options():
    assert complete("scaling sw") == ["sweep"]
    assert complete("scaling run backend=tf_") == ["backend=tf_mirrored", "backend=tf_multiworker",
                                                   "backend=tf_reference", "backend=tf_textbook"]
    assert "experiment=seed_claim" in complete("scaling sweep experiment=")
