"""Bad input to `fastsft train` (issue #18's sweep): each case is one line on stderr that names the file
(and line, field or setting), exit status 2, no traceback, and no checkpoint written. Plus the ops' own
checks of non-finite options, which would otherwise turn every loss into NaN / inf / zeros silently."""

import gzip
import json

import pytest

from fastsft.cli import main

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _train(tmp_path, data, *extra):
    return main(
        [
            "train",
            f"data.train={data}",
            "data.eval=null",
            f"output_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "logging.progress_bar=false",
            *extra,
        ]
    )


def _one_line_error(tmp_path, capsys, data, *extra) -> str:
    assert _train(tmp_path, data, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastsft train: "), err
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    return err[0]


def test_an_unsupported_extension(tmp_path, capsys):
    data = tmp_path / "train.txt"
    data.write_text(json.dumps(GOOD) + "\n")
    line = _one_line_error(tmp_path, capsys, data)
    assert str(data) in line and "unsupported file extension (supported: .jsonl" in line


def test_a_directory_given_as_the_data_file(tmp_path, capsys):
    data = tmp_path / "folder.jsonl"
    data.mkdir()
    line = _one_line_error(tmp_path, capsys, data)
    assert str(data) in line and "not a file (a directory?)" in line and "not found" not in line


def test_invalid_utf8_in_a_json_file_names_the_file_and_byte(tmp_path, capsys):
    data = tmp_path / "train.json"
    raw = b'[{"messages": [{"role": "user", "content": "caf\xe9"}]}]'
    data.write_bytes(raw)
    line = _one_line_error(tmp_path, capsys, data)
    assert str(data) in line and f"invalid UTF-8 at byte {raw.index(bytes([0xE9]))}" in line


@pytest.mark.parametrize("skip", [False, True])
def test_a_gz_that_is_not_gzip(tmp_path, capsys, skip):
    data = tmp_path / "train.jsonl.gz"
    data.write_text(json.dumps(GOOD) + "\n")  # plain text under a .gz name
    line = _one_line_error(tmp_path, capsys, data, *(["data.on_bad_record=skip"] if skip else []))
    assert str(data) in line and "not a gzip file" in line


def test_a_truncated_gzip(tmp_path, capsys):
    data = tmp_path / "train.jsonl.gz"
    whole = gzip.compress(("".join(json.dumps(GOOD) + "\n" for _ in range(2000))).encode())
    data.write_bytes(whole[: len(whole) // 2])
    line = _one_line_error(tmp_path, capsys, data, "data.on_bad_record=skip")  # a cut file is no bad record
    assert str(data) in line and "truncated or damaged after line" in line


def test_a_deeply_nested_line_is_a_bad_record(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + "[" * 100_000 + "\n")
    line = _one_line_error(tmp_path, capsys, data)
    assert f"{data}:2" in line and "nested too deeply" in line


def test_an_unreadable_data_file(tmp_path, capsys):
    """Reading fails with an OSError (root may read any file, so /proc/self/mem stands in: a regular file
    whose read fails with EIO)."""
    data = tmp_path / "train.jsonl"
    data.symlink_to("/proc/self/mem")
    line = _one_line_error(tmp_path, capsys, data)
    assert str(data) in line and "cannot read the file" in line


def test_an_unknown_fastsft_backend_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTSFT_BACKEND", "bogus")
    assert main(["train", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastsft train: FASTSFT_BACKEND='bogus' is not one of auto, triton, reference"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("inside", [False, True])
def test_an_output_dir_that_is_a_file_or_inside_one(tmp_path, capsys, inside):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a directory")
    output_dir = blocker / "run" if inside else blocker
    assert (
        main(
            [
                "train",
                f"data.train={data}",
                "data.eval=null",
                f"output_dir={output_dir}",
                f"data.cache_dir={tmp_path / 'cache'}",
                "logging.progress_bar=false",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"output_dir {output_dir}" in err[0], err
    assert ("which is a file" if inside else "is a file") in err[0]
    assert blocker.read_text() == "not a directory"


def _train_model(tmp_path, model_dir):
    return main(
        [
            "train",
            f"model.name_or_path={model_dir}",
            f"output_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "logging.progress_bar=false",
        ]
    )


def test_an_empty_model_directory(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    assert _train_model(tmp_path, tmp_path / "model") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Hugging Face model here (no config.json)" in err[0], err
    assert "sentencepiece" not in err[0] and "tiktoken" not in err[0]


def test_a_model_directory_with_pickled_weights_only(tmp_path, capsys):
    from fastsft.train.tiny import tiny_model

    model_dir = tmp_path / "model"
    tiny_model(seed=0).config.save_pretrained(model_dir)
    (model_dir / "pytorch_model.bin").write_bytes(b"not loaded: refused before any unpickling")
    assert _train_model(tmp_path, model_dir) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds only pytorch_model.bin weights: fastsft loads safetensors only" in err[0], err


def test_lora_target_modules_that_match_nothing_name_the_real_ones(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "lora.enabled=true",
                "lora.target_modules=query,value",
                f"output_dir={tmp_path / 'run'}",
                f"data.cache_dir={tmp_path / 'cache'}",
                "logging.progress_bar=false",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora.target_modules=['query', 'value'] matches no module of this model" in err[0], err
    assert "q_proj" in err[0] and "v_proj" in err[0]


def test_a_deeply_nested_line_is_skipped_and_counted_in_skip_mode(tmp_path):
    from fastsft.data.formats import LoadReport, iter_records

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + "[" * 100_000 + "\n" + json.dumps(GOOD) + "\n")
    report = LoadReport()
    records = list(iter_records(data, on_bad_record="skip", report=report))
    assert [r.location for r in records] == [f"{data}:1", f"{data}:3"]
    assert dict(report.skipped) == {"invalid JSON": 1}
