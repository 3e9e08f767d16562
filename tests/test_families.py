"""Every supported family, on seeded random weights: tokens equal transformers' `generate` cut over 3
ranks; GGUF files converted and run; a family or GGUF file that cannot run is a clear error."""

from __future__ import annotations

import json

import pytest

from conftest import Launches, reference_tokens, run_mpi, write_job
from edgeshard_mpi.models import ModelError, ModelSpec, prepare
from edgeshard_mpi.results import read_attrs, read_results
from family_models import FAMILY_CONFIGS, WINDOW, random_model, save_family, write_gguf

# Four prompts in micro-batches of 3: mixed lengths share a micro-batch (left padding), and the long
# one (about 50 tokens) is past every sliding window (16), so sliding layers really slide.
PROMPTS = [
    "Paris is",
    "In a distant galaxy, a lone explorer discovered",
    "The three laws of thermodynamics state that energy cannot be created or destroyed, that the entropy of "
    "an isolated system never decreases, and that the entropy of a perfect crystal at absolute zero is zero; "
    "from these it follows that",
    "def fibonacci(n):",
]
NEW_TOKENS = 10
# 8 units (embedding, 6 blocks, head); the head on rank 1 and the embedding on rank 0, so a tied head
# reads the embedding matrix on another rank; ranks out of order, as a plan may put them
CUT = "[plan]\nstages = [{rank = 0, first = 0, last = 2}, {rank = 2, first = 3, last = 5}, {rank = 1, first = 6, last = 7}]\n"


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = save_family(family, tmp_path_factory.mktemp(family))
        return made[family]
    return get


def _job(folder, model, plan="", name="job"):
    return write_job(folder, model, [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)], name=name,
                     extra="micro_batch_size = 3", plan=plan, generation=f"max_new_tokens = {NEW_TOKENS}")


def _run(tmp_path, model, n, plan="", name="job"):
    proc = run_mpi(["run", str(_job(tmp_path, model, plan, name)), "--no-progress"], n)
    assert proc.returncode == 0, proc.stderr
    by_id = {r.id: r.token_ids for r in read_results(tmp_path / f"{name}.h5")}
    return [by_id[f"p{i}"] for i in range(len(PROMPTS))], tmp_path / f"{name}.h5"


# The whole model on one rank as well for the families whose forward adds to their modules (Gemma's
# soft-cap, Gemma 3's RoPE per layer type) and one without; the cut run covers every code path of
# the others (padding, sliding layers, a tied head on another rank than its embedding).
ONE_RANK = {"qwen2", "gemma2", "gemma3_text"}


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, family_dir):
    """(family, ranks) -> its Launch: every family's cut over 3 ranks in one launch, and the ONE_RANK
    families whole in another."""
    root = tmp_path_factory.mktemp("family-runs")
    jobs = {(f, 3): _job(root, family_dir(f), CUT, name=f"{f}-three") for f in FAMILY_CONFIGS}
    jobs.update({(f, 1): _job(root, family_dir(f), name=f"{f}-one") for f in sorted(ONE_RANK)})
    return Launches(jobs, lambda key: (key[1], ()), timeout=600)


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_family_equals_generate_cut_over_3_ranks(family_dir, family_runs, family):
    path = family_dir(family)
    want = reference_tokens(path, PROMPTS, NEW_TOKENS, 3)
    assert all(want)  # every request generated something to compare
    if family in ONE_RANK:
        assert [r.token_ids for r in family_runs((family, 1)).results((family, 1))] == want
    launch = family_runs((family, 3))
    assert [r.token_ids for r in launch.results((family, 3))] == want
    stages = json.loads(read_attrs(launch.h5((family, 3)))["summary"])["stages"]
    assert [(s["rank"], s["units"]) for s in stages] == [(0, "embed..block.1"), (2, "block.2..block.4"),
                                                         (1, "block.5..head")]


