"""MergeCallback with Hugging Face transformers inside the LightningModule: the merged folder is a transformers model
folder, the LoRA merge a plain peft adapter, and each task's head is kept in both modes."""

import json

import lightning.pytorch as pl
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge.callbacks import MergeCallback
from lightning_merge.io import MergeRecord
from tests._callback_helpers import EncoderClassifier, trainer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CLASSES = {"two": 2, "five": 5}  # one head shape per task
EXCLUDE = ["head.*"]


def bert_config():
    return transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=37)


def pretrained_folder(tmp_path):
    """A local pre-trained model folder with a tokenizer, as ``AutoModel.from_pretrained`` reads it."""
    folder = tmp_path / "pretrained"
    torch.manual_seed(0)
    transformers.BertModel(bert_config()).save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(94))]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    return folder





def loader(index, num_classes):
    g = torch.Generator().manual_seed(index)
    ids = torch.randint(0, 99, (16, 6), generator=g)
    return DataLoader(TensorDataset(ids, torch.randint(0, num_classes, (16,), generator=g)), batch_size=8)


def files_of(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_full_fine_tunes_give_a_hugging_face_model_folder(tmp_path):
    folder = pretrained_folder(tmp_path)
    merge = MergeCallback("tsv_m", tasks=list(CLASSES), exclude=EXCLUDE, dirpath=tmp_path / "m", progress=False)
    for i, n in enumerate(CLASSES.values()):
        module = EncoderClassifier(transformers.AutoModel.from_pretrained(folder), n)
        trainer(tmp_path, [merge], max_epochs=1).fit(module, loader(i, n))
    merged = tmp_path / "m" / "merged"
    model, info = transformers.AutoModel.from_pretrained(merged, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    expected = module.encoder.state_dict()
    assert set(model.state_dict()) == set(expected)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert not torch.equal(expected["encoder.layer.0.attention.self.query.weight"],
                           transformers.AutoModel.from_pretrained(folder).state_dict()[
                               "encoder.layer.0.attention.self.query.weight"])  # the merge changed the encoder
    saved = load_file(merged / "model.safetensors")
    assert not [k for k in saved if k.startswith("encoder.encoder")]  # transformers' names, no module prefix
    fresh = transformers.BertModel(bert_config())
    fresh.load_state_dict(saved, strict=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    assert tokenizer("w1 w2")["input_ids"] == transformers.AutoTokenizer.from_pretrained(folder)("w1 w2")["input_ids"]
    assert (merged / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    for task, n in CLASSES.items():
        head = load_file(merged / "heads" / f"{task}.safetensors")
        assert head["head.weight"].shape == (n, 32)
        assert torch.equal(head["head.weight"], merge.heads[task]["head.weight"])
    record = MergeRecord.load(merged)
    assert sorted(record.outputs) == files_of(merged) and "tokenizer_config.json" in record.outputs
    assert record.tasks == list(CLASSES)


class CausalLM(pl.LightningModule):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def training_step(self, batch, batch_idx):
        return self.lm(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_tied_embeddings_are_saved_once_and_sharded(tmp_path):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=4, vocab_size=64, tie_word_embeddings=True)
    merge = MergeCallback("tsv_m", tasks=["a", "b"], dirpath=tmp_path / "m", max_shard_size=16_000, progress=False)
    for i in range(2):
        torch.manual_seed(0)
        module = CausalLM(transformers.LlamaForCausalLM(config))
        ids = torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(i))
        trainer(tmp_path, [merge], max_epochs=1).fit(module, DataLoader(TensorDataset(ids), batch_size=4))
    merged = tmp_path / "m" / "merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and "lm_head.weight" not in index["weight_map"]
    stored = [k for s in shards for k in safe_open(merged / s, "pt").keys()]
    assert len(stored) == len(set(stored)) and "model.embed_tokens.weight" in stored
    model, info = transformers.AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    expected = module.lm.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert sorted(MergeRecord.load(merged).outputs) == files_of(merged)


def lora_classifier(num_classes, seed):
    torch.manual_seed(0)
    base = transformers.BertModel(bert_config())
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    return EncoderClassifier(peft.get_peft_model(base, config), num_classes)


def test_lora_fits_keep_each_task_head_and_give_a_plain_peft_adapter(tmp_path):
    merge = MergeCallback("tsv_m", tasks=list(CLASSES), exclude=EXCLUDE, dirpath=tmp_path / "m", progress=False)
    for i, n in enumerate(CLASSES.values()):
        module = lora_classifier(n, seed=i)
        trainer(tmp_path, [merge], max_epochs=1).fit(module, loader(i, n))
    assert set(merge.heads) == set(CLASSES)
    for i, (task, n) in enumerate(CLASSES.items()):
        assert merge.heads[task]["head.weight"].shape == (n, 32)
        recorded = load_file(tmp_path / "m" / f"task-{i:02d}-{task}" / "heads.safetensors")
        saved = load_file(tmp_path / "m" / "merged_heads" / f"{task}.safetensors")
        assert torch.equal(recorded["head.weight"], saved["head.weight"])
        assert torch.equal(saved["head.weight"], merge.heads[task]["head.weight"])
    assert torch.equal(merge.heads["five"]["head.weight"], module.head.weight.detach())

    torch.manual_seed(0)
    base = transformers.BertModel(bert_config()).eval()
    via_peft = peft.PeftModel.from_pretrained(base, tmp_path / "m" / "merged_adapter").eval()
    ids = torch.randint(0, 99, (3, 6))
    with torch.no_grad():
        expected = module.encoder.eval()(input_ids=ids).last_hidden_state
        assert torch.allclose(via_peft(input_ids=ids).last_hidden_state, expected, atol=1e-5)
    with pytest.raises(ValueError, match="full fine-tunes only"):
        merge.task_matrices("tsv_m")


def test_lora_fits_warn_about_a_trainable_head_that_exclude_does_not_match(tmp_path):
    merge = MergeCallback("tsv_m", tasks=list(CLASSES), dirpath=tmp_path / "m", progress=False)
    with pytest.warns(UserWarning, match=r"'head.weight' \(2 in all\) is outside the PeftModel.*exclude=|'head.\*'"):
        trainer(tmp_path, [merge], max_steps=1).fit(lora_classifier(2, seed=0), loader(0, 2))
