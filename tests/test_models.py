import pytest
import torch

from slimtune.models import (
    LoraSettings,
    apply_lora,
    choose_device,
    choose_dtype,
    device_for_rank,
    embedded_gguf_path,
    load_model,
    loading,
    lora_target_modules,
)


def test_embedded_gguf_is_found_without_importing_its_package():
    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6


def test_lora_targets_the_attention_projections_and_trains_only_adapters(tiny):
    model, _ = tiny
    assert lora_target_modules(model) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    peft_model = apply_lora(type(model)(model.config), LoraSettings(r=4, alpha=8))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_unknown_architecture_falls_back_to_every_linear_layer_but_the_head():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(4, 4)
            self.lm_head = torch.nn.Linear(4, 8)

    assert lora_target_modules(Odd()) == ["mix"]


def test_cpu_defaults_to_fp32_and_overrides_are_honoured():
    assert choose_dtype(torch.device("cpu")) == torch.float32
    assert choose_dtype(torch.device("cpu"), "bf16") == torch.bfloat16


def test_every_process_of_a_launch_gets_its_own_gpu_never_all_the_first():
    assert [device_for_rank(rank, 4) for rank in range(4)] == [torch.device("cuda", i) for i in range(4)]
    assert device_for_rank(5, 4) == torch.device("cuda", 1), "more processes than GPUs share them round robin"
    assert device_for_rank(3, 0) == torch.device("cpu")


def test_the_chosen_device_follows_accelerates_local_process_index(monkeypatch):
    import accelerate

    class SecondProcess:
        local_process_index = 1

        def __init__(self, cpu: bool = False):
            pass

    monkeypatch.setattr(accelerate, "PartialState", SecondProcess)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert choose_device() == torch.device("cuda", 1)
    assert choose_device("cpu") == torch.device("cpu"), "an explicit device wins"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert choose_device() == torch.device("cpu")


def test_a_device_map_other_than_auto_is_refused_by_name():
    with pytest.raises(ValueError, match="device_map must be 'auto'"):
        load_model("tiny", device_map="balanced")


def test_interrupted_build_leaves_nothing_that_looks_finished(tmp_path):
    def crash(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        loading._publish(crash, tmp_path / "model")
    assert not (tmp_path / "model").exists() and list(tmp_path.iterdir()) == []


def test_building_a_cached_model_leaves_a_seeded_runs_random_numbers_alone(tmp_path):
    def build(out):
        torch.manual_seed(123)
        torch.nn.Linear(64, 64)  # random init, as building a model does
        (out / "config.json").write_text("{}")

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    loading._publish(build, tmp_path / "model")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
def test_embedded_model_answers_sensibly_and_reloads_fast_from_the_cache():
    import time

    from slimtune.models import load_model

    load_model("smollm2")  # converts once if needed
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2")
    assert time.perf_counter() - start < 10
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12*3?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    assert "36" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
