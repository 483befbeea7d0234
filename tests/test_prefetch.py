"""On accelerators the next layer's weights are read on a background thread while the current layer runs
(convert.prefetch; forced on here, on the CPU, which reads each layer when it starts): the same bundle bytes as
reading each layer when it starts, and a bad tensor is still one error naming it."""
import threading

import pytest
import torch

from quailora_convert.convert import ConvertSettings, convert
from quailora_convert.convert.prefetch import LayerPrefetch
from quailora_convert.errors import BadInputError
from quailora_convert.sources.checkpoint import CheckpointReader, KeyMap
from tiny_models import save_tiny, tiny_llama_config, write_text_calibration

LAYERS = 4


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefetch")
    folder = save_tiny(tiny_llama_config(num_hidden_layers=LAYERS), root / "source")
    return folder, write_text_calibration(root / "calib.jsonl")


def _convert(source, out):
    folder, calib = source
    return convert(ConvertSettings(model=str(folder), out=out, calib=str(calib), rank=4, num_samples=8, seq_len=32,
                                   batch_size=4, max_shard_bytes=150_000))


def _recording_reads(monkeypatch) -> list[tuple[str, str]]:
    """(thread name, key) of every checkpoint read from here on."""
    reads = []
    original = CheckpointReader.get

    def get(self, key):
        reads.append((threading.current_thread().name, key))
        return original(self, key)

    monkeypatch.setattr(CheckpointReader, "get", get)
    return reads


def _reading_ahead_on_the_cpu(monkeypatch) -> None:
    """What a conversion on an accelerator does (reads_ahead), on this CPU."""
    from quailora_convert.convert import pipeline

    monkeypatch.setattr(pipeline, "reads_ahead", lambda device: True)


def test_on_the_cpu_every_layer_is_read_when_it_starts(source, tmp_path, monkeypatch):
    from quailora_convert.convert.prefetch import reads_ahead

    assert not reads_ahead(torch.device("cpu")) and reads_ahead(torch.device("cuda", 0))
    reads = _recording_reads(monkeypatch)
    _convert(source, tmp_path / "out")
    assert reads and not any(thread.startswith("quailora-prefetch") for thread, _ in reads)


def test_layers_after_the_first_are_read_ahead_and_the_bundle_bytes_do_not_change(source, tmp_path, monkeypatch):
    _reading_ahead_on_the_cpu(monkeypatch)
    reads = _recording_reads(monkeypatch)
    ahead = _convert(source, tmp_path / "out").rename(tmp_path / "ahead")  # the same --out for both: files name it
    read_ahead = {key for thread, key in reads if thread.startswith("quailora-prefetch")}
    for layer in range(LAYERS):
        weights = {key for _, key in reads if key.startswith(f"model.layers.{layer}.") and key.endswith("proj.weight")}
        assert len(weights) == 7
        assert (weights <= read_ahead) == (layer > 0), (layer, weights - read_ahead)  # layer 0: nothing runs before it

    monkeypatch.setattr(LayerPrefetch, "schedule", lambda self, prefix, layer: None)  # every layer read when it starts
    reads.clear()
    in_turn = _convert(source, tmp_path / "out")
    assert not any(thread.startswith("quailora-prefetch") for thread, _ in reads)
    files = sorted(p.relative_to(ahead) for p in ahead.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(in_turn) for p in in_turn.rglob("*") if p.is_file())
    for name in files:
        if name.name != "quailora_report.json":  # it holds timings
            assert (ahead / name).read_bytes() == (in_turn / name).read_bytes(), name


def test_a_layer_is_taken_once_and_only_when_it_was_scheduled(source):
    folder, _ = source
    reader = CheckpointReader(folder)
    key_map = KeyMap(reader.keys(), reader.keys(), "model")
    skeleton = torch.nn.Module()  # a meta layer with one parameter: only its names are read off it
    skeleton.input_layernorm = torch.nn.Module()
    skeleton.input_layernorm.weight = torch.nn.Parameter(torch.empty(128, device="meta"))
    with LayerPrefetch(folder, key_map, pin=False) as prefetch:
        assert prefetch.take("model.layers.1.") is None  # nothing scheduled: the caller reads it itself
        prefetch.schedule("model.layers.1.", skeleton)
        assert prefetch.take("model.layers.2.") is None  # another layer than the one read ahead
        prefetch.schedule("model.layers.1.", skeleton)
        got = prefetch.take("model.layers.1.")
        assert list(got) == ["input_layernorm.weight"]
        assert torch.equal(got["input_layernorm.weight"], reader.get("model.layers.1.input_layernorm.weight"))
        assert prefetch.take("model.layers.1.") is None  # taken: gone


def test_a_bad_tensor_read_ahead_is_the_one_line_error_of_a_direct_read(source, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    from quailora_convert.bundle.layout import read_weight_map

    folder, calib = source
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    key = "model.layers.2.self_attn.k_proj.weight"  # read ahead while layer 1 runs
    shard = broken / read_weight_map(broken / "model.safetensors.index.json")[key]
    tensors = load_file(shard)
    tensors[key].view(-1)[3] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    _reading_ahead_on_the_cpu(monkeypatch)
    reads = _recording_reads(monkeypatch)
    with pytest.raises(BadInputError) as error:
        _convert((broken, calib), tmp_path / "out")
    assert str(error.value).startswith(f"{key} in {shard} has non-finite values (1 NaN, 0 inf of ")
    assert not (tmp_path / "out").exists()
    assert (next(thread for thread, read in reads if read == key)).startswith("quailora-prefetch")
