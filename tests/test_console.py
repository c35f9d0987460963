"""What reaches the console: a sweep's cells show the study's own lines; their logs keep all."""
import io
import subprocess
import sys
from types import SimpleNamespace


def pump(lines, echo_all, capsys):
    from scaling.launch.local import _Proc, _pump

    proc = _Proc(SimpleNamespace(stdout=io.StringIO("".join(lines))))
    log = io.StringIO()
    _pump(proc, log, echo_all)
    return log.getvalue(), capsys.readouterr().err, list(proc.tail)


BANNERS = ["GPU available: False, used: False\n", "TPU available: False, using: 0 TPU cores\n",
           "scaling: W&B offline run /r/wandb/offline-run-1 (upload: wandb sync /r/wandb/offline-run-1)\n",
           "I0000 00:00:1764200000.000000 cpu_feature_guard.cc:210] This TensorFlow binary is optimized\n",
           "scaling: W&B: could not start an online run (timeout); logging offline\n",
           "WARNING:torch.distributed.run:Setting OMP_NUM_THREADS environment variable for each process\n"]


def test_a_sweep_cell_shows_only_the_study_lines_and_logs_everything(capsys):
    log, console, tail = pump(BANNERS, echo_all=False, capsys=capsys)
    assert log == "".join(BANNERS)
    assert console == "scaling: W&B: could not start an online run (timeout); logging offline\n"
    assert tail == [line.rstrip("\n") for line in BANNERS]  # a failure still quotes the last lines


def test_a_single_run_shows_everything(capsys):
    _, console, _ = pump(BANNERS, echo_all=True, capsys=capsys)
    assert console == "".join(BANNERS)


def test_hydra_keeps_its_job_lines_off_the_console(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scaling", "run", "--cfg", "hydra", "-p", "hydra.hydra_logging.root"],
                          capture_output=True, text=True, timeout=120)
    assert "level: WARN" in proc.stdout, proc.stderr[-2000:]