def test_a_held_head_keeps_its_plain_matrix_only_beside_an_embedding_it_is_tied_to(family_dir):
    """Whether a profile must time the head's transposed rows when the other matrices are held
    (fewrows.forms): an untied head is held as they are; a tied one, beside its embedding, keeps the
    embedding's matrix when they are reordered, and on panels too where the embedding is not a plain
    one (Gemma scales its output), which cannot read panels."""
    from edgeshard_mpi.fewrows import _head_may_stay_plain
    from edgeshard_mpi.models import ModelSpec

    def plain(family, on_panels):
        return _head_may_stay_plain(ModelSpec.load(family_dir(family), "float32"), True, on_panels)

    assert not plain("llama", False) and not plain("llama", True)  # untied
    assert plain("qwen3", False) and not plain("qwen3", True)  # tied, plain embedding
    assert plain("gemma2", False) and plain("gemma2", True)  # tied, scaled embedding


def test_sliding_windows_and_kv_budget_follow_the_config(family_dir):
    # a sliding layer's KV cache is capped at its window a sequence; head_dim and GQA come from the config
    spec = ModelSpec.load(family_dir("gemma2"))
    windows = [u.kv_window for u in spec.units[1:-1]]
    assert windows == [WINDOW, None] * 3
    per_token = 2 * 2 * 16 * 4  # K and V, 2 KV heads, head_dim 16, fp32
    assert {u.kv_bytes_per_token for u in spec.units[1:-1]} == {per_token}
    rows, longest = 3, 100
    assert spec.kv_bytes(1, 6, rows * longest, longest) == per_token * rows * (3 * WINDOW + 3 * longest)
    qwen3 = ModelSpec.load(family_dir("qwen3"))  # explicit head_dim 32 (hidden 64 / 4 heads would be 16)
    assert qwen3.units[1].kv_bytes_per_token == 2 * 2 * 32 * 4
    assert ModelSpec.load(family_dir("qwen3"), "bfloat16").units[1].kv_bytes_per_token == 2 * 2 * 32 * 2


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_model_info_shows_family_units_and_windows(family_dir, capsys, family):
    from edgeshard_mpi.cli import main

    assert main(["model", "info", str(family_dir(family)), "--dtype", "bfloat16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{family_dir(family).name}: {family}, 8 units (6 blocks)") and "bfloat16" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [r[1] for r in rows] == ["embed"] + [f"block.{i}" for i in range(6)] + ["head"]
    slides = family in ("mistral", "qwen2", "gemma2", "gemma3_text")
    assert any(len(r) == 7 and r[5] == str(WINDOW) for r in rows[1:-1]) == slides  # weights "6.75 KiB", window


# -- GGUF ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,quant,ranks", [("llama", "F32", 3), ("qwen2", "Q8_0", 1)])
def test_gguf_file_runs_without_manual_conversion(tmp_path, monkeypatch, capsys, family, quant, ranks):
    import torch

    model, _ = random_model(family, seed=1)
    models = tmp_path / "models"
    monkeypatch.setenv("EDGESHARD_MODELS", str(models))  # an empty models directory: what is converted shows
    gguf = write_gguf(model, family, tmp_path / f"{family}-{quant}.gguf", quant)
    # the job names the .gguf file: the run converts it once (rank 0), then every rank reads the folder
    tokens, _ = _run(tmp_path, gguf.name, ranks, plan=CUT if ranks == 3 else "")
    folder = prepare(str(gguf))  # already converted: the same folder, not a second conversion
    assert [p.name for p in models.iterdir()] == [folder.name]
    spec = ModelSpec.load(folder)
    assert spec.family == family and spec.source["tensor_types"].get(quant, 0) > 0
    # the folder holds the model's weights as the file stores them: bit for bit from a F32 file, and
    # from a Q8_0 file its 2-D weights quantized and dequantized by gguf's own reference code
    import gguf as gg
    from safetensors.torch import load_file

    saved = load_file(folder / "model.safetensors")
    assert saved.keys() == {k for k in model.state_dict() if not (k == "lm_head.weight" and
                                                                   model.config.tie_word_embeddings)}
    for k, t in saved.items():
        own = model.state_dict()[k]
        if quant == "Q8_0" and own.ndim == 2:
            q8 = gg.GGMLQuantizationType.Q8_0
            own = torch.from_numpy(gg.quants.dequantize(gg.quants.quantize(own.numpy(), q8), q8))
        assert torch.equal(t, own), k
    assert tokens == reference_tokens(folder, PROMPTS, NEW_TOKENS, 3)
    from edgeshard_mpi.cli import main

    assert main(["model", "info", str(gguf)]) == 0
    info = capsys.readouterr().out
    assert f"converted from {gguf}" in info and "dequantized" in info and f" {quant}" in info


def _leftovers(models):
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


@pytest.mark.parametrize("case", ["not gguf", "truncated", "unsupported family"])
def test_bad_gguf_is_a_clear_error_leaving_nothing(tmp_path, monkeypatch, case):
    model, _ = random_model("llama")
    models = tmp_path / "models"
    monkeypatch.setenv("EDGESHARD_MODELS", str(models))
    bad = tmp_path / "bad.gguf"
    if case == "not gguf":
        bad.write_text("this is a text file\n")
        needle = f"{bad}: not a GGUF file"
    else:
        if case == "truncated":
            data = write_gguf(model, "llama", tmp_path / "good.gguf").read_bytes()
            bad.write_bytes(data[:len(data) // 2])
            needle = f"{bad}: not a readable GGUF file, truncated or damaged"
        else:  # a family transformers reads from GGUF but the shards do not run: refused before any weight
            import gguf
            import numpy as np

            w = gguf.GGUFWriter(str(bad), "gpt2")
            for add in (w.add_context_length, w.add_embedding_length, w.add_block_count, w.add_head_count):
                add(8)
            w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
            w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
            needle = f"{bad}: model_type 'gpt2' is not supported (supported: llama, mistral"
    with pytest.raises(ModelError) as e:
        prepare(str(bad))
    assert str(e.value).startswith(needle), e.value
    assert "\n" not in str(e.value)
    assert _leftovers(models) == []


def test_config_whose_tensors_do_not_match_names_the_file(tmp_path, family_dir):
    # phi3's config over qwen3's weights: the fused projections are missing, the split ones left over
    import shutil

    m = tmp_path / "m"
    shutil.copytree(family_dir("qwen3"), m)
    config = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
    with pytest.raises(ModelError) as e:
        ModelSpec.load(m)
    assert str(e.value).startswith(f"{m}: unit block.0 is missing tensor(s) model.layers.0.mlp.gate_up_proj.weight")
    # and a config transformers itself refuses (llama3 RoPE scaling under phi3) is one line naming the file
    shutil.copytree(family_dir("llama"), tmp_path / "l")
    config = json.loads((tmp_path / "l" / "config.json").read_text())
    (tmp_path / "l" / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
    with pytest.raises(ModelError) as e:
        ModelSpec.load(tmp_path / "l")
    assert str(e.value).startswith(f"{tmp_path / 'l' / 'config.json'}: transformers refuses it as a phi3 config")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("saved", ["bfloat16", "float16"])
def test_half_precision_checkpoint_runs_in_an_fp32_job(tmp_path, saved):
    # in-process: two shards chained by hand, greedy, against generate on the same checkpoint read as fp32
    import torch

    from edgeshard_mpi.shard import Shard

    model, tok = random_model("qwen3")
    model.to(getattr(torch, saved)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    spec = ModelSpec.load(tmp_path, "float32")
    assert spec.units[1].param_bytes == 4 * sum(p.numel() for n, p in model.named_parameters()
                                                if n.startswith("model.layers.0."))
    shards = [Shard(spec, 0, 3), Shard(spec, 4, spec.num_units - 1)]
    assert {p.dtype for s in shards for layer in s.layers for p in layer.parameters()} == {torch.float32}
    x, got = tok(PROMPTS[1], return_tensors="pt").input_ids, []
    for step in range(NEW_TOKENS):
        h = x
        for s in shards:
            h = s.forward(0, h, [0] if step == 0 else None)
        got.append(int(h.argmax(-1)))
        x = h.argmax(-1, keepdim=True)
    want = reference_tokens(tmp_path, [PROMPTS[1]], NEW_TOKENS, 1)[0]
    assert got[:len(want)] == want


def test_gguf_folder_dtype_follows_the_file():
    # dequantized values are exact in fp32; a float file keeps its 16-bit matrices (and casts its F32 norms)
    from edgeshard_mpi.gguf_import import _save_dtype

    assert _save_dtype({"Q4_1": 210, "Q8_0": 1, "F32": 61}) == "float32"
    assert _save_dtype({"F16": 168, "F32": 61}) == "float16"
    assert _save_dtype({"BF16": 168, "F32": 61}) == "bfloat16"
    assert _save_dtype({"F32": 229}) == "float32"
