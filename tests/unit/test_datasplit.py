"""`llaunch datasplit`: seeded, disjoint, complete, the asked-for share held out."""

import json

import pytest

from launcher.cli import main


def test_datasplit_is_seeded_disjoint_and_complete(tmp_path, capsys):
    source = tmp_path / "all.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"q{i}", "output": str(i)}) + "\n" for i in range(200)) + "\n")
    outs = []
    for seed in (1, 1, 2):
        a, b = tmp_path / f"train{len(outs)}.jsonl", tmp_path / f"eval{len(outs)}.jsonl"
        assert main(["datasplit", str(source), "--train-output", str(a), "--eval-output", str(b),
                     "--eval-percentage", "10", "--seed", str(seed)]) == 0
        outs.append((a.read_text().splitlines(), b.read_text().splitlines()))
    train, held = outs[0]
    assert len(held) == 20 and len(train) == 180
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(l for l in source.read_text().splitlines() if l)  # nothing lost, blank line dropped
    assert outs[1] == outs[0]  # same seed, same split
    assert outs[2][1] != held  # another seed, another split
    assert "180 train records" in capsys.readouterr().out


def test_datasplit_bad_input_is_one_sentence(tmp_path, capsys):
    assert main(["datasplit", str(tmp_path / "missing.jsonl"), "--train-output", "a", "--eval-output", "b"]) == 2
    assert "does not exist" in capsys.readouterr().err
    one = tmp_path / "one.jsonl"
    one.write_text('{"instruction": "q", "output": "a"}\n')
    assert main(["datasplit", str(one), "--train-output", str(tmp_path / "a"), "--eval-output",
                 str(tmp_path / "b")]) == 2
    assert "cannot give both" in capsys.readouterr().err


@pytest.mark.parametrize("train, eval_", [("IN", "b.jsonl"), ("a.jsonl", "IN"), ("a.jsonl", "a.jsonl"),
                                          ("./sub/../IN", "b.jsonl"), ("link", "b.jsonl")])
def test_datasplit_never_writes_over_its_input_or_one_file_twice(tmp_path, capsys, monkeypatch, train, eval_):
    """An output equal to the input once overwrote it with a part of itself, exit 0."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    source = tmp_path / "IN"
    source.write_text("".join(f'{{"instruction": "q{i}", "output": "a"}}\n' for i in range(20)))
    (tmp_path / "link").symlink_to(source)
    before = source.read_bytes()
    assert main(["datasplit", "IN", "--train-output", train, "--eval-output", eval_]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and ("is the input file" in err or "both" in err)
    assert source.read_bytes() == before
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.jsonl").exists()


def test_datasplit_keeps_a_record_with_a_raw_line_separator_whole(tmp_path, capsys):
    """JSON allows a raw U+2028 inside a string; splitting on it (str.splitlines) cut records in two."""
    source = tmp_path / "in.jsonl"
    records = [json.dumps({"instruction": f"q{i}\u2028second line", "output": "a\u2029b"}, ensure_ascii=False)
               for i in range(20)]
    source.write_text("\n".join(records) + "\n", encoding="utf-8")
    assert main(["datasplit", str(source), "--train-output", str(tmp_path / "a"), "--eval-output",
                 str(tmp_path / "b")]) == 0
    lines = [line for name in ("a", "b") for line in (tmp_path / name).read_text(encoding="utf-8").split("\n") if line]
    assert sorted(lines) == sorted(records)
