"""Protects `shotdistill plan`: its parameter and optimizer figures against DeepSpeed's own estimators on a
tiny model, and a plan of the Wan2.1-1.3B recipe chain on 8 and 32 GPUs from a config-only Wan root."""

import json
import re

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from omegaconf import OmegaConf

from distill.config import load_recipe
from distill.memory import WAN_1_3B_CONFIG, count_model, parse_bytes, trained_states, transformer_config
from distill.models import build_student, build_teacher
from launch.cli import main


def _ds(stage, offload_optimizer=False, offload_params=False):
    return OmegaConf.create(dict(zero_stage=stage, offload_optimizer=offload_optimizer, offload_params=offload_params))


def test_counts_and_states_match_deepspeeds_estimators():
    cfg = load_recipe("recipes/tiny/dmd-inter.yaml", ["lora.rank=4"])
    config = transformer_config(cfg)
    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    student = build_student(cfg, teacher)
    counts = count_model(config, "student", cfg)
    assert (counts.total, counts.largest_layer) == model_to_params(student)  # DeepSpeed's own count
    assert counts.trainable == counts.total
    teacher.set_trainable()
    assert count_model(config, "teacher", cfg).trainable == sum(p.numel() for p in teacher.parameters()
                                                                if p.requires_grad)
    from distill.stages.dmd import add_lora

    add_lora(teacher.transformer, cfg.lora)
    lora = sum(p.numel() for n, p in teacher.named_parameters() if "lora_" in n)
    assert count_model(config, "critic", cfg).trainable == lora
    p, layer, gpus = counts.total, counts.largest_layer, 8
    for stage, offload in [(2, False), (2, True), (1, False), (3, False), (3, True)]:
        states = trained_states("student", counts, _ds(stage, offload, offload and stage == 3), gpus, 8)
        if stage == 3:
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(p, layer, num_gpus_per_node=gpus, cpu_offload=offload,
                                                                cpu_offload_params=offload)
            weights = 4 * layer + (0 if offload else 2 * p / gpus)
        else:
            cpu, gpu = estimate_zero2_model_states_mem_needs(p, num_gpus_per_node=gpus, cpu_offload=offload)
            weights = 2 * p
        assert states.gpu == pytest.approx(gpu) and states.cpu == cpu, (stage, offload)
        assert states.weights == pytest.approx(weights)
        assert states.optimizer == pytest.approx(0 if offload else 12 * p / gpus)  # fp32 master + Adam m, v
    # a teacher training its self-attention only: frozen weights stay whole bf16 copies under ZeRO-2
    t = count_model(config, "teacher", cfg)
    states = trained_states("teacher", t, _ds(2), gpus, 8)
    assert states.weights == 2 * t.total and states.optimizer == pytest.approx(12 * t.trainable / gpus)


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2 ** 30 and parse_bytes("141GB") == 141 * 10 ** 9
    assert parse_bytes("80") == 80 * 2 ** 30
    with pytest.raises(ValueError, match="--gpu-memory 'lots'"):
        parse_bytes("lots")


@pytest.mark.parametrize("gpus", [8, 32])
def test_plan_of_the_wan_recipes(tmp_path, capsys, gpus):
    (tmp_path / "wan" / "transformer").mkdir(parents=True)
    (tmp_path / "wan" / "transformer" / "config.json").write_text(json.dumps(WAN_1_3B_CONFIG))
    # dmd-inter.yaml needs every other Wan recipe: the plan covers the whole chain
    code = main(["plan", "recipes/wan2.1-1.3b/dmd-inter.yaml", "--gpus", str(gpus), f"model.path={tmp_path / 'wan'}",
                 f"data.manifest={tmp_path / 'manifest.jsonl'}", f"run.out={tmp_path / 'runs'}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"on {gpus} GPUs" in out and "ESTIMATES" in out
    for folder in ("prepare", "teacher", "ode-pairs", "causal-init", "dmd-intra", "dmd-inter"):
        assert f"### {folder} (stage" in out
    # 30 blocks of 12 x 128: Wan2.1-1.3B's 1.419B parameters, whatever each stage trains of them
    assert re.search(r"\| teacher \| trained, ZeRO-\d[^|]* \| 1\.419B \|", out)
    assert re.search(r"\| real score \| frozen, [^|]* \| 1\.419B \| 0 \|", out)
    assert out.count("-> fits") + out.count("-> DOES NOT FIT") == 5  # every stage that runs the transformer
