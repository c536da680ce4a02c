"""TurboQuant models over several processes with MLX's own distributed engine.

Tiny TurboQuant checkpoints (a dense llama, a qwen3_moe with a dense and an MoE layer) are
run by ``mlx.launch --backend ring`` on localhost over 2 and 4 ranks, tensor-parallel through
mlx-lm's ``Model.shard`` (tq_core.lm.shard_model) and pipeline-parallel through mlx-lm's
``pipeline``, and compared with one process: equal greedy tokens, equal prompt logits (float
tolerance), each rank's KV cache holding its own heads only (1/N of the bytes). Skipped, with
the reason, when the ring backend cannot start two local processes here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes
from tq_core import QuantRecipe
from tq_core.lm import convert

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
LAUNCH_TIMEOUT = 180
#: float32 partial sums in a different order: logits agree to ~1e-6 relative.
LOGIT_TOL = 1e-4
PROMPT = ",".join(str((i * 37) % 250 + 3) for i in range(24))

_ATTN = dict(
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,
    rms_norm_eps=1e-5,
    vocab_size=256,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    intermediate_size=256,
)
CONFIGS = {
    "llama": dict(model_type="llama", num_hidden_layers=2, tie_word_embeddings=False, **_ATTN),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        num_hidden_layers=4,
        tie_word_embeddings=True,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[0],  # layer 0 dense MLP, layers 1-3 MoE
        moe_intermediate_size=256,
        norm_topk_prob=True,
        **_ATTN,
    ),
}
#: 3-bit codes in groups of 32 with 64-wide rotation blocks: row-parallel slices must keep
#: both whole (256 inputs over 4 ranks = 64 each).
RECIPE = QuantRecipe(bits=3, group_size=32, span=64, attn_bits=4)


def _save_tokenizer(path: Path) -> None:
    """A word-level tokenizer over ``w2 .. w255`` (no download), for the CLI runs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 256)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(str(path))


def _save_float_model(name: str, path: Path) -> None:
    """A deterministic random float32 mlx-lm model saved as a model directory."""
    config = dict(CONFIGS[name])
    model_class, args_class = _get_classes(dict(config))
    mx.random.seed(7)
    model = model_class(args_class.from_dict(config))
    params = dict(tree_flatten(model.parameters()))
    key = mx.random.key(11)
    for pname, p in params.items():
        if "norm" not in pname and mx.issubdtype(p.dtype, mx.floating):
            key, sub = mx.random.split(key)
            params[pname] = mx.random.normal(p.shape, key=sub) * p.shape[-1] ** -0.5
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), params)
    (path / "config.json").write_text(json.dumps(config))
    _save_tokenizer(path)


@cache
def _checkpoint(name: str, root: str) -> Path:
    src, out = Path(root) / f"{name}-float", Path(root) / f"{name}-tq"
    _save_float_model(name, src)
    convert(src, out, RECIPE, progress=False)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _launcher() -> list[str]:
    exe = Path(sys.executable).with_name("mlx.launch")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("mlx.launch")
    if found is None:
        pytest.skip("mlx.launch is not installed with this mlx")
    return [found]


