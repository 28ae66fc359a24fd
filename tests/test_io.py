"""Checkpoint sources and the safetensors writer: every format round-trips, bad files are refused clearly."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_merge.io import (
    MODEL_FILES,
    CheckpointSource,
    HFFolderSource,
    PrefixedSource,
    SafetensorsSource,
    SafetensorsWriter,
    StateDictSource,
    TensorSpec,
    TorchFileSource,
    copy_model_files,
    open_source,
    save_state_dict,
)
from lightning_merge.io.hf import MAX_FILE_BYTES
from lightning_merge.io.writer import write_stream


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "enc.weight": torch.randn(5, 3, generator=g),
        "enc.bias": torch.randn(5, generator=g),
        "norm.weight": torch.randn(3, generator=g).bfloat16(),
        "conv.weight": torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64),
        "scale": torch.tensor(0.5),
        "position_ids": torch.arange(4),
        "mask": torch.tensor([True, False]),
    }


def assert_same(source: CheckpointSource, state: dict[str, torch.Tensor]) -> None:
    assert sorted(source.keys()) == sorted(state)
    for key, value in state.items():
        assert source.shape(key) == tuple(value.shape)
        assert source.dtype(key) == value.dtype
        tensor = source.get_tensor(key)
        assert tensor.dtype == value.dtype and torch.equal(tensor, value), key


def test_state_dict_source_round_trips(state):
    source = StateDictSource(state, label="mine")
    assert source.name == "mine"
    assert_same(source, state)
    assert isinstance(source, CheckpointSource)


def test_safetensors_source_round_trips(tmp_path, state):
    save_file(state, str(tmp_path / "w.safetensors"))
    source = open_source(tmp_path / "w.safetensors")
    assert isinstance(source, SafetensorsSource)
    assert source.name == str(tmp_path / "w.safetensors")
    assert_same(source, state)


def test_safetensors_reads_are_private_copies(tmp_path, state):
    # get_tensor reads the bytes into memory the caller owns: a write reaches neither the file nor the next read,
    # and no memory map of the input is held (a file truncated while mapped would kill the process with SIGBUS).
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    before = path.read_bytes()
    source = open_source(path)
    tensor = source.get_tensor("enc.weight")
    tensor.mul_(-7.0).add_(1.0)
    assert path.read_bytes() == before
    assert torch.equal(source.get_tensor("enc.weight"), state["enc.weight"])
    if Path("/proc/self/maps").exists():
        assert not [line for line in Path("/proc/self/maps").read_text().splitlines() if str(path) in line]


def test_misaligned_safetensors_tensor_is_copied_out(tmp_path):
    # A hand-made file whose float32 data starts at an odd offset (as files from before safetensors aligned its
    # data may): read by copying, still exact.
    values = torch.arange(6, dtype=torch.float32)
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [1, 25]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\x05" + values.numpy().tobytes())
    source = open_source(path)
    assert torch.equal(source.get_tensor("b"), values.view(2, 3))
    assert source.get_tensor("a").tolist() == [5]


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
@pytest.mark.parametrize("size", [0, 1, 4095, 3 * 4096 + 7])
def test_hash_file_matches_one_shot_hash(tmp_path, size, algorithm):
    import xxhash

    from lightning_merge.io.hashing import hash_file

    path = tmp_path / "blob"
    path.write_bytes(os.urandom(size))
    data = path.read_bytes()
    want = hashlib.sha256(data).hexdigest() if algorithm == "sha256" else xxhash.xxh3_128_hexdigest(data)
    assert hash_file(path, algorithm, chunk_size=mmap.ALLOCATIONGRANULARITY) == f"{algorithm}:{want}"


def test_hash_file_refuses_unknown_algorithm(tmp_path):
    from lightning_merge.io.hashing import hash_file

    (tmp_path / "blob").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"Expected argument `algorithm` to be one of \['xxh3_128', 'sha256'\]"):
        hash_file(tmp_path / "blob", "md5")
    with pytest.raises(ValueError, match=r"Expected argument `chunk_size` to be a positive int \(bytes\), but got 0"):
        hash_file(tmp_path / "blob", chunk_size=0)


def test_hash_of_a_file_that_shrinks_while_hashed_names_it(tmp_path):
    from lightning_merge.io.hashing import _FileHash

    path = tmp_path / "blob"
    path.write_bytes(os.urandom(100))
    with _FileHash(path, "xxh3_128") as state:
        state.update_to(10, memoryview(bytearray(16)))
        os.truncate(path, 50)
        with pytest.raises(OSError, match=r"'.*blob' shrank while it was hashed \(was 100 bytes, ends at 50\)"):
            state.update_to(state.size, memoryview(bytearray(16)))


@pytest.mark.parametrize("name", ["w.pt", "pytorch_model.bin", "w.pth"])
def test_torch_file_source_round_trips(tmp_path, state, name):
    torch.save(state, tmp_path / name)
    source = open_source(tmp_path / name)
    assert isinstance(source, TorchFileSource)
    assert_same(source, state)


def test_legacy_torch_file_is_read_without_mmap(tmp_path, state):
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert_same(open_source(tmp_path / "old.pt"), state)


def test_lightning_style_ckpt_with_prefix(tmp_path, state):
    ckpt = {
        "epoch": 3,
        "global_step": 10,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {**{f"model.{k}": v for k, v in state.items()}, "criterion.pos_weight": torch.ones(1)},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "hyper_parameters": {"lr": 0.1, "name": "vit"},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert "criterion.pos_weight" in open_source(tmp_path / "last.ckpt").keys()
    assert_same(open_source(tmp_path / "last.ckpt", prefix="model."), state)


def test_real_lightning_checkpoint(tmp_path):
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self, hidden: int = 4) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.BatchNorm1d(hidden))

        def training_step(self, batch, batch_idx):
            return self.model(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3)), batch_size=4)
    trainer = lightning.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                                enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "real.ckpt")
    assert_same(open_source(tmp_path / "real.ckpt", prefix="model."), module.model.state_dict())


def test_prefix_strip_and_add(state):
    source = open_source(state, add_prefix="model.")
    assert source.keys() == [f"model.{k}" for k in state]
    assert torch.equal(source.get_tensor("model.enc.weight"), state["enc.weight"])
    renamed = open_source(source, prefix="model.", add_prefix="net.")
    assert isinstance(renamed, PrefixedSource)
    assert renamed.keys() == [f"net.{k}" for k in state]
    assert torch.equal(renamed.get_tensor("net.enc.bias"), state["enc.bias"])


def test_prefix_matching_nothing_is_an_error(state):
    with pytest.raises(ValueError, match=r"Expected some keys of '<state_dict>' to start with prefix 'model\.'.*HINT"):
        open_source(state, prefix="model.")


def test_open_source_returns_sources_unchanged(state):
    source = StateDictSource(state)
    assert open_source(source) is source


def test_get_tensor_on_device_and_missing_key(tmp_path, state):
    save_file(state, str(tmp_path / "w.safetensors"))
    source = open_source(tmp_path / "w.safetensors")
    assert source.get_tensor("enc.weight", device="meta").device.type == "meta"
    with pytest.raises(KeyError, match=r"'nope' is not in checkpoint '.*w\.safetensors'"):
        source.get_tensor("nope")


def _sharded_hf_folder(folder: Path, state: dict[str, torch.Tensor]) -> None:
    keys = list(state)
    shards = {"model-00001-of-00002.safetensors": keys[:3], "model-00002-of-00002.safetensors": keys[3:]}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(folder / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_hf_folder_sharded_safetensors(tmp_path, state):
    _sharded_hf_folder(tmp_path, state)
    source = open_source(tmp_path)
    assert isinstance(source, HFFolderSource)
    assert_same(source, state)
    assert [p.name for p in source.files()] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert source.root() == tmp_path


def test_location_points_at_each_tensors_bytes(tmp_path, state):
    """``location`` is what the engine reports to the hash thread: checked against the file's own bytes."""
    save_file(state, str(tmp_path / "w.safetensors"))
    (tmp_path / "hf").mkdir()
    _sharded_hf_folder(tmp_path / "hf", state)
    sources = [open_source(tmp_path / "w.safetensors"), open_source(tmp_path / "hf"),
               open_source(tmp_path / "hf", add_prefix="model.")]
    for source in sources:
        for key in source.keys():
            path, begin, end = source.location(key)
            assert path in source.files(), (source, key)
            tensor = source.get_tensor(key).contiguous()
            with open(path, "rb") as f:
                f.seek(begin)
                raw = f.read(end - begin)
            assert raw == tensor.reshape(-1).view(torch.uint8).numpy().tobytes(), (source, key)
    torch.save(state, tmp_path / "w.pt")
    assert open_source(tmp_path / "w.pt").location("enc.weight") is None
    assert open_source(state).location("enc.weight") is None
    with pytest.raises(KeyError, match="'nope' is not in checkpoint"):
        sources[0].location("nope")


