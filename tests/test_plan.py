"""`raylm plan`: its counts equal the built models', its FLOPs a direct count, its memory estimate
the measured peak of a real CPU training step, and an impossible budget is refused with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from raylm.cli import main
from raylm.config import load_config
from raylm.model import PRESETS, TransformerConfig, build_model
from raylm.model.loss import summed_loss
from raylm.model.sizing import flops_per_token
from raylm.plan import make_plan, memory_per_worker, model_for
from tests.conftest import CONFIGS, REPO

MEASURE = """
import json, sys, threading, time
import torch
torch.manual_seed(0)
torch.set_num_threads(1)
from raylm.model import TransformerConfig, build_model
from raylm.model.loss import summed_loss

def anonymous_resident_bytes():
    # Anonymous memory only: tensors, not library pages (which the kernel may drop under pressure).
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("RssAnon:"))

config = TransformerConfig.from_dict(json.loads(sys.argv[1]))
micro = int(sys.argv[2])
base = anonymous_resident_bytes()
peak, running = [base], [True]

def watch():
    while running[0]:
        peak[0] = max(peak[0], anonymous_resident_bytes())
        time.sleep(0.0002)

watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
model = build_model(config).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
rows = torch.randint(3, config.vocab_size, (micro, config.seq_len + 1))
for _ in range(3):
    logits = model(rows[:, :-1])
    loss, _ = summed_loss(logits, rows[:, 1:], 0)
    del logits
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
running[0] = False
watcher.join()
print(json.dumps({"peak_bytes": peak[0] - base}))
"""


def measured_peak(model: TransformerConfig, micro_batch: int) -> int:
    """Peak resident memory a CPU training step adds to a fresh process. Large tensors are mmapped
    (MALLOC_MMAP_THRESHOLD_) so freed ones leave the resident set, as a device allocator's would."""
    # A controlled environment, not the test session's (earlier tests export variables that change
    # allocator and threading behaviour).
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(REPO),
           "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(model.to_dict()), str(micro_batch)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def plan_config(*overrides: str):
    return load_config(CONFIGS / "laptop.yaml", list(overrides))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_equal_the_built_module_for_every_preset(name):
    plan = make_plan(plan_config(f"model={{preset: {name}}}"))
    with torch.device("meta"):
        model = build_model(model_for(plan_config(f"model={{preset: {name}}}")))
    assert plan.parameters["total"] == sum(p.numel() for p in model.parameters())
    config = model_for(plan_config(f"model={{preset: {name}}}"))
    if hasattr(model, "embed") and config.position == "rope":  # token embedding, and the head when untied
        assert plan.parameters["embedding"] == model.embed.weight.numel() * (1 if config.tie_embeddings else 2)
    assert plan.parameters["non_embedding"] == plan.parameters["total"] - plan.parameters["embedding"]


def test_flops_per_token_match_a_direct_count():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = TransformerConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=2, seq_len=64)
    model = build_model(config).train()
    rows = torch.randint(3, 512, (4, config.seq_len + 1))
    # The math backend spells attention out as matmuls the counter sees (full score matrix, as the formula)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _ = summed_loss(model(rows[:, :-1]), rows[:, 1:], 0)
        loss.backward()
    counted = counter.get_total_flops() / (4 * config.seq_len)
    assert counted == pytest.approx(flops_per_token(config), rel=0.02)
    assert make_plan(plan_config("model={preset: tiny}")).flops_per_token == flops_per_token(
        model_for(plan_config("model={preset: tiny}")))


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_muon_state_is_one_momentum_per_block_matrix_and_adamw_two_moments_for_the_rest(arch):
    """The plan's optimizer memory follows train.optimizer: sizing's block matrices are exactly what
    raylm.train.optim gives Muon, 4 bytes each; every other parameter keeps AdamW's 8."""
    from raylm.model.sizing import block_matrix_parameters
    from raylm.plan import optimizer_state_bytes
    from raylm.train.optim import muon_parameters

    config = TransformerConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=32, arch=arch,
                               activation="relu2", qk_norm=True, bias=True, tie_embeddings=False)
    with torch.device("meta"):
        model = build_model(config)
    total = sum(p.numel() for p in model.parameters())
    matrices = sum(p.numel() for p in muon_parameters(model))
    assert block_matrix_parameters(config) == matrices
    assert optimizer_state_bytes(config, "muon") == 8 * (total - matrices) + 4 * matrices
    assert optimizer_state_bytes(config, "adamw") == 8 * total
    adamw = memory_per_worker(config, "fsdp", 2, 4, 32, False, False)
    muon = memory_per_worker(config, "fsdp", 2, 4, 32, False, False, "muon")
    assert adamw.optimizer - muon.optimizer == 4 * matrices / 2  # sharded over the two workers
    plan_muon = make_plan(plan_config("train.optimizer=muon"))
    plan_adamw = make_plan(plan_config("train.optimizer=adamw"))
    assert plan_muon.memory[0]["optimizer"] < plan_adamw.memory[0]["optimizer"]


