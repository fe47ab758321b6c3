"""`llaunch datasplit`: seeded, disjoint, complete, the asked-for share held out."""

import json

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
