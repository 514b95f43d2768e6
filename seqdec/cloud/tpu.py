"""Cloud TPU VMs and pod slices: the gcloud commands, and a launcher that
resumes a run after preemption.

    tpu = TpuSlice(name="sd-v5e", accelerator="v5litepod-8",
                   zone="us-west4-a", project="my-project")
    launcher = Launcher(tpu, source=Source.git(URL, "a1b2c3d"),
                        shell=DryRun())           # or Shell(): real gcloud
    launcher.launch("launch/train_drafter.py",
                    ["--config=configs/drafters/eagle.py",
                     "--workdir=gs://my-bucket/eagle"])

Everything is a list of argv commands built from a `TpuSlice`
(`create_commands`, `setup_commands`, `run_command`, `log_commands`,
`delete_command`): a dry run prints exactly what a real run executes. The
slice is requested as a *queued resource* (`gcloud compute tpus
queued-resources`), the way Cloud TPU hands out spot capacity and pod
slices; one `--worker=all` ssh runs a command on every host of a slice.

Preemption and resume (`Launcher.launch`): a spot slice can be taken back
at any time; its queued resource then reports SUSPENDED (or FAILED), and
the VMs' disks are gone. When the job's ssh session fails, the launcher
asks for the queued resource's state: on a preemption it deletes the
resource, requests it again, waits until ACTIVE, reinstalls the pinned
revision and reruns the *same* command, up to `max_restarts` times. The
job resumes where it stopped because seqdec's trainers restore the latest
orbax checkpoint of their `--workdir` (`seqdec.train.loop`): that workdir
must outlive the VM (a `gs://` path), which `launch` checks. A job that
fails while the slice stays ACTIVE is the job's own error: no restart.

Multi-host slices (v4-32: 4 hosts of 4 chips): setup runs on every host.
`launch/decode.py` joins the hosts' processes itself
(`seqdec.parallel.distributed`) and decodes on a `--config.mesh` over all
chips when run on every host (`run_workers='all'`); the trainers are
single-process, so by default a job runs on worker 0 only.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

from seqdec.errors import ConfigError

# Generations: runtime (software) version, sizes offered (the number after
# the dash: TensorCores on v4/v5p, chips on v5e/v6e), chips per size unit,
# chips per host in multi-host slices, and the zones Cloud TPU documents
# for them (cloud.google.com/tpu/docs/regions-zones, 2025). A zone added
# since is allowed with `allow_any_zone=True`.
GENERATIONS = {
    "v4": dict(runtime="tpu-ubuntu2204-base", chips_per_unit=0.5,
               sizes=(8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
               max_chips_one_host=4, zones=("us-central2-b",)),
    "v5litepod": dict(runtime="v2-alpha-tpuv5-lite", chips_per_unit=1,
                      sizes=(1, 4, 8, 16, 32, 64, 128, 256),
                      max_chips_one_host=8,
                      zones=("us-central1-a", "us-east1-c", "us-east5-a",
                             "us-east5-b", "us-south1-a", "us-west1-c",
                             "us-west4-a", "europe-west4-b",
                             "asia-southeast1-b")),
    "v5p": dict(runtime="v2-alpha-tpuv5", chips_per_unit=0.5,
                sizes=tuple(8 * 2 ** i for i in range(11)),
                max_chips_one_host=4,
                zones=("us-central1-a", "us-east5-a", "europe-west4-b")),
    "v6e": dict(runtime="v2-alpha-tpuv6e", chips_per_unit=1,
                sizes=(1, 4, 8, 16, 32, 64, 128, 256), max_chips_one_host=8,
                zones=("us-central1-b", "us-east1-d", "us-east5-a",
                       "us-east5-b", "us-south1-a", "europe-west4-a",
                       "asia-northeast1-b", "southamerica-west1-a")),
}
CHIPS_PER_HOST = 4          # hosts of a multi-host slice
# Queued-resource states (gcloud `state.state`).
ACTIVE = "ACTIVE"
PREEMPTED_STATES = ("SUSPENDED", "SUSPENDING", "FAILED", "PREEMPTED")
WAITING_STATES = ("ACCEPTED", "PROVISIONING", "WAITING_FOR_RESOURCES",
                  "CREATING")
LOG_DIR = "~/seqdec-logs"
WORK_DIR = "seqdec-work"     # under $HOME: mirrored gs:// workdirs
REPO_DIR = "seqdec"


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """One TPU VM or pod slice, requested as a queued resource.

  Attributes:
    name: the node id (lowercase letters, digits, dashes); the queued
      resource is `<name>-qr`.
    accelerator: '<generation>-<size>', e.g. 'v5litepod-8', 'v4-32'.
    zone, project: where.
    spot: spot (preemptible) capacity.
    runtime_version: the TPU VM image; default by generation.
    allow_any_zone: skip the documented-zone check.
  """
  name: str
  accelerator: str
  zone: str
  project: str
  spot: bool = True
  runtime_version: Optional[str] = None
  allow_any_zone: bool = False

  def __post_init__(self):
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?", self.name):
      raise ConfigError(f"TPU name {self.name!r}: lowercase letters, digits "
                        f"and dashes, starting with a letter")
    if not self.project:
      raise ConfigError("a Google Cloud project is required")
    gen, size = self._parse()
    info = GENERATIONS[gen]
    if size not in info["sizes"]:
      raise ConfigError(f"unknown accelerator type {self.accelerator!r}: "
                        f"{gen} comes in sizes {list(info['sizes'])}")
    if not self.allow_any_zone and self.zone not in info["zones"]:
      raise ConfigError(
          f"zone {self.zone!r} does not offer {gen} TPUs; documented zones: "
          f"{', '.join(info['zones'])} (allow_any_zone / --allow_any_zone "
          f"for a zone added since)")

  def _parse(self) -> tuple[str, int]:
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", self.accelerator)
    if not m or m.group(1) not in GENERATIONS:
      raise ConfigError(
          f"unknown accelerator type {self.accelerator!r}; expected "
          f"<generation>-<size> with generation one of {sorted(GENERATIONS)}")
    return m.group(1), int(m.group(2))

  @property
  def generation(self) -> str:
    return self._parse()[0]

  @property
  def chips(self) -> int:
    gen, size = self._parse()
    return int(size * GENERATIONS[gen]["chips_per_unit"])

  @property
  def hosts(self) -> int:
    """VMs in the slice: one up to the generation's single-host size,
    then one per 4 chips."""
    if self.chips <= GENERATIONS[self.generation]["max_chips_one_host"]:
      return 1
    return self.chips // CHIPS_PER_HOST

  @property
  def runtime(self) -> str:
    return self.runtime_version or GENERATIONS[self.generation]["runtime"]

  @property
  def queued_resource(self) -> str:
    return f"{self.name}-qr"

  def where(self) -> list[str]:
    return [f"--project={self.project}", f"--zone={self.zone}"]


@dataclasses.dataclass(frozen=True)
class Source:
  """What the VMs install: a git revision (`git`) or this checkout's
  committed tree (`local`, copied with `git archive` + scp)."""
  kind: str
  url: str = ""
  revision: str = "HEAD"

  @classmethod
  def git(cls, url: str, revision: str) -> "Source":
    if not url or not revision:
      raise ConfigError("a git source needs a URL and a pinned revision")
    return cls("git", url, revision)

  @classmethod
  def local(cls, revision: str = "HEAD") -> "Source":
    return cls("local", "", revision)

  @classmethod
  def parse(cls, text: str) -> "Source":
    """'local', 'local@<rev>' or 'git:<url>@<rev>'."""
    if text == "local" or text.startswith("local@"):
      return cls.local(text.partition("@")[2] or "HEAD")
    if text.startswith("git:") and "@" in text[4:]:
      url, _, rev = text[4:].rpartition("@")
      return cls.git(url, rev)
    raise ConfigError(f"unknown source {text!r}; expected 'local', "
                      f"'local@<revision>' or 'git:<url>@<revision>'")


# --- commands -----------------------------------------------------------------

def create_command(tpu: TpuSlice) -> list[str]:
  """Requests the slice as a queued resource (spot if `tpu.spot`)."""
  return (["gcloud", "compute", "tpus", "queued-resources", "create",
           tpu.queued_resource, f"--node-id={tpu.name}"] + tpu.where()
          + [f"--accelerator-type={tpu.accelerator}",
             f"--runtime-version={tpu.runtime}"]
          + (["--spot"] if tpu.spot else []))


def state_command(tpu: TpuSlice) -> list[str]:
  """Prints the queued resource's state (ACTIVE, SUSPENDED, ...)."""
  return (["gcloud", "compute", "tpus", "queued-resources", "describe",
           tpu.queued_resource] + tpu.where()
          + ["--format=value(state.state)"])