def _run_worker(checkpoint: Path, out: Path, mode: str, ranks: int, kv_bits: float) -> list:
    args = [
        str(WORKER),
        "--checkpoint", str(checkpoint),
        "--out", str(out),
        "--mode", mode,
        "--prompt", PROMPT,
        "--kv-bits", str(kv_bits),
    ]  # fmt: skip
    if mode == "single":
        cmd = [sys.executable, *args]
    else:
        cmd = [*_launcher(), "--backend", "ring", "-n", str(ranks), "--python", sys.executable]
        cmd += args
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env(), cwd=ROOT
    )
    results = sorted(out.glob("rank*.json"))
    if proc.returncode != 0 or len(results) != ranks:
        raise AssertionError(
            f"{' '.join(cmd[:6])} ... failed (rc {proc.returncode}, {len(results)} of {ranks} "
            f"ranks wrote results)\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    return [json.loads(p.read_text()) for p in results]


@cache
def _ring_works(root: str) -> str | None:
    """None when two local ring ranks can all-sum here, else why not."""
    script = Path(root) / "allsum.py"
    script.write_text(
        "import mlx.core as mx\n"
        "g = mx.distributed.init(strict=True, backend='ring')\n"
        "print(mx.distributed.all_sum(mx.array([1.0]), group=g).item())\n"
    )
    cmd = [*_launcher(), "--backend", "ring", "-n", "2", "--python", sys.executable, str(script)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_env())
    except subprocess.TimeoutExpired:
        return "the ring backend did not start 2 local ranks within 60 s"
    if proc.returncode != 0 or proc.stdout.split().count("2.0") != 2:
        return f"the ring backend cannot run here: {(proc.stderr or proc.stdout)[-500:]}"
    return None


@pytest.fixture(scope="module")
def ring(workdir):
    reason = _ring_works(str(workdir))
    if reason:
        pytest.skip(reason)


@cache
def _reference(name: str, root: str, kv_bits: float) -> dict:
    out = Path(root) / f"ref-{name}-{kv_bits}"
    return _run_worker(_checkpoint(name, root), out, "single", 1, kv_bits)[0]


CASES = [
    ("llama", "tensor", 2, 0),
    ("llama", "tensor", 2, 3),
    ("llama", "tensor", 4, 3),
    ("qwen3_moe", "tensor", 2, 3),
    ("qwen3_moe", "tensor", 4, 0),
    ("qwen3_moe", "pipeline", 2, 3),
    ("qwen3_moe", "pipeline", 4, 0),
]


@pytest.mark.parametrize(("name", "mode", "ranks", "kv_bits"), CASES)
def test_sharded_run_equals_one_process(ring, workdir, name, mode, ranks, kv_bits):
    root = str(workdir)
    ref = _reference(name, root, kv_bits)
    out = workdir / f"{name}-{mode}-{ranks}-{kv_bits}"
    results = _run_worker(_checkpoint(name, root), out, mode, ranks, kv_bits)
    assert [r["rank"] for r in results] == list(range(ranks))
    assert all(r["size"] == ranks for r in results)
    want = np.array(ref["logits"])
    scale = np.abs(want).max()
    for r in results:
        assert r["tokens"] == ref["tokens"], f"rank {r['rank']} tokens differ"
        got = np.array(r["logits"])
        assert np.abs(got - want).max() <= LOGIT_TOL * scale, f"rank {r['rank']} logits differ"
    if kv_bits:
        assert all(r["kv_types"] == ["TurboQuantKVCache"] for r in results)
    if mode == "tensor":
        # Each rank's attention keeps n_kv_heads / N heads, and its cache only those.
        heads = CONFIGS[name]["num_key_value_heads"]
        assert ref["kv_heads"] == [heads]
        for r in results:
            assert r["kv_heads"] == [heads // ranks]
            assert r["kv_bytes"] * ranks == pytest.approx(ref["kv_bytes"], rel=0.02)
            assert r["param_bytes"] < ref["param_bytes"]
    else:
        # Pipeline: the layers, and the cache, are split between the ranks.
        assert sum(r["kv_bytes"] for r in results) == pytest.approx(ref["kv_bytes"], rel=0.02)
        assert max(r["kv_bytes"] for r in results) < ref["kv_bytes"]


def _tq(*args: str) -> list[str]:
    return [sys.executable, "-m", "tq_cli", *args]


def _generate_args(checkpoint: Path, stats: Path, *extra: str) -> list[str]:
    prompt = " ".join(f"w{t}" for t in PROMPT.split(","))
    return [
        "generate", "--model", str(checkpoint), "--prompt", prompt, "--max-tokens", "10",
        "--min-tokens", "10", "--temp", "0", "--stats-json", str(stats),
        "--kv-bits", "3", "--kv-sink", "4", "--kv-buffer", "4", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(("name", "mode"), [("llama", "tensor"), ("qwen3_moe", "pipeline")])
def test_tq_generate_distributed_prints_the_single_process_text(ring, workdir, name, mode):
    checkpoint = _checkpoint(name, str(workdir))
    single = subprocess.run(
        _tq(*_generate_args(checkpoint, workdir / f"cli-{name}-single.json")),
        capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env(),
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    stats = workdir / f"cli-{name}-{mode}-{{rank}}.json"
    launched = subprocess.run(
        [*_launcher(), "--backend", "ring", "-n", "2", "--python", sys.executable,
         "-m", "tq_cli", *_generate_args(checkpoint, stats, "--distributed", mode)],
        capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env(), cwd=ROOT,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    words = single.stdout.split()
    assert len(words) == 10
    # Rank 0 alone prints the text; the greedy tokens are the single process's.
    assert launched.stdout.split() == words
    assert "rank 1 of 2" in launched.stderr
    per_rank = [json.loads((workdir / f"cli-{name}-{mode}-{r}.json").read_text()) for r in (0, 1)]
    assert [s["distributed"]["rank"] for s in per_rank] == [0, 1]
    assert all(s["generation_tokens"] == 10 for s in per_rank)


def test_a_wrong_host_list_ends_with_a_clear_error_in_bounded_time(workdir):
    # A hostfile naming two ranks where only rank 0 is ever started: the ring waits for its
    # peer forever unless the watchdog ends it.
    hostfile = workdir / "hosts.json"
    hostfile.write_text(json.dumps([["127.0.0.1:47311"], ["127.0.0.1:47312"]]))
    env = _env() | {"MLX_HOSTFILE": str(hostfile), "MLX_RANK": "0"}
    args = _generate_args(_checkpoint("llama", str(workdir)), workdir / "never.json")
    proc = subprocess.run(
        _tq(*args, "--distributed", "--dist-backend", "ring", "--dist-timeout", "3"),
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == -15  # SIGTERM from the watchdog
    assert "no progress for 3 s while waiting for the other ranks to join" in proc.stderr
    assert "host list" in proc.stderr


def test_a_rank_that_dies_ends_every_rank(ring, workdir):
    checkpoint = _checkpoint("llama", str(workdir))
    out = workdir / "dies"
    cmd = [*_launcher(), "--backend", "ring", "-n", "2", "--python", sys.executable,
           str(WORKER), "--checkpoint", str(checkpoint), "--out", str(out), "--mode", "tensor",
           "--prompt", PROMPT, "--die-rank", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env())
    assert proc.returncode != 0 or "exited with code" in proc.stderr
    assert "rank 1 exits on purpose" in proc.stderr
    assert not list(out.glob("rank*.json"))  # rank 0 never finished its generation
