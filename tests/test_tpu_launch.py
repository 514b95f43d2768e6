"""Cloud TPU launch scripts (issue 19): the commands a dry run prints, the
resume path after a preemption, the job command's shell logic run for real
against a fake `gcloud`, and clear errors for bad input. No cloud here."""

import os
import subprocess
import sys
import textwrap

import pytest

from seqdec.cloud import tpu as T
from seqdec.errors import ConfigError

V5E = T.TpuSlice(name="sd-v5e", accelerator="v5litepod-8", zone="us-west4-a",
                 project="proj")
V4 = T.TpuSlice(name="sd-v4", accelerator="v4-32", zone="us-central2-b",
                project="proj", spot=False)
TRAIN = ["launch/train_drafter.py", "--config=configs/drafters/eagle.py",
         "--workdir=gs://bucket/eagle"]


def test_slice_shapes():
  assert (V5E.chips, V5E.hosts, V5E.runtime) == (8, 1, "v2-alpha-tpuv5-lite")
  assert (V4.chips, V4.hosts, V4.runtime) == (16, 4, "tpu-ubuntu2204-base")
  assert T.TpuSlice("a", "v5litepod-16", "us-west4-a", "p").hosts == 4


def _launch(tpu, source, preemptions=0, **kw):
  lines = []
  shell = T.DryRun(preemptions, out=lines.append)
  code = T.Launcher(tpu, source, shell, **kw).launch(TRAIN[0], TRAIN[1:])
  return code, lines, shell.commands


def _kinds(commands):
  """Each command as a short name, in order."""
  out = []
  for c in commands:
    if c[:4] == ["gcloud", "compute", "tpus", "queued-resources"]:
      out.append(c[4])
    elif c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]:
      out.append("job" if T.is_job(c) else "ssh")
    elif c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]:
      out.append("scp")
    else:
      out.append(c[0])
  return out


def test_v5e_launch_dry_run_prints_the_lifecycle():
  code, lines, commands = _launch(
      V5E, T.Source.git("https://github.com/me/seqdec", "a1b2c3d"))
  assert code == 0
  assert _kinds(commands) == ["create", "describe", "ssh", "job", "mkdir",
                              "scp", "delete"]
  assert lines[0] == (
      "gcloud compute tpus queued-resources create sd-v5e-qr "
      "--node-id=sd-v5e --project=proj --zone=us-west4-a "
      "--accelerator-type=v5litepod-8 --runtime-version=v2-alpha-tpuv5-lite "
      "--spot")
  setup = commands[2][-1]
  assert "--worker=all" in commands[2]
  assert "git checkout --quiet a1b2c3d" in setup
  assert "launch/tpu/install.sh" in setup
  job = commands[3]
  assert "--worker=0" in job
  assert "gcloud storage rsync --recursive gs://bucket/eagle" in job[-1]
  assert commands[-1][-2:] == ["--force", "--quiet"]


def test_preempted_job_is_resumed_on_a_new_slice():
  code, lines, commands = _launch(V4, T.Source.local(), preemptions=2,
                                  keep=True)
  assert code == 0
  one_setup = ["git", "scp", "ssh"]
  start = ["create", "describe"] + one_setup
  # Each preemption: the job fails, the state is read (SUSPENDED), the
  # slice is deleted and requested again, reinstalled, and the same job
  # command reruns (it resumes from the workdir's checkpoint).
  again = ["job", "describe", "delete"] + start
  assert _kinds(commands) == (start + again + again + ["job", "mkdir", "scp"])
  jobs = [c for c in commands if T.is_job(c)]
  assert len(jobs) == 3 and jobs[0] == jobs[1] == jobs[2]
  assert sum("preempted (SUSPENDED)" in ln for ln in lines) == 2
  assert "--spot" not in commands[0]


def test_too_many_preemptions_give_up():
  with pytest.raises(T.LaunchError, match="preempted 2 times"):
    _launch(V5E, T.Source.local(), preemptions=5, max_restarts=1)


