"""MergeCallback with LoRA fits: adapters are recorded and merged as ``scale * B @ A``, and the module ends at
``W0 + lam * M``."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge import get_method
from lightning_merge.callbacks import MergeCallback
from lightning_merge.lora import load_adapter
from tests._callback_helpers import trainer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TASKS = ("alpha", "beta", "gamma")
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def tiny_llama():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=4, vocab_size=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


class LoraLM(pl.LightningModule):
    """A causal LM with a peft LoRA adapter; only the factors train."""

    def __init__(self, seed: int, **lora_options):
        super().__init__()
        base = tiny_llama()
        torch.manual_seed(seed)  # each task's lora_A starts differently
        options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora_options}
        self.model = peft.get_peft_model(base, peft.LoraConfig(**options))

    def forward(self, ids):
        return self.model(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=2e-2)


def token_loader(index: int) -> DataLoader:
    g = torch.Generator().manual_seed(10 + index)
    ids = (torch.arange(12) * (index + 1) + torch.randint(0, 64, (32, 1), generator=g)) % 64  # a task-specific stride
    return DataLoader(TensorDataset(ids), batch_size=8)


def fit_tasks(tmp_path, merge, **lora_options):
    modules = []
    for i, _ in enumerate(merge.tasks):
        module = LoraLM(seed=i, **lora_options)
        trainer(tmp_path, [merge], max_epochs=1, max_steps=3).fit(module, token_loader(i))
        modules.append(module)
    return modules


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def dense_reference(method, folders):
    """W0 + method.merge(dense D_t) for every adapted module, from the recorded adapters, in a fresh base model."""
    adapters = [load_adapter(folder) for folder in folders]
    model = tiny_llama()
    state = model.state_dict()
    for name in adapters[0].modules:
        state[f"{name}.weight"] = state[f"{name}.weight"] + method.merge([a.modules[name].delta() for a in adapters])
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize(("name", "options"), [("tsv_m", {"scaling": 0.8}), ("task_arithmetic", {"scaling": 0.5})])
def test_lora_fits_are_merged_as_adapters(tmp_path, name, options):
    merge = MergeCallback(name, options, tasks=TASKS, dirpath=tmp_path / "m", progress=False)
    modules = fit_tasks(tmp_path, merge)
    folders = [tmp_path / "m" / f"task-{i:02d}-{t}" for i, t in enumerate(TASKS)]
    assert merge.collected == list(TASKS) and all((f / "adapter_config.json").is_file() for f in folders)
    assert not (tmp_path / "m" / "base").exists()  # the frozen base stays in the module
    assert all(load_adapter(f).modules["model.layers.0.mlp.up_proj"].lora_B.abs().sum() > 0 for f in folders)

    ids = torch.randint(0, 64, (2, 9))
    merged = modules[-1].eval()
    expected = logits(dense_reference(get_method(name, **options), folders), ids)
    assert torch.allclose(merged(ids), expected, atol=1e-4)
    assert not torch.allclose(expected, logits(tiny_llama(), ids), atol=1e-3)  # the merge changed something
    for layer in merged.modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer):
            assert not layer.lora_B["default"].weight.any()

    via_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "m" / "merged_adapter").eval()
    assert torch.allclose(logits(via_peft, ids), expected, atol=1e-4)
    assert merge.merged_adapter is not None and merge.merge_seconds > 0 and merge.heads == {}


def test_lora_layers_outside_a_peft_model_are_refused(tmp_path):
    module = LoraLM(seed=0)
    module.model = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["q_proj"]), tiny_llama())
    merge = MergeCallback("tsv_m", tasks=TASKS, dirpath=tmp_path / "m", progress=False)
    with pytest.raises(ValueError, match="belong to a peft.PeftModel"):
        trainer(tmp_path, [merge], max_steps=1).fit(module, token_loader(0))


@pytest.mark.parametrize(
    ("method", "lora_options", "match"),
    [
        ("ties", {}, "Expected argument `method` to be one of"),
        ("tsv_m", {"use_dora": True}, "`use_dora` to be unset"),
        ("tsv_m", {"modules_to_save": ["lm_head"]}, "`modules_to_save` to be unset"),
    ],
)
def test_lora_fits_that_cannot_be_merged_fail_before_training(tmp_path, method, lora_options, match):
    merge = MergeCallback(method, tasks=TASKS, dirpath=tmp_path / "m", progress=False)
    module = LoraLM(seed=0, **lora_options)
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, [merge], max_steps=1).fit(module, token_loader(0))
    assert merge.collected == []


def test_trainable_base_weights_are_refused(tmp_path):
    merge = MergeCallback("tsv_m", tasks=TASKS, dirpath=tmp_path / "m", progress=False)
    module = LoraLM(seed=0)
    module.model.get_base_model().model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="only the LoRA factors .* trainable.*norm.weight"):
        trainer(tmp_path, [merge], max_steps=1).fit(module, token_loader(0))
