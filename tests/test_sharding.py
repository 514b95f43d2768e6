"""Sharded decoding on a device mesh (issue 16; issue 19's sharded notebook).

8 simulated CPU devices in a subprocess (the device count is fixed when jax
starts). Oracle: the same Generator without a mesh. Sharded tokens must
equal unsharded tokens exactly: in float64 for every mesh shape, drafter
and tree, sampled rows included (the same per-row keys draw the same
tokens, which is stronger than a chi-square of their law), and the
compiled decode step must not all-gather a whole weight matrix, the
embedding table or a KV-cache buffer.
"""

import json
import textwrap

import jax
import pytest

from seqdec import testing
from seqdec.errors import ConfigError
from seqdec.parallel import sharding

SCRIPT = textwrap.dedent("""\
    import json
    import sys
    import jax
    from seqdec import Generator, Tokenizer, testing
    from seqdec.parallel import sharding
    assert jax.device_count() == 8
    cases = json.loads(sys.argv[1])
    prompts = ["abcabcabc", "hello there", "1 2 3 1 2 3", "xyz", "the cat"]
    out, unsharded, loaded = [], {}, {}
    for case in cases:
      method = case["spec"]    # before a checkpoint path is filled in
      if case.get("model"):
        import seqdec
        if case["model"] not in loaded:
          loaded[case["model"]] = seqdec.load_pretrained(
              case["model"], dtype=case.get("dtype", "float32"))
        model, tok = loaded[case["model"]]
      else:
        model = testing.tiny_model(case.get("dtype", "float32"))
        tok = Tokenizer.byte_level()
      if case.get("net"):      # a trained-drafter kind, random weights
        import tempfile
        from seqdec.checkpoints import drafters as drafter_ckpt
        from seqdec.models import eagle, hydra, medusa
        net = dict(eagle=lambda: eagle.create(model.config, 0),
                   medusa=lambda: medusa.create(model, 3, seed=0),
                   hydra=lambda: hydra.create(model, 3, seed=0))[case["net"]]()
        ckpt = drafter_ckpt.save(tempfile.mkdtemp(), net, model,
                                 dtype=case.get("dtype", "float32"))
        case = dict(case, spec=case["spec"].format(ckpt=ckpt))
      if case.get("pallas"):   # verify through the Pallas tree kernel
        from seqdec.models import transformer
        model = transformer.reconfigured(model, attention_impl="pallas")
      kw = dict(max_new_tokens=12, eos_ids=(), seed=3,
                temperature=case.get("temperature", 0.0))
      if case.get("perturbed"):  # a draft LM: the target, weights perturbed
        from seqdec.decoding import drafters
        kw.update(tree=case["tree"], drafter=drafters.draft_lm(
            testing.perturbed(model, case["perturbed"]), proposal="iid"))
      key = (case.get("model"), method, case.get("dtype"),
             kw["temperature"], case.get("pallas"))
      if key not in unsharded:
        unsharded[key] = Generator(model, tok, case["spec"] or None,
                                   **kw).generate(prompts)
      want = unsharded[key]
      gen = Generator(model, tok, case["spec"] or None,
                      mesh=sharding.make_mesh(case["mesh"]), **kw)
      got = [r.tokens for r in gen.generate(prompts)]
      # Margin rule (float32 on a real model): rows agree up to where the
      # unsharded run's top-1/top-2 margin was a tie (<= 1e-4).
      same, ties = True, 0
      for w, g in zip(want, got):
        d = next((i for i, (a, b) in enumerate(zip(w.tokens, g))
                  if a != b), None)
        if d is None:
          same &= len(w.tokens) == len(g)
        elif case.get("margin_rule") and w.margins[d] <= 1e-4:
          ties += 1
        else:
          same = False
      loop, inputs = gen.program_inputs(len(prompts), 16)
      accepted = sum(r.metrics.get("mean_accepted", 0.0) for r in want) / len(want)
      row = dict(case, same=same, ties=ties, rows=inputs.tokens.shape[0],
                 accepted=accepted,
                 row_spec=str(inputs.tokens.sharding.spec),
                 replicated=[a for a, _ in gen.sharding_plan.replicated])
      if case.get("hlo"):
        # The decode program generate() compiled (its while_loop runs the
        # step): read, not compiled again.
        n = len(gen.programs)
        decode = gen.programs.get("decode", loop, gen.loop_params, inputs)
        assert len(gen.programs) == n, "program_inputs: another bucket"
        row["all_gathers"] = sharding.collectives(decode.as_text())[
            "all-gather"]["shapes"]
        # Gathers of a whole vocabulary row outside `conditional` branches
        # (top-k / top-p filters run only when a row enables them).
        v = str(model.config.vocab_size)
        row["vocab_gathers"] = [s for s in sharding.collectives(
            decode.as_text(), conditional=False)["all-gather"]["shapes"]
                                if s.split(",")[-1] == v]
      out.append(row)
    print("RESULT " + json.dumps(out))
    """)