def test_bad_input_gets_a_clear_error():
  with pytest.raises(ConfigError, match="v4 comes in sizes"):
    T.TpuSlice("a", "v4-33", "us-central2-b", "p")
  with pytest.raises(ConfigError, match="unknown accelerator type 'h100-8'"):
    T.TpuSlice("a", "h100-8", "us-central2-b", "p")
  with pytest.raises(ConfigError, match="zone 'us-west4-a' does not offer "
                                        "v4.*us-central2-b"):
    T.TpuSlice("a", "v4-8", "us-west4-a", "p")
  assert T.TpuSlice("a", "v4-8", "us-west9-z", "p", allow_any_zone=True)
  with pytest.raises(ConfigError, match="needs --workdir=gs://"):
    T.check_resumable("launch/train.py", ["--workdir=/tmp/x"])
  with pytest.raises(ConfigError, match="host indices 0..3 of v4-32"):
    T.run_command(V4, "launch/decode.py", [], "x", workers="4")
  with pytest.raises(ConfigError, match="unknown source"):
    T.Source.parse("svn:foo")


FAKE_GCLOUD = textwrap.dedent("""\
    #!/usr/bin/env bash
    # gcloud storage rsync --recursive SRC DST, with gs://X = $FAKE_GCS/X
    [ "$1 $2 $3" = "storage rsync --recursive" ] || exit 2
    src=${4/gs:\\/\\//$FAKE_GCS/}; dst=${5/gs:\\/\\//$FAKE_GCS/}
    [ -d "$src" ] || exit 1
    mkdir -p "$dst" && cp -r "$src/." "$dst/"
    """)
FAKE_JOB = textwrap.dedent("""\
    #!/usr/bin/env bash
    # script --workdir=DIR: counts its runs in DIR/ckpt, exits $JOB_EXIT
    dir=${2#--workdir=}
    n=$(cat "$dir/ckpt" 2>/dev/null || echo 0)
    echo $((n + 1)) > "$dir/ckpt"; echo "run $((n + 1))"
    exit $JOB_EXIT
    """)


@pytest.mark.parametrize("job_exit", [pytest.param(0, marks=pytest.mark.slow),
                                      3])
def test_job_command_mirrors_a_gs_workdir(tmp_path, job_exit):
  """The ssh command's bash, run here: the workdir is restored from the
  bucket, the job sees a local directory, its files reach the bucket, and
  the exit status is the job's."""
  home, gcs, bin_dir = tmp_path / "home", tmp_path / "gcs", tmp_path / "bin"
  (home / "seqdec" / ".venv" / "bin").mkdir(parents=True)
  bin_dir.mkdir()
  for path, text in ((bin_dir / "gcloud", FAKE_GCLOUD),
                     (home / "seqdec" / ".venv" / "bin" / "python", FAKE_JOB)):
    path.write_text(text)
    path.chmod(0o755)
  (gcs / "bucket" / "run").mkdir(parents=True)
  (gcs / "bucket" / "run" / "ckpt").write_text("41\n")   # an earlier run's
  argv = T.run_command(V5E, "launch/train.py", ["--workdir=gs://bucket/run"],
                       "train")
  command = argv[-1].removeprefix("--command=")
  env = dict(os.environ, HOME=str(home), FAKE_GCS=str(gcs),
             JOB_EXIT=str(job_exit), PATH=f"{bin_dir}:{os.environ['PATH']}")
  done = subprocess.run(["bash", "-c", command], cwd=home, env=env,
                        capture_output=True, text=True, timeout=60)
  assert done.returncode == job_exit, done.stderr
  assert (gcs / "bucket" / "run" / "ckpt").read_text() == "42\n"
  assert "run 42" in (home / "seqdec-logs" / "train.log").read_text()


@pytest.mark.slow
def test_cli_dry_run_and_errors():
  cmd = [sys.executable, "launch/tpu/tpu.py", "launch", "--name=sd-v5e",
         "--accelerator=v5litepod-8", "--zone=us-west4-a", "--project=p",
         "--dry_run", "--simulate_preemptions=1", "--"] + TRAIN
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  out = done.stdout.splitlines()
  assert sum(ln.startswith("gcloud compute tpus queued-resources create")
             for ln in out) == 2
  bad = subprocess.run(cmd[:4] + ["--accelerator=v9-8"] + cmd[5:],
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith(
      "error: unknown accelerator type 'v9-8'")
