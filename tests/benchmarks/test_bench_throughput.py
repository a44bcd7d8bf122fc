"""``benchmarks.bench_throughput``: vLLM's own client on base, stock and the plugin."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_throughput as bt  # noqa: E402
from benchmarks.systems import configs  # noqa: E402


# Parses each command line (a JSON list of argument lists) with the installed
# vLLM's own ``bench throughput`` parser; prints each namespace as JSON. In a
# process of its own: ``--plugin vllm_slora`` switches S-LoRA mode on, patches
# included, in the process that parses it.
PARSE = """
import json, sys
from vllm.benchmarks.throughput import add_cli_args
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
keys = ("model", "tokenizer", "dataset_name", "random_input_len", "random_output_len", "num_prompts",
        "max_num_seqs", "load_format", "enable_prefix_caching", "enable_lora", "lora_path", "max_loras",
        "max_lora_rank", "plugin")
print(json.dumps([{k: getattr(parser.parse_args(a), k) for k in keys} for a in json.loads(sys.argv[1])],
                 default=str))
"""


def _client_args(cmds: list[list[str]]) -> list[SimpleNamespace]:
    """Each command's arguments as the installed vLLM's client parses them."""
    for cmd in cmds:
        assert cmd[1:5] == ["-m", "vllm.entrypoints.cli.main", "bench", "throughput"]
    r = subprocess.run([sys.executable, "-c", PARSE, json.dumps([c[5:] for c in cmds])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [SimpleNamespace(**d) for d in json.loads(r.stdout.splitlines()[-1])]


def test_each_system_gets_its_own_flags_and_vllm_accepts_them(tmp_path):
    args = bt.parse(["--ids", "1000", "--rank", "16", "--num-prompts", "600"])
    model, adapter = tmp_path / "model", tmp_path / "a"
    cmds = {c.system: bt.command(c, args, model, adapter, tmp_path / "r.json")
            for c in configs(["base", "slora", "stock"], [args.ids])}
    parsed = dict(zip(cmds, _client_args(list(cmds.values()))))
    for s, a in parsed.items():
        assert (a.model, a.tokenizer, a.dataset_name) == (str(model), str(model), "random")
        assert (a.random_input_len, a.random_output_len, a.num_prompts, a.max_num_seqs) == (256, 256, 600, 256)
        assert a.load_format == "dummy" and a.enable_prefix_caching is False
        assert "--skip-tokenizer-init" not in cmds[s]  # the client tokenizes its prompts
    assert not parsed["base"].enable_lora and parsed["base"].lora_path is None
    assert parsed["base"].plugin is None
    for s in ("slora", "stock"):
        a = parsed[s]
        assert a.enable_lora and a.max_loras == 1000 and a.max_lora_rank == 16 and a.lora_path == str(adapter)
    assert parsed["slora"].plugin == "vllm_slora" and parsed["stock"].plugin is None


def test_figures_and_table_ratio_against_base():
    raw = {"elapsed_time": 20.0, "num_requests": 600, "total_num_tokens": 307200,
           "requests_per_second": 30.0, "tokens_per_second": 15360.0}
    f = bt.figures(raw, 256)
    assert f["out_tok_s"] == pytest.approx(600 * 256 / 20.0) and f["req_s"] == 30.0
    rows = [dict(system="base", status="ok", startup_s=60, **f),
            dict(system="slora", status="ok", startup_s=90, **bt.figures(dict(raw, elapsed_time=25.0), 256)),
            dict(system="stock", status="failed (rc 1)", error="ValueError: no memory for 1000 slots")]
    text = bt.table(rows)
    assert "| slora | ok | 25.0 |" in text and "| 0.80x |" in text  # 20 / 25
    assert "| stock | failed (rc 1): ValueError: no memory for 1000 slots |" in text
    assert bt.table(rows[1:]).count("| - |") == 1  # no base: no ratio


@pytest.mark.slow
def test_tiny_run_on_cpu(tmp_path):
    """The real client, base and the plugin, on the tiny model: both run, the
    plugin in S-LoRA mode, base without the plugin loaded."""
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_throughput", "--arch", "tiny", "--enforce-eager",
                        "--num-prompts", "8", "--input-len", "16", "--output-len", "4", "--ids", "3",
                        "--max-num-seqs", "4", "--workdir", str(tmp_path), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {row["system"]: row for row in json.loads(out.read_text())["systems"]}
    assert rows["base"]["requests"] == rows["slora"]["requests"] == 8
    assert "S-LoRA mode on" in Path(rows["slora"]["log"]).read_text()
    assert "vllm_slora" not in Path(rows["base"]["log"]).read_text()
