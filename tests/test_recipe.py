"""The training recipe options (issue 23): model keys, Muon, the WSD schedule, compute budgets, the named
recipes, and that configs which use none of them hash as before. All in-process and tiny."""

from __future__ import annotations

import math

import pytest
import torch

from raylm.config import BudgetConfig, ConfigError, TrainConfig, load_config
from raylm.model import TransformerConfig, build_model
from raylm.model.sizing import flops_per_token, parameter_count
from raylm.plan import make_plan
from raylm.train.budget import budget_steps, steps_for_minutes
from raylm.train.optim import OptimizerSet, build_optimizer, learning_rate, muon_parameters, set_learning_rates

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=2, seq_len=16)


def tiny(**overrides) -> tuple[torch.nn.Module, TransformerConfig]:
    torch.manual_seed(0)
    config = TransformerConfig(**{**TINY, **overrides})
    return build_model(config), config


def test_qk_norm_normalises_each_heads_queries_and_keys():
    model, config = tiny(qk_norm=True)
    attention = model.blocks[0].attn
    assert attention.q_norm.weight.shape == (config.head_dim,) and attention.k_norm.weight.shape == (config.head_dim,)
    seen = {}
    attention.q_norm.register_forward_hook(lambda module, args, out: seen.setdefault("q", out))
    model(torch.randint(0, 50, (2, 8)))
    rms = seen["q"].pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)  # unit RMS per head at init (weight 1)
    assert parameter_count(config).total == sum(p.numel() for p in model.parameters())


def test_logit_softcap_bounds_the_logits_and_changes_little_inside():
    model, _ = tiny()
    capped, _ = tiny(logit_softcap=2.0)
    capped.load_state_dict(model.state_dict())
    with torch.no_grad():
        for param in (model.head.weight,):
            param.mul_(200)  # large logits
        capped.load_state_dict(model.state_dict())
        tokens = torch.randint(0, 50, (2, 8))
        plain, soft = model(tokens), capped(tokens)
    assert plain.abs().max() > 2 and soft.abs().max() <= 2
    assert torch.allclose(soft, 2 * torch.tanh(plain / 2))


def test_untied_head_and_zero_init_projections_make_each_block_start_as_identity():
    model, config = tiny(tie_embeddings=False, zero_init_projections=True)
    assert model.head.weight is not model.embed.weight
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.proj.weight) == 0 and torch.count_nonzero(block.ffn.down.weight) == 0
        assert torch.count_nonzero(block.attn.qkv.weight) > 0
    embedded = model.norm(model.embed(torch.tensor([[3, 4]])))
    assert torch.allclose(model(torch.tensor([[3, 4]])), model.head(embedded))
    assert parameter_count(config).embedding == 2 * TINY["vocab_size"] * TINY["d_model"]


def test_relu2_feed_forward_is_relu_squared():
    model, config = tiny(activation="relu2")
    ffn = model.blocks[0].ffn
    x = torch.randn(3, config.d_model)
    assert torch.allclose(ffn(x), ffn.down(torch.relu(ffn.up(x)) ** 2))
    assert config.hidden == 4 * config.d_model
    assert parameter_count(config).total == sum(p.numel() for p in model.parameters())


def test_recipe_keys_are_quiet_at_their_defaults():
    section = TransformerConfig(**TINY).section()
    assert not {"qk_norm", "logit_softcap", "zero_init_projections"} & set(section)
    default_train = load_config(None, ["recipe=null"]).section("train")  # laptop.yaml names the modern recipe
    assert not {"budget", "schedule", "decay_fraction", "optimizer", "muon_lr", "muon_momentum"} & set(default_train)
    modern = load_config(None, ["recipe=modern"])
    assert modern.section("model")["qk_norm"] is True and modern.section("train")["optimizer"] == "muon"