def test_sources_say_where_they_lie_on_disk(tmp_path, state):
    """``root()`` and ``files()`` (what an output must avoid, what the record hashes), for every kind of source."""
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.ckpt")
    (tmp_path / "hf").mkdir()
    _sharded_hf_folder(tmp_path / "hf", state)
    shards = sorted((tmp_path / "hf").glob("*.safetensors"))
    expected = {
        tmp_path / "w.safetensors": [tmp_path / "w.safetensors"],
        tmp_path / "w.ckpt": [tmp_path / "w.ckpt"],
        tmp_path / "hf": shards,
    }
    for path, files in expected.items():
        for source in (open_source(path), open_source(path, add_prefix="x.")):
            assert isinstance(source, CheckpointSource)
            assert source.root() == path and sorted(source.files()) == files, source
    memory = open_source(state, add_prefix="x.")
    assert memory.root() is None and memory.files() == [] and memory.location("x.enc.weight") is None


def test_an_object_without_the_whole_protocol_is_not_a_source(state):
    class KeysOnly:  # the reading half of the protocol only: no location(), files() or root()
        name = "partial"

        def keys(self):
            return list(state)

        def shape(self, key):
            return tuple(state[key].shape)

        def dtype(self, key):
            return state[key].dtype

        def get_tensor(self, key, device=None):
            return state[key]

    assert not isinstance(KeysOnly(), CheckpointSource)
    with pytest.raises(TypeError, match="Expected argument `src` to be a path, a state dict or a CheckpointSource"):
        open_source(KeysOnly())