def run_cases(*cases, x64=False):
  # Tiny-model cases cost compile time: XLA's backend optimisations off.
  rows = json.loads(testing.run_on_devices(
      SCRIPT, json.dumps(cases), x64=x64,
      optimize=any(not c.get("model", "tiny").startswith("tiny")
                   for c in cases)))
  for row in rows:
    assert row["same"], row
    data = int(row["mesh"].split("data:")[1].split(",")[0])
    assert row["rows"] % data == 0, row       # 5 prompts -> whole shards
  return rows


def forbidden_shapes(batch: int, cache_len: int) -> set[str]:
  """Shapes a sharded step must never all-gather: every parameter of the
  tiny model whole (weights, embedding table) and a layer's KV cache."""
  c = testing.tiny_model().config
  from flax import nnx  # pylint: disable=g-import-not-at-top
  shapes = {",".join(map(str, x.shape)) for x in jax.tree.leaves(
      nnx.state(testing.tiny_model(), nnx.Param)) if x.ndim >= 2}
  shapes.add(f"{batch},{c.num_kv_heads},{cache_len},{c.head_dim}")
  return shapes


def test_tensor_and_data_parallel_decoding_equals_unsharded():
  """data:4 x model:2: rows, vocabulary, MLP and heads all split."""
  [row] = run_cases(dict(mesh="data:4,model:2", spec="ar",
                         hlo=True))
  assert row["replicated"] == [] and row["row_spec"] == str(
      sharding.PartitionSpec("data"))
  # The step gathers only small per-shard candidates (argmax over vocab
  # shards) and token rows, never a weight, the embedding or a KV buffer.
  bad = forbidden_shapes(row["rows"], 16 + 16) & set(row["all_gathers"])
  assert not bad, row["all_gathers"]


MESHES = ("data:8,model:1", "data:4,model:2", "data:2,model:4",
          "data:1,model:8")


@pytest.mark.slow
def test_every_mesh_shape_equals_unsharded_float64():
  """Layer-skip drafts, a k-ary tree, sampled at T=1 (the n-gram drafter
  and the tree kernel: `test_the_tree_kernel_runs_per_shard`). Also a
  hybrid target (Mamba-2, attention, Mamba-2) on data:4 x model:2, drafted
  by a perturbed copy of itself (i.i.d. children: accepted often): its attention, MLP and vocabulary split as
  the transformer's, the Mamba-2 layers replicated (no rule for their
  axes), rows over data."""
  # data:4,model:2 runs in the drafter matrix and the chi-square test.
  meshes = [m for m in MESHES if m != "data:4,model:2"]
  hybrid = dict(mesh="data:4,model:2", spec="", tree="kary2x1",
                perturbed=0.03, model="tiny-hybrid", dtype="float64",
                temperature=1.0)
  *rows, hybrid_row = run_cases(
      *[dict(mesh=m, spec="layerskip@layers=first:1/kary2x1",
             dtype="float64", temperature=1.0, hlo=True)
        for m in meshes], hybrid, x64=True)
  assert hybrid_row["replicated"] == [] and hybrid_row["accepted"] > 0.1, hybrid_row
  # The tiny model's 2 kv heads split over model:2 only; its 260-token
  # vocabulary over model <= 4 only: the rest stays replicated.
  assert [r["replicated"] for r in rows] == [
      [], ["heads", "kv_heads"], ["heads", "kv_heads", "vocab"]]
  for r in rows:
    bad = forbidden_shapes(r["rows"], 32) & set(r["all_gathers"])
    assert not bad, (r["mesh"], r["all_gathers"])
    # Sampling (draft children, the residual draw) never gathers a whole
    # [rows, V] distribution where the vocabulary is split.
    assert r["vocab_gathers"] == [], (r["mesh"], r["vocab_gathers"])


