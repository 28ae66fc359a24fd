"""MergeCallback's ``compress`` option: every task's TSV-C update written at the merge, checked against a float64
truncation computed here, as a peft adapter of the Hugging Face model inside the module, and refused for LoRA fits."""

import json
import pickle

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge.callbacks import MergeCallback
from lightning_merge.compress import TSVC, load_compressed
from lightning_merge.io import MergeRecord
from tests._callback_helpers import EncoderClassifier, IndexedData, pretrained_state, task_loader, task_module, trainer

EXCLUDE = ["head.*"]


class Capture(Callback):
    """Keeps the module's weights at fit end, before the MergeCallback (listed after it) merges into them."""

    def __init__(self):
        self.states = []

    def on_fit_end(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def reference_delta(base, tuned, k):
    """TSV-C in float64, written plainly: the top-``k`` singular triplets of ``D = W_t - W0`` (matrices), else ``D``."""
    d = tuned.double() - base.double()
    if d.ndim != 2:
        return d
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def fit_tasks(tmp_path, merge, tasks=("alpha", "beta")):
    capture = Capture()
    for i, _ in enumerate(tasks):
        trainer(tmp_path, [capture, merge]).fit(task_module(pretrained_state()), task_loader(i))
    return dict(zip(tasks, capture.states, strict=True))


def test_the_merge_writes_each_task_compressed_as_the_float64_truncation(tmp_path):
    merge = MergeCallback("tsv_m", tasks=["alpha", "beta"], exclude=EXCLUDE, dirpath=tmp_path / "m", progress=False,
                          compress={"rank": 2})
    assert merge.compress == TSVC(rank=2)
    tuned = fit_tasks(tmp_path, merge)
    folder = tmp_path / "m" / "compressed"
    assert merge.compressed == {"alpha": folder / "alpha", "beta": folder / "beta"}
    assert sorted(p.name for p in folder.iterdir()) == ["alpha", "beta", "merge_record.json"]
    record = MergeRecord.load(folder)
    assert record.method == "tsv_c" and record.options == {"rank": 2, "energy": None, "solver": "auto"}
    assert record.tasks == ["alpha", "beta"] and record.merged_keys == list(merge.plan.merge_keys)
    base = pretrained_state()
    for task, state in tuned.items():
        assert sorted(p.name for p in merge.compressed[task].iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", "tsv_c.safetensors"]
        deltas = load_compressed(merge.compressed[task])
        assert set(deltas) == set(merge.plan.merge_keys) and not any(k.startswith("head.") for k in deltas)
        for key, delta in deltas.items():
            expected = reference_delta(base[key], state[key], 2)
            assert torch.allclose(delta.double(), expected, atol=1e-5), (task, key)
        assert torch.linalg.matrix_rank(deltas["body.0.weight"]) == 2
        config = json.loads((merge.compressed[task] / "adapter_config.json").read_text())
        assert config["target_modules"] == ["body.0", "body.2"] and config["r"] == config["lora_alpha"] == 2
    ratio = json.loads((folder / "merge_record.json").read_text())["compression"]["ratio"]
    assert 0 < ratio < 1


def test_full_rank_is_lossless_and_given_checkpoints_are_compressed_too(tmp_path):
    merge = MergeCallback("tsv_m", tasks=["alpha", "beta"], exclude=EXCLUDE, dirpath=tmp_path / "m", progress=False)
    tuned = fit_tasks(tmp_path, merge)
    given = MergeCallback("task_arithmetic", base=tmp_path / "m" / "base",
                          finetuned={t: tmp_path / "m" / f"task-0{i}-{t}" for i, t in enumerate(tuned)},
                          exclude=EXCLUDE, dirpath=tmp_path / "given", progress=False, compress=TSVC(rank=1.0))
    trainer(tmp_path, [given], max_epochs=1).fit(task_module(pretrained_state()), task_loader(0))
    for task, state in tuned.items():
        weights = load_compressed(given.compressed[task], tmp_path / "m" / "base")
        for key, value in weights.items():
            assert torch.allclose(value, state[key], atol=1e-5), (task, key)


def test_bad_options_are_clear_errors_and_the_callback_pickles():
    with pytest.raises(ValueError, match=r"Expected argument `compress` to hold TSV-C options .* but got 'rnak'"):
        MergeCallback(tasks=["a", "b"], compress={"rnak": 2})
    with pytest.raises(TypeError, match="Expected argument `compress` to be None, a TSVC or a mapping"):
        MergeCallback(tasks=["a", "b"], compress=0.1)
    with pytest.raises(ValueError, match="Expected argument `rank`"):
        MergeCallback(tasks=["a", "b"], compress={"rank": 0})
    with pytest.raises(ValueError, match="Expected task name 1 to be"):
        MergeCallback(tasks=["a", "merge_record.json"], compress={})  # it would be a folder beside the record
    merge = MergeCallback(tasks=["a", "b"], compress={"energy": 0.9})
    assert pickle.loads(pickle.dumps(merge)).compress == TSVC(energy=0.9)
    assert MergeCallback(tasks=["a", "b"]).compress is None


def test_lightning_cli_configures_compress_from_a_mapping(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    from tests._callback_helpers import TaskModule

    cli = LightningCLI(TaskModule, IndexedData, run=False, save_config_callback=None, args=[
        "--trainer.callbacks+=lightning_merge.MergeCallback", "--trainer.callbacks.tasks=[alpha,beta]",
        "--trainer.callbacks.compress={rank: 0.5}", "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}"])
    merge = next(c for c in cli.trainer.callbacks if isinstance(c, MergeCallback))
    assert merge.compress == TSVC(rank=0.5)


# ------------------------------------------------------------------------------------------------ LoRA fits
def test_lora_fits_are_refused_when_the_fit_starts(tmp_path):
    peft = pytest.importorskip("peft")

    class LoraModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = peft.get_peft_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)),
                                             peft.LoraConfig(r=2, target_modules=["0"]))

        def training_step(self, batch, batch_idx):
            raise AssertionError("the fit trained before the option was refused")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    merge = MergeCallback(tasks=["a", "b"], dirpath=tmp_path / "m", progress=False, compress={"rank": 1})
    with pytest.raises(ValueError, match="Expected full fine-tunes with argument `compress`.*LoRA.*HINT"):
        trainer(tmp_path, [merge]).fit(LoraModule(), task_loader(0))
    assert not (tmp_path / "m" / "compressed").exists()