@pytest.mark.slow
def test_ddp_memory_estimate_is_within_25_percent_of_a_measured_cpu_step():
    model = TransformerConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, seq_len=256)
    micro = 16
    estimate = memory_per_worker(model, "ddp", 1, micro, model.seq_len, bf16=False, checkpointing=False).total
    measured = measured_peak(model, micro)
    print(f"ddp estimate {estimate / 2**20:.0f} MiB, measured peak {measured / 2**20:.0f} MiB")
    assert abs(estimate - measured) / measured < 0.25

    checkpointed = TransformerConfig(**{**model.to_dict(), "activation_checkpointing": True})
    estimate_ckpt = memory_per_worker(checkpointed, "ddp", 1, micro, model.seq_len, False, True).total
    measured_ckpt = measured_peak(checkpointed, micro)
    print(f"with activation checkpointing: estimate {estimate_ckpt / 2**20:.0f} MiB, "
          f"measured {measured_ckpt / 2**20:.0f} MiB")
    assert measured_ckpt < measured and estimate_ckpt < estimate  # both move the same way
    assert (measured - measured_ckpt) / measured > 0.2  # and the saving is real, not noise


def test_memory_shrinks_with_fsdp_and_grows_with_the_micro_batch():
    model = model_for(plan_config("model={preset: 1b}"))
    ddp = memory_per_worker(model, "ddp", 8, 4, 2048, True, False)
    fsdp = memory_per_worker(model, "fsdp", 8, 4, 2048, True, False)
    assert fsdp.states < ddp.states / 4
    assert memory_per_worker(model, "ddp", 8, 8, 2048, True, False).activations == 2 * ddp.activations
    usable = 40 * 2**30
    assert fsdp.largest_micro_batch(usable) > ddp.largest_micro_batch(usable)
    assert memory_per_worker(model, "fsdp", 8, ddp.largest_micro_batch(usable), 2048, True, False).total <= usable


def test_a_budget_that_cannot_fit_the_model_is_reported_with_the_reason(capsys):
    t4 = "plan.gpu_types={T4: {peak_bf16_tflops: 65, memory_gib: 16}}"
    plain = "recipe=null"  # the 1b preset as written (the modern recipe's relu2 would drop its third FFN matrix)
    plan = make_plan(plan_config("model={preset: 1b}", t4, "plan.gpu=T4", "plan.gpus=1", "plan.hours=10", plain))
    assert not plan.feasible  # 1.04B parameters x 16 bytes of states > 90% of 16 GiB, even fully sharded
    assert not plan.recommendation
    reason = plan.reasons[0]
    assert "does not fit" in reason and "T4" in reason and "15.5 GiB" in reason
    assert any("under-trained" in r for r in plan.reasons)
    assert main(["plan", "--config", str(CONFIGS / "laptop.yaml"), "--preset", "1b", "--set", t4, "--set", plain,
                 "--gpu", "T4", "--gpus", "1", "--hours", "10"]) == 1
    assert "feasible         NO" in capsys.readouterr().out
    # the same model on two of them fits with fsdp
    two = make_plan(plan_config("model={preset: 1b}", t4, "plan.gpu=T4", "plan.gpus=2", "plan.hours=10", plain))
    assert two.feasible and two.recommendation["strategy"] == "fsdp"
    assert two.recommendation["scaling_config"]["num_workers"] == [2, 2]


def test_budget_plan_recommends_a_scaling_config_and_writes_a_runnable_config(tmp_path, capsys):
    out = tmp_path / "planned.yaml"
    code = main(["plan", "--config", str(CONFIGS / "laptop.yaml"), "--gpu", "H100", "--gpus", "8", "--hours", "24",
                 "--choose-model", "--json", "--write", str(out)])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["feasible"] and plan["model"]["preset"] in PRESETS
    budget, optimal = plan["tokens"]["budget"], plan["tokens"]["compute_optimal"]
    assert budget >= optimal  # the chosen preset is trained at least compute-optimally
    assert plan["time"]["train_hours"] == pytest.approx(24)
    recommendation = plan["recommendation"]
    assert recommendation["scaling_config"]["num_workers"][1] == 8
    written = load_config(out)
    assert written.train.strategy == recommendation["strategy"]
    assert written.train.max_workers == 8 and written.train.use_gpu is True
    assert written.train.max_steps * written.train.global_batch_size * written.model.seq_len >= budget * 0.99
    assert written.model.preset == plan["model"]["preset"]


def test_gpu_types_extend_in_config_and_unknown_types_are_config_errors(tmp_path, capsys):
    config = tmp_path / "gpus.yaml"
    config.write_text(yaml.safe_dump({"plan": {"gpu": "MI300X", "gpus": 4, "hours": 1,
                                               "gpu_types": {"MI300X": {"peak_bf16_tflops": 1307, "memory_gib": 192}}}}))
    plan = make_plan(load_config(config))
    assert plan.gpu["peak_bf16_flops"] == 1307e12 and plan.gpu["memory_bytes"] == 192 * 2**30
    assert main(["plan", "--config", str(CONFIGS / "laptop.yaml"), "--gpu", "B300"]) == 2
    assert "plan.gpu = 'B300': unknown GPU type" in capsys.readouterr().err


def test_bytes_per_token_setting_sizes_the_corpus_and_the_plan_logs_to_mlflow(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    plan = make_plan(plan_config("plan.bytes_per_token=3.5"))
    assert plan.bytes_per_token == {"value": 3.5, "source": "plan.bytes_per_token"}
    assert plan.storage_bytes["curated_data"] == pytest.approx(plan.tokens["planned"] * 3.5)
    assert main(["plan", "--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(tmp_path), "--log"]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])[0]
    assert run.info.run_name == "plan" and run.data.tags["raylm.stage"] == "plan"
    assert run.data.metrics["plan/parameters.total"] > 0 and "plan/memory.ddp.total" in run.data.metrics
    assert run.data.params["plan.mfu"] == "0.4"
    assert {"plan.json", "plan.txt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
