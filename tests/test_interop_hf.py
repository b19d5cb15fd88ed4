"""Files that transformers and PEFT write, read by torchkeep: tied weights, adapters, classification heads.

Every model is built from a tiny config with random initialization; ``save_pretrained`` /
``from_pretrained`` only ever see local temporary folders.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchkeep

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# peft's get_peft_model reads transformers' deprecated is_gradient_checkpointing (not torchkeep's doing)
PEFT_WARNINGS = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
TINY_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 100,
}


def gpt2_config() -> Any:
    return transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0
    )


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(gpt2_config()).save_pretrained(folder)
    return folder


# --- tied weights: GPT-2 as transformers writes it --------------------------------------------


def test_gpt2_file_stores_the_tied_weight_once(gpt2_folder: Path) -> None:
    keys = torchkeep.load_weights(gpt2_folder / "model.safetensors")
    assert "transformer.wte.weight" in keys
    assert "lm_head.weight" not in keys


def test_load_into_gpt2_fills_lm_head_through_wte(gpt2_folder: Path) -> None:
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(gpt2_config())
    report = torchkeep.load_into(model, gpt2_folder / "model.safetensors")
    assert report.ok
    assert report.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert report.missing == ()
    assert "1 through a tied twin" in report.headline()
    assert model.lm_head.weight is model.transformer.wte.weight

    reference = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    model.eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_gpt2_still_strict_for_a_genuinely_missing_key(gpt2_folder: Path) -> None:
    state = torchkeep.load_weights(gpt2_folder / "model.safetensors")
    del state["transformer.ln_f.bias"]
    model = transformers.GPT2LMHeadModel(gpt2_config())
    with pytest.raises(torchkeep.KeyMismatchError) as caught:
        torchkeep.load_into(model, state)
    assert caught.value.missing == ["transformer.ln_f.bias"]


def test_diff_of_the_hf_file_and_a_torchkeep_save_reports_tied_not_only_in_b(
    gpt2_folder: Path, tmp_path: Path
) -> None:
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder)
    torchkeep.save_weights(model, tmp_path / "tk.safetensors")
    hf_file = gpt2_folder / "model.safetensors"
    result = torchkeep.diff(hf_file, tmp_path / "tk.safetensors")
    assert result.only_a == ()
    assert result.only_b == ()
    assert result.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert result.identical

    done = subprocess.run(
        [sys.executable, "-m", "torchkeep", "diff", str(hf_file), str(tmp_path / "tk.safetensors")],
        capture_output=True,  # stdout is a pipe, as in `torchkeep diff a b | grep tied`
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "0 only in B" in done.stdout
    assert any(line.split()[:2] == ["tied", "lm_head.weight"] for line in done.stdout.splitlines())


# --- PEFT adapters ----------------------------------------------------------------------------


def lora_config() -> Any:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")


def bert_base(folder: Path) -> nn.Module:
    model: nn.Module = transformers.BertForSequenceClassification.from_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model folder, adapter folder) with non-zero LoRA B matrices, so outputs differ from the base."""
    with warnings.catch_warnings():  # see PEFT_WARNINGS; fixtures do not take marks
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        torch.manual_seed(0)
        base_folder = tmp_path_factory.mktemp("bert")
        transformers.BertForSequenceClassification(
            transformers.BertConfig(**TINY_BERT, num_labels=3)
        ).save_pretrained(base_folder)
        tuned = peft.get_peft_model(bert_base(base_folder), lora_config())
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.normal_()
    adapter_folder = tmp_path_factory.mktemp("lora")
    tuned.save_pretrained(adapter_folder)
    return base_folder, adapter_folder


def fresh_peft(base_folder: Path, **kwargs: Any) -> nn.Module:
    torch.manual_seed(7)
    model: nn.Module = peft.get_peft_model(bert_base(base_folder), lora_config(), **kwargs)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out


@PEFT_WARNINGS
@pytest.mark.parametrize("where", ["folder", "file"])
def test_adapter_loads_like_peft_own_from_pretrained(adapter: tuple[Path, Path], where: str) -> None:
    base_folder, adapter_folder = adapter
    saved = torchkeep.load_weights(adapter_folder / "adapter_model.safetensors")
    model = fresh_peft(base_folder)
    source = adapter_folder if where == "folder" else adapter_folder / "adapter_model.safetensors"
    report = torchkeep.load_into(model, source)

    assert report.adapter == "default"
    assert len(report.loaded) == len(saved) == 10
    assert report.missing == ()
    assert report.unexpected == ()
    assert report.renamed == {}
    assert report.headline().startswith("adapter 'default': 10 of 10 keys loaded from ")
    assert len(report.base_kept) > 0
    assert all(".default." not in k for k in report.base_kept)
    state = model.state_dict()
    for file_key, tensor in saved.items():
        if ".lora_" in file_key:
            model_key = file_key.replace(".weight", ".default.weight")
        else:  # modules_to_save: the classifier's trained copy
            model_key = file_key.replace("classifier.", "classifier.modules_to_save.default.")
        assert torch.equal(state[model_key], tensor), file_key

    reference = peft.PeftModel.from_pretrained(bert_base(base_folder), adapter_folder)
    assert torch.equal(logits(model), logits(reference))
    assert not torch.equal(logits(model), logits(bert_base(base_folder)))