@pytest.mark.slow
def test_every_drafter_on_data4_model2_equals_unsharded_float64():
  """Every drafter with a network: the draft LM, EAGLE (static and dynamic
  tree), Medusa and Hydra heads (random weights, saved and loaded as
  checkpoints), sampled at T=1 in float64 on data:4 x model:2: the
  one-device tokens, no weight, KV or vocabulary-row gather in the step
  (layer-skip and n-gram: the every-mesh and tree-kernel tests)."""
  # The compiled step is read for the two ways children are chosen (the
  # static-tree grower, shared by the draft LM, EAGLE, Medusa and Hydra,
  # and EAGLE-2's dynamic tree), not recompiled for every drafter.
  cases = [dict(spec="draft@draft_layers=1/kary2x1", hlo=True),
           dict(spec="eagle@checkpoint={ckpt}/dyn6d3k2", net="eagle",
                hlo=True),
           dict(spec="eagle@checkpoint={ckpt}/kary2x1", net="eagle"),
           dict(spec="medusa@checkpoint={ckpt}/kary2x1x1", net="medusa"),
           dict(spec="hydra@checkpoint={ckpt}/kary2x1x1", net="hydra")]
  rows = run_cases(*[dict(c, mesh="data:4,model:2", dtype="float64",
                          temperature=1.0) for c in cases], x64=True)
  for r in rows:
    print(r["spec"].split("@")[0], r["spec"].split("/")[-1],
          "accepted drafts per round:", round(r["accepted"], 2))
    if r.get("hlo"):
      bad = forbidden_shapes(r["rows"], 32) & set(r["all_gathers"])
      assert not bad and r["vocab_gathers"] == [], r
  # The draft LM (the target's first layer) is accepted often: acceptance
  # and rejection both run sharded.
  assert rows[0]["accepted"] > 0.1


CHI2 = textwrap.dedent("""\
    import json, sys
    import numpy as np
    from seqdec import Generator, Tokenizer, testing
    from seqdec.parallel import sharding
    prompt, rows = json.loads(sys.argv[1])
    gen = Generator(testing.tiny_model(), Tokenizer.byte_level(),
                    "layerskip@layers=first:1@proposal=wor/kary3x1",
                    mesh=sharding.make_mesh("data:4,model:2"),
                    max_new_tokens=3, eos_ids=(), temperature=1.0,
                    max_batch=64)
    out = gen.generate_ids([prompt] * rows, seed=11)
    print("RESULT " + json.dumps(dict(
        pairs=[r.tokens[:2] for r in out],
        accepted=float(np.mean([r.metrics["mean_accepted"] for r in out])))))
    """)


@pytest.mark.slow
def test_sharded_speculative_sampling_follows_the_autoregressive_law():
  """χ² of the joint law of the first two tokens, 4096 rows sampled by
  layer-skip with a without-replacement k-ary tree on data:4 x model:2
  (the residual draws and Gumbel top-k children split over the
  vocabulary), against the exact autoregressive law."""
  from test_spec_sampling import (  # pylint: disable=g-import-not-at-top
      P_MIN, PROMPT, ROWS, first_pair_chi2)
  got = json.loads(testing.run_on_devices(CHI2, json.dumps([PROMPT, ROWS]),
                                          optimize=False))
  stat, pvalue, dof = first_pair_chi2(testing.tiny_model(), PROMPT,
                                      got["pairs"])
  print(f"data:4,model:2 chi2 {stat:.1f} dof {dof} p {pvalue:.3g}; "
        f"accepted drafts per round {got['accepted']:.2f}")
  assert pvalue > P_MIN, (stat, dof)
  assert got["accepted"] > 0.3, "the test must exercise acceptance"


@pytest.mark.slow
def test_the_tree_kernel_runs_per_shard():
  """attention_impl='pallas': the kernel (interpreted on CPU) runs under
  shard_map on each shard's rows and heads; tokens == one device's."""
  rows = run_cases(*[dict(mesh=m, spec="ngram/kary2x1x1", pallas=True)
                     for m in ("data:4,model:2", "data:2,model:4")])
  assert [r["replicated"] for r in rows] == [[], ["heads", "kv_heads"]]


@pytest.mark.slow
@pytest.mark.realmodel
def test_smollm2_on_data2_model4_under_the_margin_rule():
  """Real weights, float32: autoregressive and n-gram decoding (prefill,
  steps, verifies and commits) on data:2 x model:4 (attention replicated:
  3 kv heads) give the one-device tokens wherever the one-device margin is
  not a tie."""
  rows = run_cases(*[dict(mesh="data:2,model:4", spec=spec,
                          model="smollm2-135m-instruct", margin_rule=True)
                     for spec in ("ar", "ngram/chain4")])
  for r in rows:
    assert r["replicated"] == ["heads", "kv_heads"], r
    print(r["spec"], "ties:", r["ties"])


