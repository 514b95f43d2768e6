"""ParaRNN benchmark: linear-scan back ends and Newton-parallel cells vs lax.scan.

  python launch/bench_pararnn.py --quick    # T in {1k, 4k}, ParaGRU (~2 min)
  python launch/bench_pararnn.py            # T in {1k, 4k, 16k, 64k} (~10 min)

Sections (all float32, time-major, batch B=4):
  scan   `linear_scan` with diagonal A, H=256: lax.scan (sequential),
         associative, chunked; also with `b` donated (the chunked back end
         then runs in place, as it does inside a Newton step).
  cells  ParaGRU and ParaLSTM recurrences, H=256 (the input projections are
         outside the timed region: identical in both modes): sequential
         (lax.scan; autodiff for the backward) vs Newton with each scan back
         end (implicit custom_vjp backward); forward and forward+backward.
  dense  classic GRU with dense Jacobians at H=64, T <= 4k (at H=256 the
         [T, B, H, H] Jacobians are 17 GB at T=16k: they do not fit).

Every timing is the median (p10-p90) of interleaved rounds (the order rotates
each round). The JSON also holds what does not depend on this 2-core CPU:
Newton iterations to tolerance, the critical-path depth in sequential steps
of each method, modelled bytes and FLOPs per token, and a projected speedup on
an accelerator under stated assumptions. Writes benchmarks/results/pararnn.json,
.md and .png; prints the JSON.
"""

import argparse
import functools
import math
import os
import sys

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqdec import bench
from seqdec.jsonl import write_text_atomic
from seqdec.models import rnn
from seqdec.parallel import newton
from seqdec.parallel import scan

BATCH = 4
HIDDEN = 256
DENSE_HIDDEN = 64
CHUNK = scan.DEFAULT_CHUNK
# Accelerator model used for the projection (stated in the JSON).
ACCEL = dict(name="generic GPU (assumed)", bandwidth_gb_s=2000.0,
             dependent_step_us=1.0, sync_us=2.0)


def interleaved(fns, make_args, rounds):
  """{name: summarize(ms)} over `rounds` interleaved calls of each fn."""
  for name, fn in fns.items():  # compile + warm up
    jax.block_until_ready(fn(*make_args(name)))
  times = {name: [] for name in fns}
  for order in bench.alternating_orders(rounds, list(fns)):
    for name in order:
      args = make_args(name)
      jax.block_until_ready(args)
      _, sec = bench.time_call(lambda: jax.block_until_ready(fns[name](*args)))
      times[name].append(1e3 * sec)
  return {name: bench.summarize(ts) for name, ts in times.items()}


def rounds_for(t, quick):
  if quick:
    return 5
  return 15 if t <= 16384 else 7


# --- scan ---------------------------------------------------------------------


def scan_section(ts, quick):
  rows = []
  for t in ts:
    key = jax.random.key(t)
    a = jax.random.uniform(key, (t, BATCH, HIDDEN), jnp.float32, 0.5, 0.999)
    b = jax.random.normal(jax.random.fold_in(key, 1), (t, BATCH, HIDDEN))
    h0 = jnp.zeros((BATCH, HIDDEN))
    impls = ["sequential", "chunked"]
    if not quick or t <= 4096:
      impls.insert(1, "associative")
    fns = {}
    for impl in impls:
      f = functools.partial(scan.linear_scan, structure="diagonal", impl=impl,
                            chunk=CHUNK)
      fns[impl] = jax.jit(f)
      if impl != "associative":
        fns[impl + "+donated"] = jax.jit(f, donate_argnums=1)
    stats = interleaved(
        fns, lambda name: (a, b + 0 if "donated" in name else b, h0),
        rounds_for(t, quick))
    for name, s in stats.items():
      impl = name.split("+")[0]
      rows.append(dict(T=t, impl=name, ms=s,
                       depth=depth(impl, t, 1),
                       speed_vs_lax_scan=stats["sequential"]["median"]
                       / s["median"]))
    print(f"scan T={t}: " + ", ".join(
        f"{n} {s['median']:.1f} ms" for n, s in stats.items()),
          file=sys.stderr)
  return rows