# ------------------------------------------------------------------------------------------------ Hugging Face
def bert_config(transformers):
    return transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=37)





def token_loader(index, num_classes):
    g = torch.Generator().manual_seed(index)
    ids = torch.randint(0, 99, (16, 6), generator=g)
    return DataLoader(TensorDataset(ids, torch.randint(0, num_classes, (16,), generator=g)), batch_size=8)


def pretrained_bert(transformers):
    torch.manual_seed(0)
    return transformers.BertModel(bert_config(transformers)).eval()


def test_the_adapter_of_a_hugging_face_encoder_loads_with_peft_and_gives_the_compressed_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    classes = {"two": 2, "five": 5}
    merge = MergeCallback("tsv_m", tasks=list(classes), exclude=EXCLUDE, dirpath=tmp_path / "m", progress=False,
                          compress={"rank": 3})
    for i, n in enumerate(classes.values()):
        module = EncoderClassifier(pretrained_bert(transformers), n)
        trainer(tmp_path, [merge], max_epochs=1).fit(module, token_loader(i, n))
    base = {f"encoder.{k}": v for k, v in pretrained_bert(transformers).state_dict().items()}
    for task in classes:
        folder = merge.compressed[task]
        config = json.loads((folder / "adapter_config.json").read_text())
        assert "encoder.layer.0.attention.self.query" in config["target_modules"]  # the BertModel's own names
        assert "embeddings.word_embeddings" in config["target_modules"] and config["r"] == 3
        assert not any(name.startswith("encoder.encoder") for name in config["target_modules"])
        weights = load_compressed(folder, base)  # keyed as in the LightningModule
        assert set(weights) == set(merge.plan.merge_keys) and "encoder.encoder.layer.1.output.dense.weight" in weights
        adapted = peft.PeftModel.from_pretrained(pretrained_bert(transformers), folder).merge_and_unload()
        adapted_state, lora_keys = adapted.state_dict(), 0
        for key, value in adapted_state.items():
            module = key.removesuffix(".weight")
            if module in config["target_modules"]:
                lora_keys += 1
                assert torch.allclose(value, weights[f"encoder.{key}"], atol=1e-5), (task, key)
                assert not torch.allclose(value, base[f"encoder.{key}"], atol=1e-5), (task, key)  # it did change
            else:  # biases and norms are beside the adapter, in tsv_c.safetensors
                assert torch.equal(value, base[f"encoder.{key}"]), (task, key)
        assert lora_keys == len(config["target_modules"]) > 10
