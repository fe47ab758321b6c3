"""bench/published_layouts.py: llaunch's predictions beside published at-scale runs, held to issue 30's rule:
at least 80 % of the rows within [0.55, 1.05] of the published memory (where published) and 25 % of the MFU."""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import published_layouts  # noqa: E402


def test_at_least_80_percent_of_published_rows_are_within_the_bands():
    results = [published_layouts.compare(row) for row in published_layouts.ROWS]
    assert published_layouts.within_bands(results) >= 0.8, [r["name"] for r in results if not r["mfu_ok"]]


def test_at_least_80_percent_of_rows_meet_all_of_issue_30s_rules():
    """The bands, and the planner's free choice within 0.9 of the forced layout's MFU (about 20 s)."""
    results = [published_layouts.compare(row, free=True) for row in published_layouts.ROWS]
    meets = [published_layouts.meets_issue_rules(r) for r in results]
    assert sum(meets) >= 0.8 * len(results), [r["name"] for r, ok in zip(results, meets) if not ok]


def test_llama3_405b_layout_predicts_mfu_within_25_percent_of_the_published_043():
    llama3 = next(row for row in published_layouts.ROWS if row.name.startswith("Llama 3 405B, 8K, 8,192"))
    result = published_layouts.compare(llama3)
    assert result["layout"].startswith("zero1 tp8 pp16") and result["layout"].endswith("dp64")
    assert abs(result["mfu"] / 0.43 - 1) <= 0.25


def test_the_script_prints_the_table():
    out = subprocess.run([sys.executable, str(Path(published_layouts.__file__))], capture_output=True, text=True,
                         check=True).stdout
    assert "Megatron GPT 1T" in out and "within the bands:" in out
    deepseek = next(line for line in out.splitlines() if line.startswith("DeepSeek-V3 671B, 2,048 H800"))
    assert "pp16(1f1b x120) ep64 dp128" in deepseek and "1,543" in deepseek and deepseek.endswith("yes")


def test_deepseek_v3_gap_is_its_exposed_all_to_all():
    """llaunch's DeepSeek-V3 step prices ep's all-to-all exposed (its ranks do not overlap it): 558 tokens/s per
    GPU against the published 1,543. With it hidden, as DualPipe does, the same terms are within 10 % of 1,543."""
    row = published_layouts.EP_ROWS[0]
    _, candidate, _ = published_layouts.predict(row)
    exposed = candidate.tokens_per_s / candidate.setup.world_size
    hidden = published_layouts.all_to_all_hidden_tokens_per_gpu(row, candidate)
    assert exposed < 0.5 * row.tokens_per_gpu and abs(hidden / row.tokens_per_gpu - 1) <= 0.10