def test_recipes_fill_in_what_the_file_does_not_set():
    config = load_config(None, ["recipe=modern", "model.activation=swiglu", "train.schedule=cosine"])
    assert config.model.activation == "swiglu" and config.train.schedule == "cosine"  # keys given win
    assert config.model.qk_norm and config.train.optimizer == "muon" and config.model.d_model == 192
    baseline = load_config(None, ["recipe=gpt2"])
    assert (baseline.model.position, baseline.model.norm, baseline.model.activation) == ("learned", "layernorm", "gelu")
    with pytest.raises(ConfigError, match="recipe = 'fast': expected one of gpt2, modern"):
        load_config(None, ["recipe=fast"])


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model, _ = tiny(tie_embeddings=False, position="learned")
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "muon", muon_lr=0.02, muon_momentum=0.9)
    assert isinstance(optimizer, OptimizerSet)
    muon, adamw = list(optimizer)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    matrices = {id(p) for p in muon_parameters(model)}
    assert matrices == {id(p) for p in muon.param_groups[0]["params"]}
    for name, param in model.named_parameters():
        in_muon = id(param) in matrices
        assert in_muon == (name.startswith("blocks.") and param.dim() == 2), name
    assert len(matrices) + sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))
    assert muon.param_groups[0]["momentum"] == 0.9

    set_learning_rates(optimizer, 0.5, 1e-3, 0.02)
    assert muon.param_groups[0]["lr"] == 0.01 and all(g["lr"] == 5e-4 for g in adamw.param_groups)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters() if p.dim() == 2)


def test_muon_optimizer_state_saves_and_loads_through_dcp_state_dicts():
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, _ = tiny()
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "muon")
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    optimizer.step()
    model_state, optim_state = get_state_dict(model, optimizer)
    fresh, _ = tiny()
    fresh_optimizer = build_optimizer(fresh, 1e-3, 0.1, (0.9, 0.95), "muon")
    set_state_dict(fresh, fresh_optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    buffers = [s["momentum_buffer"] for s in list(fresh_optimizer)[0].state.values()]
    assert buffers and all(torch.count_nonzero(b) > 0 for b in buffers)


def _muon_steps_under_fsdp(rank: int, world: int, port: int, out: str) -> None:
    """One of `world` gloo processes: the tiny model sharded by raylm's FSDP2 wrapping, three Muon steps on
    this rank's half of the batch; rank 0 saves the gathered weights."""
    import os

    import torch.distributed as dist

    from raylm.train.parallel import wrap_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, _ = tiny(tie_embeddings=False)
        model = wrap_model(model, "fsdp", torch.device("cpu"), bf16=False, compile_model=False)
        optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "muon")
        assert type(list(optimizer)[0]).__name__ == "GatheredMuon"
        batch = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            model(batch[rank * 2:(rank + 1) * 2]).float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        weights = {name: p.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:
            torch.save(weights, out)
    finally:
        dist.destroy_process_group()


def test_muon_under_fsdp2_steps_exactly_as_on_one_unsharded_worker(tmp_path):
    """Issue 23: Muon under FSDP2 (each worker holds a row shard of every matrix) gathers each matrix's update
    and orthogonalises it whole, so two sharded workers end where one worker with the whole batch does."""
    import torch.multiprocessing as mp

    from tests.s3_server import free_port

    out = str(tmp_path / "fsdp.pt")
    mp.spawn(_muon_steps_under_fsdp, args=(2, free_port(), out), nprocs=2)
    model, _ = tiny(tie_embeddings=False)
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "muon")
    batch = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        ((model(batch[:2]).float().pow(2).mean() + model(batch[2:]).float().pow(2).mean()) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
    sharded = torch.load(out, weights_only=True)
    for name, param in model.named_parameters():
        assert torch.allclose(param.detach(), sharded[name], atol=1e-5), (name, (param - sharded[name]).abs().max())
    assert load_config(None, ["train.optimizer=muon", "train.strategy=fsdp"]).train.optimizer == "muon"


def test_wsd_holds_the_peak_then_cools_down_linearly():
    lrs = [learning_rate(s, 1.0, 10, 100, 0.1, schedule="wsd", decay_fraction=0.2) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0
    assert all(lr == 1.0 for lr in lrs[10:80])
    assert lrs[80] == 1.0 and lrs[90] == pytest.approx(0.55) and lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))
    # the stable phase does not depend on the run's length: extend it, and only the cool-down moves
    longer = [learning_rate(s, 1.0, 10, 200, 0.1, schedule="wsd", decay_fraction=0.2) for s in range(80)]
    assert longer == lrs[:80]
    assert learning_rate(50, 1.0, 10, None, 0.1) == 1.0  # a minutes budget before its step count is fixed