def depth(impl, t, iterations):
  """Critical path in dependent steps: one linear solve per iteration."""
  if impl == "sequential":
    per = t
  elif impl == "associative":
    per = 2 * max(1, math.ceil(math.log2(t)))
  else:
    c = min(CHUNK, t)
    per = 2 * c + math.ceil(t / c)
  return iterations * per


# --- cells --------------------------------------------------------------------


def cell_problem(cell, t, hidden):
  c = rnn.Cell(cell, hidden, hidden, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (t, BATCH, hidden))
  u = jax.jit(c.project)(x)
  w = jax.random.normal(jax.random.key(2), (t,) + c.init_state(BATCH).shape)
  return c, u, w


def cell_fns(cell, impls):
  """fwd / fwd+bwd functions of (params, u, h0, w) for each method."""
  step, structure = cell.kind.step, cell.kind.structure

  def seq(p, u, h0):
    return newton.rollout(step, p, u, h0), None

  def par(impl, p, u, h0):
    cfg = newton.NewtonConfig(structure=structure, impl=impl, chunk=CHUNK)
    return newton.solve(step, p, u, h0, cfg)

  methods = {"sequential": seq}
  methods.update({f"newton-{i}": functools.partial(par, i) for i in impls})
  fns = {}
  for name, f in methods.items():
    fns[name + ":fwd"] = jax.jit(lambda p, u, h0, w, f=f: f(p, u, h0)[0])
    loss = lambda p, u, h0, w, f=f: jnp.vdot(w, f(p, u, h0)[0])
    fns[name + ":fwd+bwd"] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return fns, methods


def cells_section(cells, ts, quick, hidden, max_t=None):
  rows, newton_rows = [], []
  for cell_name in cells:
    for t in ts:
      if max_t and t > max_t:
        continue
      cell, u, w = cell_problem(cell_name, t, hidden)
      # Which scan back ends run inside Newton at this T (time budget): all
      # at small T; at large T the one 'auto' picks on CPU (chunked for
      # diagonal, sequential for block2) and the next best.
      diagonal = cell.kind.structure == "diagonal"
      impls = ["chunked" if diagonal else "sequential"]
      if t <= 16384 and not (quick and t > 1024):
        impls.append("sequential" if diagonal else "chunked")
      if t <= (1024 if quick else 4096 if diagonal else 1024):
        impls.append("associative")
      if cell.kind.structure == "dense":
        impls = ["sequential"]
        if t <= 1024 and not quick:
          impls.append("associative")
      fns, methods = cell_fns(cell, impls)
      p, h0 = cell.params(), cell.init_state(BATCH)
      for impl in impls:
        _, info = jax.jit(methods[f"newton-{impl}"])(p, u, h0)
        newton_rows.append(dict(
            cell=cell_name, T=t, impl=impl, iterations=int(info.iterations),
            residual=float(info.residual), converged=bool(info.converged)))
      iters = newton_rows[-1]["iterations"]
      rounds = 5 if t <= 16384 and cell.kind.structure != "dense" else 3
      stats = interleaved(fns, lambda name: (p, u, h0, w), rounds)
      for name, s in stats.items():
        method, kind = name.split(":")
        base = stats[f"sequential:{kind}"]["median"]
        impl = method.replace("newton-", "")
        n_it = 1 if method == "sequential" else iters
        d = depth(impl, t, n_it) + (0 if kind == "fwd" else depth(impl, t, 1))
        rows.append(dict(cell=cell_name, hidden=hidden, T=t, method=method,
                         pass_=kind, ms=s, ratio_to_sequential=s["median"]
                         / base, depth=d))
      print(f"{cell_name} T={t} iters={iters}: " + ", ".join(
          f"{n} {s['median']:.0f}" for n, s in stats.items()), file=sys.stderr)
  return rows, newton_rows


# --- model of an accelerator ---------------------------------------------------


