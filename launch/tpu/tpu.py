"""Cloud TPU: create a VM or pod slice, install seqdec, run a script, resume
after preemption, collect logs, delete. A thin CLI over `seqdec.cloud.tpu`.

  # v5e-8 (one host, 8 chips), spot, the whole lifecycle; --dry_run prints
  # the gcloud commands (--simulate_preemptions=1 adds the resume path):
  python launch/tpu/tpu.py launch --name=sd-v5e --accelerator=v5litepod-8 \\
      --zone=us-west4-a --project=my-project \\
      --source=git:https://github.com/me/seqdec@a1b2c3d --dry_run \\
      -- launch/train_drafter.py --config=configs/drafters/eagle.py \\
         --workdir=gs://my-bucket/eagle_smollm2

  # v4-32 (4 hosts x 4 chips), one step at a time:
  python launch/tpu/tpu.py create --name=sd-v4 --accelerator=v4-32 \\
      --zone=us-central2-b --project=my-project
  python launch/tpu/tpu.py setup  --name=sd-v4 ... --source=local
  python launch/tpu/tpu.py run    --name=sd-v4 ... -- launch/bench_spec.py
  python launch/tpu/tpu.py logs   --name=sd-v4 ... --run_name=bench_spec
  python launch/tpu/tpu.py delete --name=sd-v4 ...

Commands: create (queued resource, waits for ACTIVE), setup (install the
--source revision on every host), run, logs, state, delete, launch (all of
them, with resume after preemption). Everything after `--` is the script
and its arguments. Exit status: the job's (run, launch), 1 on a user error.
"""

from absl import app
from absl import flags

from seqdec import cli
from seqdec.cloud import tpu as tpu_lib
from seqdec.errors import ConfigError

COMMANDS = ("create", "setup", "run", "logs", "state", "delete", "launch")

_NAME = flags.DEFINE_string("name", None, "TPU node name.")
_ACCELERATOR = flags.DEFINE_string("accelerator", "v5litepod-8",
                                   "Accelerator type, e.g. v5litepod-8, v4-32.")
_ZONE = flags.DEFINE_string("zone", "us-west4-a", "Zone.")
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project.")
_SPOT = flags.DEFINE_bool("spot", True, "Spot (preemptible) capacity.")
_RUNTIME = flags.DEFINE_string("runtime_version", None,
                               "TPU VM image (default: by generation).")
_ANY_ZONE = flags.DEFINE_bool("allow_any_zone", False,
                              "Skip the documented-zone check.")
_SOURCE = flags.DEFINE_string(
    "source", "local", "'local' (this checkout's HEAD via git archive), "
    "'local@<rev>' or 'git:<url>@<rev>'.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands only.")
_SIMULATE = flags.DEFINE_integer(
    "simulate_preemptions", 0, "Dry run: the job's first N runs are "
    "preempted, to show the resume path.")
_MAX_RESTARTS = flags.DEFINE_integer("max_restarts", 3,
                                     "Preemptions survived (launch).")
_WORKERS = flags.DEFINE_string(
    "run_workers", "0", "Hosts that run the job: '0' (the trainers are "
    "single-process) or 'all' (launch/decode.py with --config.mesh).")
_RUN_NAME = flags.DEFINE_string("run_name", None,
                                "Log name (default: the script's).")
_LOG_DIR = flags.DEFINE_string("logs_to", "tpu-logs", "Local log directory.")
_KEEP = flags.DEFINE_bool("keep", False, "launch: keep the slice at the end.")


def make_launcher() -> tpu_lib.Launcher:
  if not _NAME.value:
    raise ConfigError("--name is required")
  tpu = tpu_lib.TpuSlice(
      name=_NAME.value, accelerator=_ACCELERATOR.value, zone=_ZONE.value,
      project=_PROJECT.value or "", spot=_SPOT.value,
      runtime_version=_RUNTIME.value, allow_any_zone=_ANY_ZONE.value)
  shell = (tpu_lib.DryRun(_SIMULATE.value) if _DRY_RUN.value
           else tpu_lib.Shell())
  return tpu_lib.Launcher(
      tpu=tpu, source=tpu_lib.Source.parse(_SOURCE.value), shell=shell,
      max_restarts=_MAX_RESTARTS.value, run_workers=_WORKERS.value,
      log_dir=_LOG_DIR.value, keep=_KEEP.value)


def run(command: str, job: list[str]) -> int:
  launcher = make_launcher()
  needs_job = command in ("run", "launch")
  if needs_job and not job:
    raise ConfigError(f"{command}: give the script after '--', e.g. "
                      f"-- launch/decode.py --config=configs/spec_decode.py")
  if job and not needs_job:
    raise ConfigError(f"{command} takes no script (got {job})")
  run_name = _RUN_NAME.value or (job[0].rsplit("/", 1)[-1].removesuffix(".py")
                                 if job else "run")
  if command == "launch":
    return launcher.launch(job[0], job[1:], run_name)
  if command == "create":
    launcher.create()
  elif command == "setup":
    launcher.setup()
  elif command == "run":
    tpu_lib.check_resumable(job[0], job[1:])
    code, _ = launcher.shell(tpu_lib.run_command(
        launcher.tpu, job[0], job[1:], run_name, _WORKERS.value))
    return code
  elif command == "logs":
    launcher.collect_logs(run_name)
  elif command == "state":
    print(launcher.state())
  elif command == "delete":
    launcher.delete()
  return 0


def main(argv):
  if len(argv) < 2 or argv[1] not in COMMANDS:
    cli.fail(f"expected a command, one of {', '.join(COMMANDS)} (got "
             f"{argv[1:2] or 'none'})")
  raise SystemExit(cli.run_reporting_user_errors(
      lambda: run(argv[1], list(argv[2:]))))


if __name__ == "__main__":
  app.run(main)
