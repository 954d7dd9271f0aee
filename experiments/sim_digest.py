"""A digest of seeded compute-free simulator runs, to compare two commits' rules.

  git worktree add /tmp/old <commit>
  python experiments/sim_digest.py /tmp/old > old.json
  python experiments/sim_digest.py . > new.json && diff old.json new.json

Runs the code under the given root (first on sys.path): every variant of
experiments/decoupled_diloco.py compute-free for 300 global batches with its
event log (written next to the digest as /tmp/simlog_<root>_<variant>.jsonl),
and `goodput.simulate_decoupled` at 2.4M chips for M = 1, 4, 16. BUILD.md
("One protocol, two clocks") records what it showed.
"""
import hashlib, json, os, sys, tempfile
sys.path.insert(0, sys.argv[1])
os.chdir(sys.argv[1])
import numpy as np
from decoupled_diloco import config as config_lib
from decoupled_diloco.runtime import goodput, scenario, simulated, chaos
from decoupled_diloco.algorithm import fragments as fragments_lib
import importlib.util
spec = importlib.util.spec_from_file_location("exp", os.path.join(sys.argv[1], "experiments/decoupled_diloco.py"))
exp = importlib.util.module_from_spec(spec); spec.loader.exec_module(exp)
out = {}
for variant in ["chaos", "nochaos", "hetero_km", "hetero_k1", "hetero_k1_grace", "hetero_lockstep"]:
  c = exp.get_config(variant)
  c.train.steps = 300
  cfg = config_lib.parse(c)
  d = cfg.diloco
  offsets = fragments_lib.sync_offsets(d.num_fragments, d.sync_every)
  seconds = scenario.step_seconds(cfg)
  horizon = scenario.chaos_horizon(cfg, seconds)
  backend = goodput.AnalyticBackend(d.num_learners, [1000] * d.num_fragments, [1000] * d.num_fragments, units_per_step=64)
  log = tempfile.mktemp()
  sim = simulated.Simulation(backend, scenario.protocol(cfg, offsets), scenario.world(cfg, seconds, horizon), d.num_fragments, log, budget=cfg.sim.budget)
  sim.run(cfg.train.steps * d.num_learners)
  sim.close()
  rep = sim.report()
  text = open(log).read()
  out[variant] = {"log_sha": hashlib.sha256(text.encode()).hexdigest()[:16], "lines": text.count("\n"),
                  "goodput": rep["goodput"], "virtual": rep["virtual_seconds"], "protocol": rep["protocol"],
                  "merges": rep["merges_per_fragment"]}
  open(f"/tmp/simlog_{os.path.basename(sys.argv[1].rstrip('/'))}_{variant}.jsonl", "w").write(text)
model = chaos.FailureModel(mtbi_chip_hours=8766.0, chips_per_slice=256, repair_median_s=2400.0, repair_sigma=1.5, reconfiguration_s=9.4, restart_s=71.1, spare_fraction=0.0) if hasattr(chaos, "FailureModel") else None
for m in (1, 4, 16):
  r = goodput.simulate_decoupled(model, num_chips=2_400_000, num_learners=m, steps_per_learner=600, seed=0)
  out[f"gp_{m}"] = {"goodput": r["goodput"], "protocol": r["protocol"], "lost": r["lost_chip_s"]}
print(json.dumps(out, indent=1, sort_keys=True, default=str))