def delete_command(tpu: TpuSlice) -> list[str]:
  """Deletes the queued resource and its VMs."""
  return (["gcloud", "compute", "tpus", "queued-resources", "delete",
           tpu.queued_resource] + tpu.where() + ["--force", "--quiet"])


def ssh_command(tpu: TpuSlice, command: str, worker: str = "all"
                ) -> list[str]:
  """Runs a bash command on `worker` ('all', or a host index)."""
  return (["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu.name]
          + tpu.where() + [f"--worker={worker}", f"--command={command}"])


def setup_commands(tpu: TpuSlice, source: Source) -> list[list[str]]:
  """Installs seqdec on every host: the pinned revision, then
  `launch/tpu/install.sh` (Python 3.11 venv, requirements.txt +
  requirements-tpu.txt (jax[tpu]) + the weight packages)."""
  install = "launch/tpu/install.sh"
  if source.kind == "git":
    fetch = (f"set -e; [ -d {REPO_DIR} ] || git clone {shlex.quote(source.url)}"
             f" {REPO_DIR}; cd {REPO_DIR}; git fetch --quiet origin; "
             f"git checkout --quiet {shlex.quote(source.revision)}")
    return [ssh_command(tpu, f"{fetch}; {install}")]
  archive = f"/tmp/seqdec-{tpu.name}.tar.gz"
  return [
      ["git", "archive", "--format=tar.gz", f"--output={archive}",
       source.revision],
      (["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
        f"{tpu.name}:seqdec.tar.gz"] + tpu.where() + ["--worker=all"]),
      ssh_command(tpu, f"set -e; rm -rf {REPO_DIR}; mkdir {REPO_DIR}; "
                       f"tar -xzf seqdec.tar.gz -C {REPO_DIR}; cd {REPO_DIR}; "
                       f"{install}"),
  ]


def run_command(tpu: TpuSlice, script: str, args: Sequence[str],
                run_name: str, workers: str = "0",
                env: Optional[dict[str, str]] = None,
                sync_every: int = 300) -> list[str]:
  """Runs `python <script> <args>` in the installed checkout, its output
  appended to LOG_DIR/<run_name>.log on each host; the ssh session's exit
  status is the script's.

  A `--workdir=gs://...` argument is mirrored: the script gets a local
  directory (WORK_DIR/<run_name>), first restored from the bucket (empty
  on the first run), copied back every `sync_every` seconds while the job
  runs and once when it ends (`gcloud storage rsync`). A preempted job
  loses at most `sync_every` seconds of checkpoints; orbax writes each
  checkpoint to a temporary directory and renames it when complete, so a
  half-copied one is never restored as the latest. The sync loop writes to
  the log, not to the session, and is killed with its `sleep` (which would
  otherwise hold the ssh session open until it wakes).
  """
  check_workers(tpu, workers)
  bucket = workdir_of(args)
  local = f"$HOME/{WORK_DIR}/{run_name}"
  quoted = []
  for a in [script, *args]:
    if bucket and a == f"--workdir={bucket}":
      quoted.append(f'"--workdir={local}"')    # $HOME expands on the host
    else:
      quoted.append(shlex.quote(a))
  env_part = "".join(f"{k}={shlex.quote(v)} " for k, v in
                     sorted((env or {}).items()))
  log = f"{LOG_DIR}/{run_name}.log"
  job = (f"(cd {REPO_DIR} && {env_part}.venv/bin/python {' '.join(quoted)}) "
         f"2>&1 | tee -a {log}; rc=${{PIPESTATUS[0]}}")
  if not (bucket and bucket.startswith("gs://")):
    command = f"mkdir -p {LOG_DIR}; {job}; exit $rc"
  else:
    sync_up = f"gcloud storage rsync --recursive {local} {shlex.quote(bucket)}"
    command = (
        f"mkdir -p {LOG_DIR} {local}; "
        f"gcloud storage rsync --recursive {shlex.quote(bucket)} {local} "
        f"|| true; "
        f"(while sleep {int(sync_every)}; do {sync_up}; done) >>{log} 2>&1 "
        f"& sync=$!; {job}; pkill -P $sync; kill $sync; "
        f"{sync_up} || {{ [ $rc -ne 0 ] || rc=1; }}; exit $rc")
  return ssh_command(tpu, command, worker=workers)


def check_workers(tpu: TpuSlice, workers: str) -> list[int]:
  """The host indices of 'all' or '0,2'; a clear error for anything else."""
  if workers == "all":
    return list(range(tpu.hosts))
  try:
    hosts = [int(w) for w in workers.split(",")]
  except ValueError:
    hosts = [-1]
  if any(not 0 <= h < tpu.hosts for h in hosts):
    raise ConfigError(f"workers {workers!r}: expected 'all' or host indices "
                      f"0..{tpu.hosts - 1} of {tpu.accelerator}, "
                      f"comma-separated")
  return hosts


def workdir_of(args: Sequence[str]) -> Optional[str]:
  """The value of a `--workdir=` argument, or None."""
  return next((a.split("=", 1)[1] for a in args
               if a.startswith("--workdir=")), None)


def log_commands(tpu: TpuSlice, run_name: str, local_dir: str,
                 workers: str = "0") -> list[list[str]]:
  """Copies the log of each host that ran the job ('all' or a comma list
  of host indices) to <local_dir>/<run_name>/worker<i>.log."""
  hosts = check_workers(tpu, workers)
  return [["mkdir", "-p", f"{local_dir}/{run_name}"]] + [
      (["gcloud", "compute", "tpus", "tpu-vm", "scp",
        f"{tpu.name}:{LOG_DIR}/{run_name}.log",
        f"{local_dir}/{run_name}/worker{i}.log"] + tpu.where()
       + [f"--worker={i}"]) for i in hosts]


# --- executing ----------------------------------------------------------------

class Shell:
  """Runs commands for real (gcloud must be installed and logged in)."""

  def __call__(self, argv: Sequence[str], capture: bool = False
               ) -> tuple[int, str]:
    print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
    done = subprocess.run(list(argv), text=True, check=False,
                          stdout=subprocess.PIPE if capture else None)
    return done.returncode, (done.stdout or "").strip()

  def sleep(self, seconds: float) -> None:
    time.sleep(seconds)


class DryRun:
  """Prints the commands instead of running them; every command succeeds
  and the slice is ACTIVE, except that the job's first
  `simulate_preemptions` runs fail with the slice SUSPENDED, so that the
  printed sequence includes the resume path."""

  def __init__(self, simulate_preemptions: int = 0,
               out: Callable[[str], None] = print):
    self.preemptions_left = simulate_preemptions
    self.out = out
    self.commands: list[list[str]] = []
    self._preempted = False

  def __call__(self, argv: Sequence[str], capture: bool = False
               ) -> tuple[int, str]:
    argv = list(argv)
    self.commands.append(argv)
    self.out(shlex.join(argv))
    if argv[:5] == state_command_prefix():
      state = "SUSPENDED" if self._preempted else ACTIVE
      return 0, state
    if argv[:5] == ["gcloud", "compute", "tpus", "queued-resources",
                    "create"]:
      self._preempted = False
    if is_job(argv) and self.preemptions_left > 0:
      self.preemptions_left -= 1
      self._preempted = True
      self.out("# (dry run: simulated preemption: the job's ssh session "
               "ends with 255 and the slice is SUSPENDED)")
      return 255, ""
    return 0, ""

  def sleep(self, seconds: float) -> None:
    del seconds


def state_command_prefix() -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "describe"]