def test_mesh_specs_and_plans():
  assert sharding.parse_mesh(None, 8) == {"data": 8}
  assert sharding.parse_mesh("data:2,model:4", 8) == {"data": 2, "model": 4}
  assert sharding.parse_mesh("data:-1,model:2", 8) == {"data": 4, "model": 2}
  for spec, match in (("data:3", "does not use the 8 devices"),
                      ("batch:8", "unknown mesh axis 'batch'"),
                      ("data:x", "integer size"),
                      ("data:-1,model:-1", "at most one")):
    with pytest.raises(ConfigError, match=match):
      sharding.parse_mesh(spec, 8)


@pytest.mark.parametrize("preset,want", [
    ("smollm2-135m", {"heads", "kv_heads"}),    # 3 kv heads on model:4
    pytest.param("gemma3-270m", {"heads", "kv_heads"},   # 1 kv head
                 marks=pytest.mark.slow),
    pytest.param("llama-2-7b", set(), marks=pytest.mark.slow)])
def test_plans_of_real_shapes(preset, want):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from seqdec.models import config as config_lib  # pylint: disable=g-import-not-at-top
  from seqdec.models import transformer as tr  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: tr.Transformer(
      config_lib.PRESETS[preset], rngs=nnx.Rngs(0)))
  plan = sharding.plan_params(nnx.state(abstract), {"data": 2, "model": 4})
  assert {a for a, _ in plan.replicated} == want
  assert dict(plan.rules)["mlp"] == "model" and dict(plan.rules)["vocab"] == (
      "model")
  assert "kv_heads dimension" in dict(plan.replicated).get(
      "kv_heads", "kv_heads dimension")
  layer = abstract.layers[0]
  assert plan.mesh_spec(layer.mlp.gate_up_proj.get_metadata()[
      "out_sharding"]) == sharding.PartitionSpec(None, None, "model")
  assert plan.mesh_spec(abstract.embed.get_metadata()["out_sharding"]) == (
      sharding.PartitionSpec("model", None))


TOPK = textwrap.dedent("""\
    import jax, jax.numpy as jnp, numpy as np
    from seqdec.parallel import sharding
    mesh = sharding.make_mesh("data:4,model:2")
    x = np.round(np.random.default_rng(0).normal(size=(8, 3, 260)), 1)
    x = jax.device_put(x.astype(np.float32), jax.sharding.NamedSharding(
        mesh, sharding.PartitionSpec("data", None, "model")))
    f = jax.jit(lambda x: (sharding.top_k(x, 5), sharding.blocked_cumsum(x)))
    with sharding.mesh_context(mesh):
      (vals, idx), c = f(x)
      hlo = f.lower(x).compile().as_text()
    want_vals, want_idx = jax.lax.top_k(x, 5)
    gathers = sharding.collectives(hlo)["all-gather"]["shapes"]
    print("RESULT", np.array_equal(vals, want_vals),
          np.array_equal(idx, want_idx),
          np.allclose(c, jnp.cumsum(x, -1), rtol=1e-5, atol=1e-5),
          sorted(set(gathers)))
    """)


def test_top_k_and_cumsum_over_a_split_vocabulary():
  """`sharding.top_k` equals `lax.top_k` (values and indices, with many
  ties: x rounded to 0.1) and `blocked_cumsum` equals `cumsum`, while
  only the 2 x 5 candidates per row of a vocabulary split in two are
  gathered (the rows stay on their data shard)."""
  line = testing.run_on_devices(TOPK)
  assert line == "True True True ['2,3,10']", line