def traffic_model(hidden, planes, dense=False):
  """Modelled f32 bytes and FLOPs per token (per batch row) of one pass.

  Sequential step: read u (3 H), write h (S = planes * H). Newton iteration:
  linearise (read u, h_prev; write f, J: 3H + S + S + S*planes), residual
  and correction (read f, h; write b: 3 S), chunked scan (read J, b twice,
  write delta: 2 (S*planes + S) + S), update (3 S); dense J is H x H per
  token. FLOPs: ~15 per state entry for the cell (3 transcendentals counted
  as 1 each) plus 6 H^2 of mat-vecs when dense; a Newton iteration costs the
  primal plus one JVP per Jacobian column group, plus the scan.
  """
  s = max(1, planes) * hidden
  jac = s * (hidden if dense else max(1, planes))
  seq_bytes = 4 * (3 * hidden + s)
  it_bytes = 4 * ((3 * hidden + 3 * s + jac) + 3 * s + (2 * (jac + s) + s)
                  + 3 * s)
  matvec = 6 * hidden * hidden if dense else 0   # h U_z, h U_r, (r h) U_c
  cell = 15 * s + matvec
  # Primal + one JVP per Jacobian column group (1 diagonal, 2 block2, H dense)
  # + the scan's A delta + b (mat-vec when dense).
  groups = hidden if dense else max(1, planes)
  scan_flops = 2 * jac
  return dict(seq_bytes_per_token=seq_bytes,
              newton_iter_bytes_per_token=it_bytes,
              seq_flops_per_token=cell,
              newton_iter_flops_per_token=cell * (1 + groups) + 2 * scan_flops)


def projection(t, iterations, hidden, planes, dense=False):
  """Projected speedup of Newton (associative, log depth) over sequential on
  the assumed accelerator: sequential = T dependent steps (each at least the
  step latency), parallel = iterations x (streaming the per-iteration bytes
  at full bandwidth + 2 log2 T synchronisations)."""
  m = traffic_model(hidden, planes, dense)
  bw = ACCEL["bandwidth_gb_s"] * 1e9
  t_seq = t * max(ACCEL["dependent_step_us"] * 1e-6,
                  BATCH * m["seq_bytes_per_token"] / bw)
  t_par = (iterations + 1) * (BATCH * t * m["newton_iter_bytes_per_token"] / bw
                              + 2 * math.ceil(math.log2(t))
                              * ACCEL["sync_us"] * 1e-6)
  return dict(T=t, iterations=iterations, t_seq_ms=1e3 * t_seq,
              t_par_ms=1e3 * t_par, speedup=t_seq / t_par)


# --- output -------------------------------------------------------------------


def markdown(result):
  out = [f"# ParaRNN benchmark ({result['mode']})", "",
         f"`{result['command']}` on {result['machine']['cpu_model']} "
         f"({result['machine']['cpu_count']} cores), load average "
         f"{result['load_average_start']} at start, "
         f"{result['load_average_end']} at end. Median [p10-p90] ms.", "",
         "## linear_scan, diagonal, B=4, H=256", ""]
  out.append(bench.markdown_table(
      ["T", "impl", "ms", "speed vs lax.scan", "depth"],
      [[r["T"], r["impl"], bench.fmt_stats(r["ms"]),
        f"{r['speed_vs_lax_scan']:.2f}x", r["depth"]] for r in result["scan"]]))
  out += ["", "## cells (recurrence only), B=4", ""]
  out.append(bench.markdown_table(
      ["cell", "H", "T", "method", "pass", "ms", "/ sequential", "depth"],
      [[r["cell"], r["hidden"], r["T"], r["method"], r["pass_"],
        bench.fmt_stats(r["ms"], 0), f"{r['ratio_to_sequential']:.2f}",
        r["depth"]] for r in result["cells"]]))
  out += ["", "## Newton iterations to relative residual 1e-6", ""]
  out.append(bench.markdown_table(
      ["cell", "T", "scan", "iterations", "residual", "converged"],
      [[r["cell"], r["T"], r["impl"], r["iterations"], f"{r['residual']:.1e}",
        r["converged"]] for r in result["newton"]]))
  out += ["", "## projected speedup on the assumed accelerator", "",
          f"Assumptions: {result['accelerator_model']}", ""]
  out.append(bench.markdown_table(
      ["cell", "T", "iterations", "t_seq ms", "t_par ms", "speedup"],
      [[r["cell"], r["T"], r["iterations"], f"{r['t_seq_ms']:.2f}",
        f"{r['t_par_ms']:.2f}", f"{r['speedup']:.1f}x"]
       for r in result["projection"]]))
  return "\n".join(out) + "\n"