def test_hf_folder_single_safetensors_and_bin(tmp_path, state):
    (tmp_path / "a").mkdir()
    save_file(state, str(tmp_path / "a" / "model.safetensors"))
    assert_same(open_source(tmp_path / "a"), state)
    (tmp_path / "b").mkdir()
    torch.save(state, tmp_path / "b" / "pytorch_model.bin")
    assert_same(open_source(tmp_path / "b"), state)


def test_hf_folder_sharded_bin(tmp_path, state):
    keys = list(state)
    torch.save({k: state[k] for k in keys[:2]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in keys[2:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 if i < 2 else 2}-of-00002.bin" for i, k in enumerate(keys)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same(open_source(tmp_path), state)


def test_transformers_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16)
    model = transformers.BertModel(config)
    model.save_pretrained(tmp_path / "bert", max_shard_size="20KB")
    source = open_source(tmp_path / "bert")
    assert set(source.keys()) <= set(model.state_dict())
    for key in source.keys():
        assert torch.equal(source.get_tensor(key), model.state_dict()[key]), key


def test_hf_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"to hold model\.safetensors.*but found none"):
        HFFolderSource(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"names files that do not exist: \['gone\.safetensors'\]"):
        open_source(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="Could not read the shard index"):
        open_source(tmp_path)