@PEFT_WARNINGS
def test_a_missing_adapter_key_still_fails_strict(adapter: tuple[Path, Path], tmp_path: Path) -> None:
    base_folder, adapter_folder = adapter
    saved = dict(torchkeep.load_weights(adapter_folder / "adapter_model.safetensors"))
    dropped = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"
    del saved[dropped]
    shutil.copy(adapter_folder / "adapter_config.json", tmp_path / "adapter_config.json")
    save_file({k: v.contiguous() for k, v in saved.items()}, str(tmp_path / "adapter_model.safetensors"))

    model = fresh_peft(base_folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(torchkeep.KeyMismatchError) as caught:
        torchkeep.load_into(model, tmp_path)
    assert caught.value.missing == [dropped.replace(".weight", ".default.weight")]
    assert caught.value.unexpected == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    report = torchkeep.load_into(model, tmp_path, strict=False)
    assert report.headline().startswith("adapter 'default': 9 of 10 keys loaded")


@PEFT_WARNINGS
def test_adapter_name_is_put_back_as_asked(adapter: tuple[Path, Path]) -> None:
    base_folder, adapter_folder = adapter
    model = fresh_peft(base_folder, adapter_name="mine")
    report = torchkeep.load_into(model, adapter_folder, adapter_name="mine")
    assert report.adapter == "mine"
    assert all(".mine." in k for k in report.loaded)
    reference = peft.PeftModel.from_pretrained(bert_base(base_folder), adapter_folder)
    assert torch.equal(logits(model), logits(reference))

    with pytest.raises(torchkeep.KeyMismatchError, match=r"no adapter named 'default' .*\['mine'\]"):
        torchkeep.load_into(model, adapter_folder)


@PEFT_WARNINGS
def test_adapter_name_reads_a_state_dict_as_an_adapter(adapter: tuple[Path, Path]) -> None:
    base_folder, adapter_folder = adapter
    state = torchkeep.load_weights(adapter_folder / "adapter_model.safetensors")
    model = fresh_peft(base_folder)
    report = torchkeep.load_into(model, state, adapter_name="default")
    assert report.headline().startswith("adapter 'default': 10 of 10 keys loaded from state dict")
    with pytest.raises(torchkeep.KeyMismatchError):  # without it, the base model's keys are missing
        torchkeep.load_into(fresh_peft(base_folder), state)


def test_an_adapter_into_a_model_without_adapters_says_to_wrap_it(adapter: tuple[Path, Path]) -> None:
    base_folder, adapter_folder = adapter
    with pytest.raises(torchkeep.KeyMismatchError, match=r"peft\.get_peft_model"):
        torchkeep.load_into(bert_base(base_folder), adapter_folder, strict=False)


def test_an_adapter_folder_without_its_file_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(torchkeep.ModelFileNotFoundError):
        torchkeep.load_into(nn.Linear(2, 2), tmp_path)


# --- classification heads ---------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_only_heads_changed(before: dict[str, torch.Tensor], model: nn.Module, heads: list[str]) -> None:
    after = model.state_dict()
    head_keys = {k for k in after if any(k.startswith(h + ".") for h in heads)}
    assert set(before) - head_keys == set(after) - head_keys
    for key in set(after) - head_keys:
        assert torch.equal(after[key], before[key]), key


def test_vit_for_image_classification_gets_a_new_classifier_and_num_labels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        **{k: v for k, v in TINY_BERT.items() if k != "vocab_size"}, image_size=32, patch_size=8, num_labels=5
    )
    model = transformers.ViTForImageClassification(config)
    before, old = snapshot(model), model.classifier
    torchkeep.freeze(model)
    torchkeep.replace_head(model, 7)

    assert torchkeep.head_names(model) == ["classifier"]
    assert model.classifier is not old
    assert model.classifier.out_features == 7
    assert model.config.num_labels == 7
    assert len(model.config.id2label) == 7
    assert model.num_labels == 7
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "classifier.weight",
        "classifier.bias",
    }
    assert_only_heads_changed(before, model, ["classifier"])
    pixels = torch.randn(2, 3, 32, 32)
    out = model(pixel_values=pixels, labels=torch.tensor([6, 0]))
    assert out.logits.shape == (2, 7)
    out.loss.backward()
    assert model.classifier.weight.grad is not None

    model.save_pretrained(tmp_path)
    again = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(again(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


def test_bert_for_sequence_classification_gets_a_new_classifier() -> None:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY_BERT, num_labels=3))
    before = snapshot(model)
    torchkeep.replace_head(model, 4)
    assert torchkeep.head_names(model) == ["classifier"]
    assert model.config.num_labels == 4
    assert model.num_labels == 4
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert_only_heads_changed(before, model, ["classifier"])
    assert logits(model).shape == (2, 4)


def test_gpt2_for_sequence_classification_score_is_replaced() -> None:
    torch.manual_seed(0)
    config = gpt2_config()
    config.num_labels, config.pad_token_id = 3, 0
    model = transformers.GPT2ForSequenceClassification(config)
    before = snapshot(model)
    torchkeep.replace_head(model, 6)
    assert torchkeep.head_names(model) == ["score"]
    assert model.score.bias is None
    assert model.config.num_labels == 6
    assert_only_heads_changed(before, model, ["score"])
    ids = torch.randint(1, 100, (2, 8))
    with torch.no_grad():
        assert model.eval()(input_ids=ids).logits.shape == (2, 6)