def plot(result, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for impl in sorted({r["impl"] for r in result["scan"]}):
    rs = [r for r in result["scan"] if r["impl"] == impl]
    axes[0].plot([r["T"] for r in rs], [r["ms"]["median"] for r in rs],
                 marker="o", label=impl)
  axes[0].set(title="linear_scan (diagonal, B=4, H=256)", xscale="log",
              yscale="log", xlabel="T", ylabel="ms (median)")
  axes[0].legend(fontsize=7)
  for key in sorted({(r["cell"], r["method"]) for r in result["cells"]
                     if r["pass_"] == "fwd+bwd" and r["hidden"] == HIDDEN}):
    rs = [r for r in result["cells"] if (r["cell"], r["method"]) == key
          and r["pass_"] == "fwd+bwd"]
    axes[1].plot([r["T"] for r in rs], [r["ms"]["median"] for r in rs],
                 marker="o", label=" ".join(key),
                 linestyle="-" if key[0] == "paragru" else "--")
  axes[1].set(title="cells fwd+bwd (B=4, H=256)", xscale="log", yscale="log",
              xlabel="T", ylabel="ms (median)")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="T in {1k, 4k}, ParaGRU + dense GRU only")
  parser.add_argument("--sections", default="scan,cells,dense",
                      help="comma-separated subset of scan,cells,dense")
  parser.add_argument("--output", default="benchmarks/results/pararnn.json")
  args = parser.parse_args()
  sections = set(args.sections.split(","))
  unknown = sections - {"scan", "cells", "dense"}
  if unknown:
    parser.error(f"unknown sections {sorted(unknown)}")
  ts = [1024, 4096] if args.quick else [1024, 4096, 16384, 65536]
  result = dict(mode="quick" if args.quick else "full",
                command="python launch/bench_pararnn.py" + " ".join(
                    [""] + sys.argv[1:]),
                machine=bench.machine_info(("jax", "jaxlib", "flax")),
                load_average_start=[round(x, 2) for x in os.getloadavg()],
                glibc_tunables=os.environ.get("GLIBC_TUNABLES"),
                batch=BATCH, hidden=HIDDEN, chunk=CHUNK,
                scan=[], cells=[], newton=[])
  if "scan" in sections:
    result["scan"] = scan_section(ts, args.quick)
  if "cells" in sections:
    cells = ["paragru"] if args.quick else ["paragru", "paralstm"]
    rows, its = cells_section(cells, ts, args.quick, HIDDEN)
    result["cells"] += rows
    result["newton"] += its
  if "dense" in sections:
    rows, its = cells_section(["gru"], ts, args.quick, DENSE_HIDDEN,
                              max_t=1024 if args.quick else 4096)
    result["cells"] += rows
    result["newton"] += its
  result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
  result["accelerator_model"] = dict(
      ACCEL, note="projection = model, not a measurement; sequential step "
      "latency-bound at dependent_step_us, Newton streaming-bound plus "
      "2 log2 T synchronisations per linear solve (+1 solve for the "
      "adjoint is not included; forward only)")
  result["traffic_model"] = {
      c: traffic_model(HIDDEN if c != "gru" else DENSE_HIDDEN,
                       rnn.CELLS[c].planes, c == "gru") for c in rnn.CELLS}
  result["projection"] = [
      dict(cell=r["cell"], **projection(
          r["T"], r["iterations"],
          HIDDEN if r["cell"] != "gru" else DENSE_HIDDEN,
          rnn.CELLS[r["cell"]].planes, r["cell"] == "gru"))
      for r in result["newton"] if r["impl"] == "chunked"
      or (r["cell"] == "gru" and r["impl"] == "sequential")]
  base = os.path.splitext(args.output)[0]
  bench.write_json(args.output, result)
  write_text_atomic(base + ".md", markdown(result))
  plot(result, base + ".png")
  print(bench.json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
