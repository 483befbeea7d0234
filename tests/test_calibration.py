"""Calibration sources, sampling, batching and token masking."""
import json

import pytest
import torch

from quailora_convert.calibration.batches import longest_first, make_batches, position_count, sample_token_sequences
from quailora_convert.calibration.formats import format_alpaca
from quailora_convert.calibration.texts import read_texts
from quailora_convert.core.hessian import HessianSum, add_upper_triangle, triangle_block
from quailora_convert.errors import BadInputError
from tiny_models import byte_tokenizer


def test_alpaca_prompt_with_and_without_input():
    with_input = format_alpaca({"instruction": "Add", "input": "1 2", "output": "3"})
    assert "### Input:\n1 2" in with_input and with_input.endswith("### Response:\n3")
    without = format_alpaca({"instruction": "Say hi", "input": "", "output": "hi"})
    assert "### Input" not in without and "### Instruction:\nSay hi" in without


def test_reads_alpaca_json_jsonl_text_and_txt(tmp_path):
    records = [{"instruction": f"task {i}", "input": "", "output": "ok"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (tmp_path / "t.jsonl").write_text('{"text": "hello world"}\n{"text": "bye"}\n')
    (tmp_path / "t.txt").write_text("one long document")
    assert read_texts(str(tmp_path / "a.json")) == read_texts(str(tmp_path / "a.jsonl"))
    assert len(read_texts(str(tmp_path / "a.json"))) == 3
    assert read_texts(str(tmp_path / "t.jsonl")) == ["hello world", "bye"]
    assert read_texts(str(tmp_path / "t.txt")) == ["one long document"]


@pytest.mark.parametrize("content,name,message", [
    ("{not json", "bad.json", "invalid JSON"),
    ('{"a": 1}\n', "bad.jsonl", "Alpaca records"),
    ("x", "bad.csv", "unsupported extension"),
    ("[]", "empty.json", "no records"),
])
def test_bad_calibration_files_give_one_line_errors(tmp_path, content, name, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(BadInputError, match=message) as error:
        read_texts(str(tmp_path / name))
    assert "\n" not in str(error.value)


def test_missing_source_names_the_problem():
    with pytest.raises(BadInputError, match="not a file"):
        read_texts("/no/such/calibration.jsonl")


def test_sampling_is_seeded_and_truncates():
    tok = byte_tokenizer()
    texts = [" ".join(["a"] * n) for n in range(3, 60)]
    first = sample_token_sequences(texts, tok, 10, 16, seed=3)
    assert first == sample_token_sequences(texts, tok, 10, 16, seed=3)
    assert first != sample_token_sequences(texts, tok, 10, 16, seed=4)
    assert len(first) == 10 and max(len(s) for s in first) <= 16


def test_single_document_is_cut_into_windows():
    tok = byte_tokenizer()
    sequences = sample_token_sequences([" ".join(["b"] * 100)], tok, 10, 16, seed=0)  # 100 tokens >= the minimum 80
    assert len(sequences) == 7 and all(len(s) <= 16 for s in sequences)  # 100 tokens, windows of 16


def test_batches_are_right_padded_with_mask():
    batches = make_batches([[5, 6, 7], [8], [9, 10]], batch_size=2, pad_id=1)
    assert [tuple(b.input_ids.shape) for b in batches] == [(2, 3), (1, 2)]
    assert batches[0].input_ids[1].tolist() == [8, 1, 1]
    assert batches[0].attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_calibration_batches_go_longest_first_and_pad_less():
    g = torch.Generator().manual_seed(0)
    drawn = [list(range(int(n))) for n in torch.randint(1, 60, (50,), generator=g)]
    drawn[7], drawn[9] = [7] * 20, [9] * 20  # a tie keeps the draw order
    ordered = longest_first(drawn)
    assert sorted(map(tuple, ordered)) == sorted(map(tuple, drawn))  # the same samples
    assert [len(s) for s in ordered] == sorted((len(s) for s in drawn), reverse=True)
    assert ordered.index([7] * 20) < ordered.index([9] * 20)
    positions = [sum(b.input_ids.numel() for b in make_batches(s, 8, 0)) for s in (ordered, drawn)]
    assert positions[0] < positions[1] and positions[0] < 1.2 * sum(len(s) for s in drawn)
    assert [position_count(make_batches(s, 8, 0)) for s in (ordered, drawn)] == positions


def test_the_converter_batches_its_calibration_longest_first(tmp_path):
    from quailora_convert.convert.pipeline import _calibration_batches
    from quailora_convert.convert.settings import ConvertSettings
    from tiny_models import write_text_calibration

    calib = write_text_calibration(tmp_path / "calib.jsonl", count=40)
    settings = ConvertSettings(model="unused", out=tmp_path / "out", calib=str(calib), num_samples=32, seq_len=64,
                               batch_size=4)
    batches = _calibration_batches(settings, byte_tokenizer(), tmp_path, torch.device("cpu"), lambda event: None)
    lengths = [int(n) for b in batches for n in b.attention_mask.sum(1)]
    assert len(lengths) == 32 and lengths == sorted(lengths, reverse=True)


def test_hessian_ignores_padding_tokens():
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    padded = HessianSum(8, "cpu")
    padded.add(x, mask)
    real = torch.cat([x[0, :3], x[1]])  # (8 tokens, 8)
    assert padded.tokens == 8
    assert torch.allclose(padded.mean(), real.T @ real / 8, atol=1e-6)
    x[0, 3:] = 1e6  # garbage at padded positions changes nothing
    again = HessianSum(8, "cpu")
    again.add(x, mask)
    assert torch.equal(again.sum, padded.sum)


@pytest.mark.parametrize("in_features, block", [(300, 128), (256, 64), (40, 128)])
def test_triangular_hessian_update_equals_the_full_product(in_features, block):
    g = torch.Generator().manual_seed(in_features)
    batches = [torch.randn(n, in_features, generator=g, dtype=torch.float64) for n in (50, 17, 90)]
    total = torch.zeros(in_features, in_features, dtype=torch.float64)
    for X in batches:
        add_upper_triangle(total, X, block)
    X = torch.cat(batches)
    full = X.T @ X
    assert torch.allclose(torch.triu(total), torch.triu(full), rtol=1e-12, atol=1e-9)
    assert not torch.triu(total, diagonal=block).eq(0).all() or in_features <= block
    blocks_below = torch.tril(total, diagonal=-1)
    rows = torch.arange(in_features)
    below_diagonal_blocks = (rows[:, None] // block) > (rows[None, :] // block)
    assert blocks_below[below_diagonal_blocks].eq(0).all()  # half the work: those entries are never computed
    assert [triangle_block(n) for n in (40, 576, 1536, 4096, 28672)] == [128, 128, 256, 768, 4864]
    summed = HessianSum(in_features, "cpu")
    for Xb in batches:
        summed.add(Xb.float(), None)
    assert torch.allclose(summed.mean().double(), full / X.shape[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(summed.mean(), summed.mean().T)