def is_job(argv: Sequence[str]) -> bool:
  return any(a.startswith("--command=") and ".venv/bin/python" in a
             for a in argv)


class LaunchError(ConfigError):
  """A launch step failed (the message names the step and the command)."""


@dataclasses.dataclass
class Launcher:
  """Runs a seqdec script on a slice end to end, resuming after preemption.

  Attributes:
    tpu, source: what to create and install.
    shell: `Shell()` or `DryRun()`.
    max_restarts: preemptions survived before giving up.
    poll_seconds, max_wait_seconds: how the wait for ACTIVE polls.
    run_workers: '0' (default; the trainers are single-process) or 'all'
      (launch/decode.py with a mesh over every host's chips).
    log_dir: where collected logs go on this machine.
    keep: leave the slice up when the job ends (default: delete it).
  """
  tpu: TpuSlice
  source: Source
  shell: object
  max_restarts: int = 3
  poll_seconds: float = 60.0
  max_wait_seconds: float = 6 * 3600.0
  run_workers: str = "0"
  log_dir: str = "tpu-logs"
  keep: bool = False

  def note(self, message: str) -> None:
    out = getattr(self.shell, "out", None)
    (out or (lambda m: print(m, file=sys.stderr, flush=True)))(message)

  def _must(self, argv: Sequence[str], what: str) -> str:
    code, out = self.shell(argv, capture=True)
    if code:
      raise LaunchError(f"{what} failed (exit {code}): {shlex.join(argv)}")
    return out

  def state(self) -> str:
    code, out = self.shell(state_command(self.tpu), capture=True)
    return out.strip() if code == 0 else "UNKNOWN"

  def create(self) -> None:
    """Requests the slice and waits until it is ACTIVE."""
    self._must(create_command(self.tpu), "creating the queued resource")
    waited = 0.0
    while True:
      state = self.state()
      if state == ACTIVE:
        return
      if state in PREEMPTED_STATES:
        raise LaunchError(f"the queued resource {self.tpu.queued_resource} "
                          f"is {state} before it became ACTIVE")
      if waited >= self.max_wait_seconds:
        raise LaunchError(f"{self.tpu.queued_resource} not ACTIVE after "
                          f"{waited:.0f} s (state {state})")
      self.shell.sleep(self.poll_seconds)
      waited += self.poll_seconds

  def setup(self) -> None:
    for argv in setup_commands(self.tpu, self.source):
      self._must(argv, "installing seqdec")

  def delete(self) -> None:
    self.shell(delete_command(self.tpu))

  def collect_logs(self, run_name: str) -> None:
    for argv in log_commands(self.tpu, run_name, self.log_dir,
                             self.run_workers):
      self.shell(argv)

  def launch(self, script: str, args: Sequence[str],
             run_name: Optional[str] = None) -> int:
    """create -> setup -> run; on preemption delete, recreate, set up and
    rerun the same command (resuming from the workdir's checkpoint).
    Returns the job's exit status."""
    check_resumable(script, args)
    run_name = run_name or re.sub(r"\W+", "-", script.rsplit("/", 1)[-1]
                                  .removesuffix(".py"))
    job = run_command(self.tpu, script, args, run_name, self.run_workers)
    restarts = 0
    self.create()
    self.setup()
    while True:
      code, _ = self.shell(job)
      if code == 0:
        break
      state = self.state()
      if state not in PREEMPTED_STATES:
        break            # the job's own failure: no restart
      if restarts >= self.max_restarts:
        raise LaunchError(f"preempted {restarts + 1} times; giving up "
                          f"(max_restarts={self.max_restarts})")
      restarts += 1
      self.note(f"# preempted ({state}): restart {restarts} of "
                f"{self.max_restarts}, resuming from the workdir's checkpoint")
      self.delete()
      self.create()
      self.setup()
    self.collect_logs(run_name)
    if not self.keep:
      self.delete()
    return code


TRAINERS = ("launch/train.py", "launch/train_drafter.py")


def check_resumable(script: str, args: Sequence[str]) -> None:
  """A trainer's --workdir must outlive the VM (gs://, mirrored by
  `run_command`) for a preempted run to resume."""
  if script not in TRAINERS:
    return
  workdir = workdir_of(args)
  if workdir is None or not workdir.startswith("gs://"):
    raise ConfigError(
        f"{script} on a TPU VM needs --workdir=gs://<bucket>/<path>: the "
        f"VM's disk is lost on preemption, and the resumed run restores "
        f"its orbax checkpoint from the workdir's copy in the bucket (got "
        f"{workdir!r})")