def test_schedule_and_optimizer_names_are_checked():
    with pytest.raises(ConfigError, match=r"train.schedule"):
        load_config(None, ["train.schedule=linear"])
    with pytest.raises(ConfigError, match=r"train.optimizer"):
        load_config(None, ["train.optimizer=sgd"])


# ----------------------------------------------------------------------------------------------
# Budgets


def test_budgets_become_steps_from_flops_per_token_and_the_global_batch():
    config = TransformerConfig(**{**TINY, "seq_len": 64})
    per_step = 8 * 64
    assert budget_steps(BudgetConfig(tokens=per_step * 10.5), config, 8) == 10  # rounded down: fits the budget
    flops = flops_per_token(config) * per_step * 7
    assert budget_steps(BudgetConfig(flops=flops), config, 8) == 7
    params = parameter_count(config).total
    assert budget_steps(BudgetConfig(tokens_per_parameter=20), config, 8) == math.floor(20 * params / per_step)
    assert budget_steps(BudgetConfig(minutes=5), config, 8) is None
    assert budget_steps(BudgetConfig(tokens=1), config, 8) == 1
    assert steps_for_minutes(1.0, 10, 0.5) == 120 and steps_for_minutes(0.001, 10, 0.5) == 10


def test_budget_config_errors_name_the_keys():
    with pytest.raises(ConfigError, match=r"train.max_steps = 200 and train.budget.tokens = 1e\+06 both set"):
        load_config(None, ["train.budget.tokens=1e6"])  # laptop.yaml sets max_steps
    config = load_config(None, ["train.max_steps=null", "train.budget.tokens=1e6"])
    assert config.train.budget.kind == "tokens" and "budget" in config.section("train")
    with pytest.raises(ConfigError, match=r"train.budget = .*expected exactly one of flops, tokens, "
                                          r"tokens_per_parameter, minutes, got tokens, minutes"):
        load_config(None, ["train.max_steps=null", "train.budget.tokens=1e6", "train.budget.minutes=3"])
    with pytest.raises(ConfigError, match=r"train.budget.minutes = -1"):
        load_config(None, ["train.max_steps=null", "train.budget.minutes=-1"])


def test_launcher_fixes_max_steps_from_the_budget():
    from raylm.train.launch import with_budget_steps

    model = TransformerConfig(**TINY)
    train = TrainConfig(budget=BudgetConfig(tokens=16 * 4 * 25))
    assert with_budget_steps(train, model, 4).max_steps == 25
    minutes = TrainConfig(budget=BudgetConfig(minutes=2))
    assert with_budget_steps(minutes, model, 4).max_steps == minutes.max_steps  # fixed by the loop instead


def test_plan_reads_train_budget():
    config = load_config(None, ["train.max_steps=null", "train.budget.tokens_per_parameter=20"])
    plan = make_plan(config)
    assert plan.tokens["budget"] == pytest.approx(plan.tokens["compute_optimal"])
    minutes = load_config(None, ["train.max_steps=null", "train.budget.minutes=60", "plan.gpu=H100", "plan.gpus=1"])
    hours = load_config(None, ["plan.hours=1", "plan.gpu=H100", "plan.gpus=1"])
    assert make_plan(minutes).tokens["budget"] == pytest.approx(make_plan(hours).tokens["budget"])
    with pytest.raises(ConfigError, match=r"plan.hours = 1.0 and train.budget.minutes = 60 both set the budget"):
        make_plan(load_config(None, ["train.max_steps=null", "train.budget.minutes=60", "plan.hours=1",
                                     "plan.gpu=H100"]))
    with pytest.raises(ConfigError, match=r"train.budget.minutes = 60: raylm plan needs plan.gpu"):
        make_plan(minutes.model_copy(update={"plan": minutes.plan.model_copy(update={"gpu": None})}))