class _Evil:
    """Unpickling this would run ``open(marker, "w")``: an arbitrary-code payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["evil.ckpt", "pytorch_model.bin"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, name):
    marker = tmp_path / "pwned"
    with open(tmp_path / name, "wb") as f:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Evil(marker)}, f)
    assert not marker.exists()
    with pytest.raises(ValueError, match=rf"Refusing to load '.*{name}'.*GLOBAL.*It was not executed"):
        open_source(tmp_path / name)
    assert not marker.exists()
    with pytest.raises(ValueError, match="Refusing to load"):  # also inside a model folder
        (tmp_path / "folder").mkdir(exist_ok=True)
        os.replace(tmp_path / name, tmp_path / "folder" / "pytorch_model.bin")
        open_source(tmp_path / "folder")
    assert not marker.exists()


def test_plain_pickle_is_refused(tmp_path):
    with open(tmp_path / "p.pt", "wb") as f:
        pickle.dump({"w": _Evil(tmp_path / "pwned")}, f)
    with pytest.raises(ValueError, match=r"'.*p\.pt'"):
        open_source(tmp_path / "p.pt")
    assert not (tmp_path / "pwned").exists()


def test_bad_files(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage!")
    with pytest.raises(ValueError, match=r"Could not read '.*bad\.safetensors' as a safetensors file"):
        open_source(tmp_path / "bad.safetensors")
    (tmp_path / "bad.ckpt").write_bytes(b"garbage!")
    with pytest.raises(ValueError, match=r"'.*bad\.ckpt'"):
        open_source(tmp_path / "bad.ckpt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.ckpt")
    with pytest.raises(ValueError, match=r"to hold a state dict of tensors.*\['epoch', 'lr'\]"):
        open_source(tmp_path / "meta.ckpt")
    with pytest.raises(FileNotFoundError, match=r"'.*missing\.ckpt' \(not found\)"):
        open_source(tmp_path / "missing.ckpt")
    with pytest.raises(TypeError, match="Expected argument `src` to be a path, a state dict or a CheckpointSource"):
        open_source(3)
    with pytest.raises(TypeError, match=r"key 'a' holds a int"):
        StateDictSource({"a": 1})


def test_sources_pickle(tmp_path, state):
    torch.save(state, tmp_path / "w.pt")
    save_file(state, str(tmp_path / "w.safetensors"))
    for path in ("w.pt", "w.safetensors"):
        assert_same(pickle.loads(pickle.dumps(open_source(tmp_path / path))), state)


def test_writer_round_trip_and_metadata(tmp_path, state):
    state = {**state, "empty": torch.zeros(0, 3)}
    assert save_state_dict(state, tmp_path) == ["model.safetensors"]
    assert_same(open_source(tmp_path), state)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_writer_shards_with_index(tmp_path, state):
    files = save_state_dict(state, tmp_path, max_shard_size=64)
    assert files[-1] == "model.safetensors.index.json"
    assert files[0] == f"model-00001-of-{len(files) - 1:05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    assert_same(open_source(tmp_path), state)


def test_writer_checks_order_shape_and_completeness(tmp_path):
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (3,), torch.float32)]
    with SafetensorsWriter(tmp_path, specs) as writer:
        with pytest.raises(ValueError, match="Expected key 'a' next"):
            writer.write("b", torch.zeros(3))
        with pytest.raises(ValueError, match=r"shape \(2,\) and dtype torch.float32, but got \(3,\) torch.float32"):
            writer.write("a", torch.zeros(3))
        writer.write("a", torch.zeros(2))
        with pytest.raises(ValueError, match="'b' and later were never written"):
            writer.close()
    produced = []

    def stream():  # a bad tensor in the middle: the stream stops at its write, nothing after it is produced
        for key, tensor in [("a", torch.zeros(2)), ("b", torch.zeros(4)), ("c", torch.zeros(1))]:
            produced.append(key)
            yield key, tensor

    (tmp_path / "stream").mkdir()
    with pytest.raises(ValueError, match=r"Expected key 'b' to be a tensor of shape \(3,\)"):
        write_stream(tmp_path / "stream", [*specs, TensorSpec("c", (1,), torch.float32)], stream())
    assert produced[:2] == ["a", "b"] and len(produced) <= 3
    with pytest.raises(FileNotFoundError, match="existing folder"):
        save_state_dict({}, tmp_path / "nope")
    with pytest.raises(ValueError, match="Expected argument `max_shard_size` to be a positive int"):
        save_state_dict({"a": torch.zeros(1)}, tmp_path, max_shard_size=0)


# ------------------------------------------------------------------------------- Hugging Face model files

def _model_folder(root: Path) -> Path:
    folder = root / "model"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "tokenizer.json").write_text("{}")
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    for other in ("model.safetensors", "pytorch_model.bin", "README.md", "secrets.env", "2_Dense/config.json"):
        (folder / other).parent.mkdir(exist_ok=True)
        (folder / other).write_text("never copied")
    (root / "out").mkdir()
    return folder


def _new_folder(path: Path) -> Path:
    path.mkdir()
    return path


def test_copy_model_files_copies_the_allow_list_only(tmp_path):
    folder = _model_folder(tmp_path)
    copied = copy_model_files(folder, tmp_path / "out")
    assert copied == ["config.json", "tokenizer.json", "1_Pooling/config.json"]
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == sorted(copied)
    assert all((tmp_path / "out" / n).read_bytes() == (folder / n).read_bytes() for n in copied)
    assert set(MODEL_FILES) >= set(copied) and not any("*" in n or n.endswith(".safetensors") for n in MODEL_FILES)


def test_copy_model_files_refuses_links_out_of_the_folder(tmp_path):
    folder = _model_folder(tmp_path)
    (tmp_path / "id_rsa").write_text("secret")
    (folder / "vocab.txt").symlink_to(tmp_path / "id_rsa")
    with pytest.raises(ValueError, match=r"'vocab.txt' in model folder .*link to .*id_rsa.*HINT"):
        copy_model_files(folder, tmp_path / "out")
    assert not (tmp_path / "out" / "vocab.txt").exists()


def test_copy_model_files_refuses_a_linked_subfolder(tmp_path):
    folder = _model_folder(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text("{}")
    os.rename(folder / "1_Pooling", tmp_path / "pooling")
    (folder / "1_Pooling").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ValueError, match=r"'1_Pooling' in model folder .*'1_Pooling/config.json'.*link"):
        copy_model_files(folder, tmp_path / "out")


def test_copy_model_files_follows_links_of_the_hugging_face_cache_only_into_its_blobs(tmp_path):
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "f00d").write_text('{"model_type": "bert"}')
    (snapshot / "config.json").symlink_to(Path("..", "..", "blobs", "f00d"))
    (tmp_path / "out").mkdir()
    assert copy_model_files(snapshot, tmp_path / "out") == ["config.json"]
    assert not (tmp_path / "out" / "config.json").is_symlink()
    assert (tmp_path / "out" / "config.json").read_text() == '{"model_type": "bert"}'
    (tmp_path / "outside").write_text("secret")
    (snapshot / "vocab.txt").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="'vocab.txt'.*link"):
        copy_model_files(snapshot, _new_folder(tmp_path / "out2"))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_copy_model_files_refuses_what_is_not_a_regular_file(tmp_path):
    folder = _model_folder(tmp_path)
    os.mkfifo(folder / "vocab.txt")  # opening a pipe for reading would block: refused without waiting
    with pytest.raises(ValueError, match=r"'vocab.txt' in model folder .*regular file.*mode p"):
        copy_model_files(folder, tmp_path / "out")
    os.unlink(folder / "vocab.txt")
    (folder / "merges.txt").mkdir()
    with pytest.raises(ValueError, match=r"'merges.txt' in model folder .*regular file.*mode d"):
        copy_model_files(folder, _new_folder(tmp_path / "out2"))


def test_copy_model_files_caps_the_size_of_each_file(tmp_path):
    folder = _model_folder(tmp_path)
    (folder / "tokenizer.json").write_bytes(b"x" * 101)
    with pytest.raises(ValueError, match=r"'tokenizer.json' in model folder .* at most 100 bytes.*has 101 bytes"):
        copy_model_files(folder, tmp_path / "out", max_bytes=100)
    assert MAX_FILE_BYTES == 64 * 2**20


def test_copy_model_files_never_overwrites_and_checks_its_folders(tmp_path):
    folder = _model_folder(tmp_path)
    (tmp_path / "out" / "config.json").write_text("mine")
    with pytest.raises(FileExistsError):
        copy_model_files(folder, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_text() == "mine"
    with pytest.raises(NotADirectoryError, match="`source_folder`"):
        copy_model_files(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(NotADirectoryError, match="`dest_folder`"):
        copy_model_files(folder, folder / "config.json")