def test_collectives_are_read_from_hlo_text():
  """The HLO scan behind the no-full-gather check finds what it must."""
  hlo = "\n".join([
      "  %all-gather.3 = f32[260,64]{1,0} all-gather(f32[65,64]{1,0} %p), "
      "channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}",
      "  %ags = (s32[4,8]{1,0}, s32[8,8]{1,0}) all-gather-start(%x), "
      "dimensions={0}",
      "  %ag.done = s32[8,8]{1,0} all-gather-done(%ags)",
      "  %all-reduce.1 = f32[2,5]{1,0} all-reduce(%y), to_apply=%add",
      "  %add.2 = f32[2,5]{1,0} add(%a, %b)"])
  got = sharding.collectives(hlo)
  assert got["all-gather"]["count"] == 2
  assert got["all-gather"]["shapes"] == ["260,64", "4,8", "8,8"]
  assert got["all-gather"]["bytes"] == 4 * (260 * 64 + 32 + 64)
  assert got["all-reduce"] == dict(count=1, bytes=40, shapes=["2,5"])
  assert "260,64" in forbidden_shapes(4, 32)    # the tiny embedding table
  # Collectives inside a conditional's branches (and what those call) are
  # left out with conditional=False; a while body is always counted.
  program = "\n".join([
      "%fused (p: f32[2,130]) -> f32[2,260] {",
      "  %ag.1 = f32[2,260]{1,0} all-gather(%p), dimensions={1}",
      "}",
      "%branch_a (p: f32[2,130]) -> f32[2,260] {",
      "  ROOT %f = f32[2,260]{1,0} fusion(%p), kind=kLoop, calls=%fused",
      "}",
      "%branch_b (p: f32[2,130]) -> f32[2,260] {",
      "  ROOT %c = f32[2,260]{1,0} copy(%p)",
      "}",
      "%body (p: f32[2,130]) -> f32[2,130] {",
      "  %ar = f32[2,130]{1,0} all-reduce(%p), to_apply=%add",
      "}",
      "ENTRY %main (p: f32[2,130]) -> f32[2,260] {",
      "  %w = f32[2,130]{1,0} while(%p), condition=%cond, body=%body",
      "  %ag.2 = f32[4,4]{1,0} all-gather(%q), dimensions={0}",
      "  ROOT %r = (f32[2,260]{1,0}) conditional(%i, %w, %w), "
      "branch_computations={%branch_a, %branch_b}",
      "}"])
  every = sharding.collectives(program)
  run = sharding.collectives(program, conditional=False)
  assert every["all-gather"]["shapes"] == ["2,260", "4,4"]
  assert run["all-gather"]["shapes"] == ["4,4"]
  assert run["all-reduce"]["count"] == every["all-reduce"]["count"] == 1


LOAD = textwrap.dedent("""\
    import sys
    import jax
    import numpy as np
    from seqdec import Generator, Tokenizer
    from seqdec.checkpoints import convert, hf
    from seqdec.parallel import sharding
    mesh = sharding.make_mesh("data:2,model:4")
    reads = []                  # (elements read, elements of the parameter)
    block = convert.Parts.block
    def spy(parts, index=()):
      out = block(parts, index)
      reads.append((out.size, int(np.prod(parts.shape))))
      return out
    convert.Parts.block = spy
    sharded, _ = hf.load_hf(sys.argv[1], mesh=mesh)
    convert.Parts.block = block
    # Every element is read exactly once (replicas share one read), and the
    # largest read of the vocabulary-split embedding is a quarter of it.
    total = sum(x.size for x in jax.tree.leaves(sharded))
    once = sum(n for n, _ in reads) == total
    quarter = max(n / size for n, size in reads if size == 260 * 64)
    whole, _ = hf.load_hf(sys.argv[1])
    up = sharded.layers[0].mlp.gate_up_proj.get_value()
    embed = sharded.embed.get_value()
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree.leaves(sharded), jax.tree.leaves(whole)))
    tok = Tokenizer.byte_level()
    kw = dict(max_new_tokens=10, eos_ids=())
    a = Generator(sharded, tok, "ngram/chain4", mesh=mesh, **kw).generate(
        ["abcabc", "hello"])
    b = Generator(whole, tok, "ngram/chain4", **kw).generate(["abcabc", "hello"])
    print("RESULT", same, str(up.sharding.spec), up.addressable_shards[0].data.shape,
          str(embed.sharding.spec), [r.tokens for r in a] == [r.tokens for r in b],
          once, quarter)
    """)


@pytest.mark.slow
def test_sharded_loading_puts_only_each_devices_block(tmp_path):
  """An HF checkpoint loaded onto data:2 x model:4: every parameter arrives
  laid out by the rules (each device holds its block: the MLP's 128
  columns as 4 x 32), values equal a one-device load, decoding equal; the
  memory-mapped file is read block by block, each element once (the
  embedding in quarters, never whole)."""
  import hf_fixtures  # pylint: disable=g-import-not-at-top
  config = testing.tiny_model().config
  path = hf_fixtures.write_checkpoint(
      str(tmp_path / "ckpt"), config, hf_fixtures.random_hf_tensors(config))
  line = testing.run_on_devices(LOAD, path)
  assert line == ("True " + str(sharding.PartitionSpec(
      None, None, "model")) + " (64, 2, 32) " + str(sharding.PartitionSpec(
          "model", None)) + " True True 0.25"), line
