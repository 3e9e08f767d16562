"""Bad input, one row per case: the parser either accepts it as documented or raises the project's
error with one line naming the file, line or field (and the limit where there is one)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import ROOT
from edgeshard_mpi.cluster import MAX_SLOTS, HostfileError, parse_hostfile
from edgeshard_mpi.jobs import MAX_LINE_BYTES, Job, JobError, count_prompts, read_prompts
from edgeshard_mpi.models import ModelError, ModelSpec
from edgeshard_mpi.planner import Plan, PlanError, even_plan
from edgeshard_mpi.profiler import Profile, ProfileError, cluster_fingerprint, model_fingerprint

BOM = b"\xef\xbb\xbf"


def _one_line(message: str) -> None:
    assert "\n" not in message and len(message) < 400, message


# -- hostfiles ---------------------------------------------------------------------------------------
def _hosts(tmp_path, data: bytes):
    p = tmp_path / "c.hosts"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("data,needle", [
    (b"h:0\n", "c.hosts:1: slots '0' is not a positive integer"),
    (b"h:x\n", "c.hosts:1: slots 'x' is not a positive integer"),
    (b"h:-1\n", "c.hosts:1: slots '-1' is not a positive integer"),
    (b"h:\n", "c.hosts:1: slots '' is not a positive integer"),
    ("h:\u00b2\n".encode(), "c.hosts:1: slots '\u00b2'"),  # a digit to str.isdigit, not to int()
    (b"h:99999999999\n", f"c.hosts:1: slots '99999999999' is not a positive integer (1 to {MAX_SLOTS})"),
    (b"a:40000\nb:40000\n", f"c.hosts:2: the hostfile declares more than {MAX_SLOTS} slots"),
    (b"ok:1\n# device: name=a speed=3\nh:1\n", "c.hosts:2: unknown device field 'speed' (known: clock, dtype, latency, "
                                               "link, memory, name, quantize, slowdown, threads, torch)"),
    (b"# device: name=a memory=8G\nh:1\n", "c.hosts:1: field memory: '8G' is not a size"),
    (b"# device: name=a memory=8 gigs\nh:1\n", "c.hosts:1: device field 'gigs' is not key=value"),
    (b"# device: name=a memory=0GiB\nh:1\n", "c.hosts:1: field memory must be positive"),
    (b"# device: name=a memory=" + b"9" * 400 + b"\nh:1\n", "c.hosts:1: field memory: "),
    (b"# device: name=a\n# device: name=b\nh:1\n", "c.hosts:3: host h has 1 slot(s) but 2 device declarations "
                                                   "above it, on lines 1, 2"),
    (b"# device: name=a\nh:1\n# device: name=a\nk:1\n", "c.hosts:3: device name a declared more than once "
                                                        "(also at line 1)"),
    (b"h:2\nh-1:1\n", "c.hosts:2: device name h-1 declared more than once (also at line 1)"),
    (b"# device: name=a memory=1GiB memory=2GiB\nh:1\n", "c.hosts:1: device field 'memory' given twice"),
    (b"# device: name=a slowdown=inf\nh:1\n", "c.hosts:1: device a: slowdown must be a finite number >= 1"),
    (b"# device: name=a slowdown=nan\nh:1\n", "c.hosts:1: device a: slowdown must be a finite number >= 1"),
    (b"# device: name=a slowdown=0.5\nh:1\n", "c.hosts:1: device a: slowdown must be a finite number >= 1"),
    (b"# device: name=a link=0Mbit\nh:1\n", "c.hosts:1: device a: link bandwidth must be positive"),
    (b"# device: name=a threads=0\nh:1\n", "c.hosts:1: field threads='0' is not a positive integer"),
    (b"# device: name=a threads=two\nh:1\n", "c.hosts:1: field threads='two' is not a positive integer"),
    (b"# device: name=a slowdown=2 threads=4\nh:1\n", "c.hosts:1: device a: an emulated device (slowdown=2.0) "
                                                      "computes on one thread, got threads=4"),
    (b"# device: name=a latency=" + b"9" * 400 + b"s\nh:1\n", "c.hosts:1: field latency: "),
    (b"# device: name=a torch=cuda:x\nh:1\n", "c.hosts:1: field torch='cuda:x'"),
    (b"# device: name=a dtype=fp16\nh:1\n", "c.hosts:1: field dtype='fp16' is not one of float32, bfloat16, float16"),
    (b"# device: name=a quantize=int4\nh:1\n", "c.hosts:1: field quantize='int4' is not one of int8, none"),
    (b"# device: name=a dtype=bfloat16 dtype=float16\nh:1\n", "c.hosts:1: device field 'dtype' given twice"),
    (b"h:1\nk:1 # fast\n", "c.hosts:2: trailing comments are not allowed"),
    (b"a b:1\n", "c.hosts:1: 'a b:1' is not 'host' or 'host:slots'"),
    (b"h:1\n\xffk:1\n", "c.hosts:2: not UTF-8 (byte 0xff at column 1)"),
    (b"# device: name=a\n", "c.hosts:1: device declaration is not followed by a host line"),
    (b"\n# nothing\n", "c.hosts: no host lines"),
])
def test_hostfile_errors(tmp_path, data, needle):
    with pytest.raises(HostfileError) as e:
        parse_hostfile(_hosts(tmp_path, data))
    assert needle in str(e.value)
    _one_line(str(e.value))


@pytest.mark.parametrize("data,expected", [
    (b"# device: name=a memory=8GB\nh:1\n", [("a", "h", 8 * 10**9)]),  # decimal: 10^9
    (b"# device: name=a memory=8GiB\nh:1\n", [("a", "h", 8 * 2**30)]),  # binary: 2^30
    (BOM + b"# device: name=a memory=1MiB\nh:1\n", [("a", "h", 2**20)]),  # BOM dropped, not part of a name
    (BOM + b"h:1\n", [("h", "h", None)]),
    (b"# device: name=a\r\nh:1\r\n\r\nk\r\n", [("a", "h", None), ("k", "k", None)]),  # CRLF
    (b"# device: name=a\nh:2\n", [("a-0", "h", None), ("a-1", "h", None)]),
])
def test_hostfile_accepted(tmp_path, data, expected):
    c = parse_hostfile(_hosts(tmp_path, data))
    assert [(d.name, d.host, d.memory) for d in c.devices] == expected


def test_more_ranks_than_slots_names_both_counts(tmp_path):
    c = parse_hostfile(_hosts(tmp_path, b"h:2\n"))
    with pytest.raises(HostfileError, match=r"c.hosts: declares 2 slot\(s\) but 3 ranks were started"):
        c.for_world(3)


# -- job files ---------------------------------------------------------------------------------------
HEAD = b'model = "m"\nprompts = "p.jsonl"\n'


@pytest.mark.parametrize("data,needle", [
    (HEAD + b"modle = 1\n", "j.toml: unknown field(s) 'modle' (known: "),
    (HEAD + b"[generation]\ntemprature = 1\n", "j.toml: [generation]: unknown field(s) 'temprature'"),
    (HEAD + b'[plan]\nsplit = "even"\nobjectiv = "latency"\n', "j.toml: [plan]: unknown field(s) 'objectiv'"),
    (b'model = 5\nprompts = "p.jsonl"\n', "j.toml: field 'model' must be a string, got 5"),
    (HEAD + b'micro_batch_size = "4"\n', "j.toml: field 'micro_batch_size' must be an integer, got '4'"),
    (HEAD + b"micro_batch_size = 2.0\n", "j.toml: field 'micro_batch_size' must be an integer, got 2.0"),
    (HEAD + b'chat = "yes"\n', "j.toml: field 'chat' must be true or false"),
    (HEAD + b"[generation]\nstop = [1]\n", "j.toml: [generation]: field 'stop' must be a non-empty string"),
    (HEAD + b"[generation]\nmax_new_tokens = -3\n", "j.toml: [generation]: field 'max_new_tokens' must be >= 1, got -3"),
    (HEAD + b"[generation]\nmax_new_tokens = 0\n", "field 'max_new_tokens' must be >= 1, got 0"),
    (HEAD + b"micro_batch_size = 0\n", "j.toml: field 'micro_batch_size' must be >= 1, got 0"),
    (HEAD + b"micro_batches = 0\n", "j.toml: field 'micro_batches' must be >= 1, got 0"),
    (HEAD + b"[generation]\ntemperature = nan\n", "field 'temperature' must be a finite number, got nan"),
    (HEAD + b"[generation]\ntop_p = inf\n", "field 'top_p' must be a finite number, got inf"),
    (HEAD + b"[generation]\ntop_k = -1\n", "j.toml: [generation]: top_k must be >= 0"),
    (HEAD + b"[generation]\nseed = -1\n", "j.toml: [generation]: seed must be in [0, 2**53)"),
    (HEAD + b'schedule = "fast"\n', "j.toml: field 'schedule' must be one of"),
    (HEAD + b'[plan]\nsplit = "even"\nobjective = "latency"\n', "j.toml: [plan] takes exactly one of"),
    (HEAD + b"generation = 3\n", "j.toml: [generation] must be a table"),
    (b'model = "m\xff"\nprompts = "p.jsonl"\n', "j.toml:1: not UTF-8 (byte 0xff at column 11)"),
    (HEAD + b"x = [\n", "j.toml: not valid TOML"),
])
def test_job_errors(tmp_path, data, needle):
    p = tmp_path / "j.toml"
    p.write_bytes(data)
    with pytest.raises(JobError) as e:
        Job.load(p)
    assert needle in str(e.value)
    _one_line(str(e.value))


def test_job_with_bom_and_crlf_is_accepted(tmp_path):
    p = tmp_path / "j.toml"
    p.write_bytes(BOM + b'model = "m"\r\nprompts = "p.jsonl"\r\n[generation]\r\nmax_new_tokens = 5\r\n')
    job = Job.load(p)
    assert job.prompts == str(tmp_path / "p.jsonl") and job.generation.max_new_tokens == 5


# -- prompt files ------------------------------------------------------------------------------------
GOOD = b'{"id": "a", "prompt": "fine"}\n'


def _prompts(tmp_path, data: bytes, suffix: str = ".jsonl"):
    p = tmp_path / f"p{suffix}"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("data,needle", [
    (GOOD + b'{"id": "b", "prompt": "caf\xe9"}\n', "p.jsonl:2: not UTF-8 (byte 0xe9 at column 27)"),
    (GOOD + b'{"id": "b", "prompt": "' + b"x" * MAX_LINE_BYTES + b'"}\n',
     f"p.jsonl:2: line longer than the 1 MiB limit ({MAX_LINE_BYTES} bytes)"),
    (GOOD + b'{"id": "b"}\n', "p.jsonl:2: give exactly one of 'prompt' or 'messages'"),
    (GOOD + b'{"id": "b", "prompt": 3}\n', "p.jsonl:2: field 'prompt' must be a string"),
    (GOOD + b"\n" + b'{"id": "a", "prompt": "again"}\n', "p.jsonl:3: id 'a' appears twice in the prompt file "
                                                        "(lines 1 and 3)"),
    (b'{"prompt": "no id: its line number is its id"}\n{"id": 1, "prompt": "x"}\n',
     "p.jsonl:2: id '1' appears twice in the prompt file (lines 1 and 2)"),
    (GOOD + b'{"id": "", "prompt": "x"}\n', "p.jsonl:2: field 'id' is empty"),
    (GOOD + b'{"id": true, "prompt": "x"}\n', "p.jsonl:2: field 'id' must be a string or an integer"),
    (GOOD + b'{"id": "b", "prompt": "x"', "p.jsonl:2: not valid JSON"),
    (GOOD + b"[" * 100_000 + b"\n", "p.jsonl:2: not valid JSON (nested too deeply)"),
    (GOOD + b"1" * 5000 + b"\n", "p.jsonl:2: not valid JSON (Exceeds the limit (4300 digits)"),
    (GOOD + b'{"id": "b", "prompt": "\\ud800"}\n', "p.jsonl:2: a string holds an unpaired surrogate"),
    (GOOD + b'{"id": "b", "prompt": "x", "temperature": NaN}\n', "p.jsonl:2: field 'temperature' must be a finite"),
    (GOOD + b'{"id": "b", "prompt": "x", "max_new_tokens": -1}\n', "p.jsonl:2: field 'max_new_tokens' must be >= 1"),
    (GOOD + b'{"id": "b", "prompt": "x", "eval": "1"}\n', "p.jsonl:2: unknown field(s) 'eval'"),
    (BOM + GOOD + BOM + b'{"id": "b", "prompt": "x"}\n', "p.jsonl:2: not valid JSON"),  # a BOM only starts a file
])
def test_prompt_errors(tmp_path, data, needle):
    with pytest.raises(JobError) as e:
        list(read_prompts(_prompts(tmp_path, data)))
    assert needle in str(e.value)
    _one_line(str(e.value))


@pytest.mark.parametrize("data,suffix,expected", [
    (GOOD + b"\n   \n\t\n" + b'{"id": "b", "prompt": "x"}\n', ".jsonl", [("a", "fine"), ("b", "x")]),  # blank lines
    (BOM + GOOD, ".jsonl", [("a", "fine")]),
    (GOOD.replace(b"\n", b"\r\n") + b'{"id": "b", "prompt": "x"}\r\n', ".jsonl", [("a", "fine"), ("b", "x")]),
    (GOOD + b'{"id": "b", "prompt": "no newline at the end"}', ".jsonl", [("a", "fine"), ("b", "no newline at the end")]),
    (BOM + b"first\r\n\r\nthird\n", ".txt", [("1", "first"), ("3", "third")]),
    (b'__import__("os").system("false")\n', ".txt", [("1", '__import__("os").system("false")')]),  # text, not code
    # exactly the limit is accepted; the CR of a CRLF does not count towards it
    (b'{"id": "b", "prompt": "' + b"y" * (MAX_LINE_BYTES - 25) + b'"}\r\n', ".jsonl",
     [("b", "y" * (MAX_LINE_BYTES - 25))]),
])
def test_prompts_accepted(tmp_path, data, suffix, expected):
    p = _prompts(tmp_path, data, suffix)
    assert [(r.id, r.prompt) for r in read_prompts(p)] == expected
    assert count_prompts(p) == len(expected)


def test_prompt_error_comes_after_the_good_lines(tmp_path):
    # streaming: the requests before a bad line are yielded (and can run) before the error stops the job
    p = _prompts(tmp_path, GOOD + b'{"id": "b", "prompt": "ok"}\n\xff\n')
    got = []
    with pytest.raises(JobError, match="p.jsonl:3: not UTF-8"):
        for r in read_prompts(p):
            got.append(r.id)
    assert got == ["a", "b"]


def test_count_prompts_across_chunk_boundaries(tmp_path):
    # count_prompts reads 1 MiB chunks: a line that straddles a chunk boundary is counted once
    line = b'{"prompt": "' + b"z" * (2**20 - 40) + b'"}\n'
    p = _prompts(tmp_path, b"\n" + line + b"  \n" + line + line[:-1])
    assert count_prompts(p) == 3 == len(list(read_prompts(p)))


# -- models ------------------------------------------------------------------------------------------
def _model_copy(tmp_path, tiny_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(tiny_path, dst)
    return dst


def _edit_config(m, **changes):
    c = json.loads((m / "config.json").read_text())
    c.update(changes)
    (m / "config.json").write_text(json.dumps(c))


def _edit_tensors(m, fn):
    from safetensors.torch import load_file, save_file

    t = load_file(m / "model.safetensors")
    fn(t)
    save_file(t, m / "model.safetensors")


def _drop(key):
    return lambda t: t.pop(key)


def _set(key, value):
    def fn(t):
        import torch

        t[key] = value(torch) if callable(value) else value
    return fn


MODEL_CASES = [
    ("missing tensor", lambda m: _edit_tensors(m, _drop("model.layers.3.mlp.up_proj.weight")),
     "m: unit block.3 is missing tensor(s) model.layers.3.mlp.up_proj.weight"),
    ("missing norm", lambda m: _edit_tensors(m, _drop("model.norm.weight")),
     "m: unit head is missing tensor(s) model.norm.weight"),
    ("wrong shape", lambda m: _edit_tensors(m, _set("model.layers.1.self_attn.k_proj.weight",
                                                    lambda torch: torch.zeros(16, 64))),
     "m/model.safetensors: tensor model.layers.1.self_attn.k_proj.weight has shape [16, 64], config.json implies [32, 64]"),
    ("integer weights", lambda m: _edit_tensors(m, _set("model.layers.0.input_layernorm.weight",
                                                        lambda torch: torch.zeros(64, dtype=torch.int8))),
     "m/model.safetensors: tensor model.layers.0.input_layernorm.weight has dtype I8"),
    ("tensor the config does not describe", lambda m: _edit_tensors(m, _set("model.layers.0.self_attn.q_proj.bias",
                                                                          lambda torch: torch.zeros(64))),
     "m/model.safetensors: tensor(s) model.layers.0.self_attn.q_proj.bias are not in the llama model "
     "config.json describes (num_hidden_layers=6, attention_bias=False"),
    ("fewer layers than the weights", lambda m: _edit_config(m, num_hidden_layers=5),
     "tensor(s) model.layers.5."),
    ("more layers than the weights", lambda m: _edit_config(m, num_hidden_layers=10**9),
     "m: unit block.6 is missing tensor(s)"),
    ("untied head without lm_head", lambda m: _edit_config(m, tie_word_embeddings=False),
     "m: unit head is missing tensor(s) lm_head.weight"),
    ("model_type gpt2", lambda m: _edit_config(m, model_type="gpt2"),
     "m/config.json: model_type 'gpt2' is not supported (supported: llama, mistral, qwen2, qwen3, phi3, gemma2, "
     "gemma3_text)"),
    ("mixture of experts", lambda m: _edit_config(m, model_type="mixtral"), "model_type 'mixtral' is not supported"),
    ("another family's config on llama weights", lambda m: _edit_config(m, model_type="qwen2"),
     "m: unit block.0 is missing tensor(s) model.layers.0.self_attn.k_proj.bias"),
    ("no model_type", lambda m: _edit_config(m, model_type=None), "m/config.json: model_type None is not supported"),
    ("remote code in config", lambda m: _edit_config(m, auto_map={"AutoModelForCausalLM": "evil.Model"}),
     "m/config.json: field 'auto_map' points to custom code, which is never run"),
    ("remote code in tokenizer", lambda m: (m / "tokenizer_config.json").write_text(json.dumps(
        {**json.loads((m / "tokenizer_config.json").read_text()), "auto_map": {"AutoTokenizer": ["e.T", None]}})),
     "m/tokenizer_config.json: field 'auto_map' points to custom code"),
    ("quantized", lambda m: _edit_config(m, quantization_config={"quant_method": "gptq"}),
     "m/config.json: field 'quantization_config' is set"),
    ("string hidden_size", lambda m: _edit_config(m, hidden_size="64"),
     "m/config.json: field 'hidden_size' must be a positive integer, got '64'"),
    ("missing vocab_size", lambda m: _edit_config(m, vocab_size=None),
     "m/config.json: field 'vocab_size' must be a positive integer, got None"),
    ("kv heads", lambda m: _edit_config(m, num_key_value_heads=3),
     "m/config.json: num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("activation", lambda m: _edit_config(m, hidden_act="wiggle"), "m/config.json: field 'hidden_act' 'wiggle'"),
    ("config not JSON", lambda m: (m / "config.json").write_text("{oops"), "m/config.json: not valid JSON"),
    ("config a list", lambda m: (m / "config.json").write_text("[]"), "m/config.json: expected a JSON object"),
    ("damaged safetensors", lambda m: (m / "model.safetensors").write_bytes(b"garbage"),
     "m/model.safetensors: not a readable safetensors file"),
    ("index outside the folder", lambda m: (m / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "../other/model.safetensors"}})),
     "m/model.safetensors.index.json: weight_map names '../other/model.safetensors', which is not a file in"),
    ("index that lies", lambda m: (m / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "model.safetensors", "x.weight": "model.safetensors"}})),
     "m/model.safetensors.index.json: weight_map puts tensor x.weight in model.safetensors, but no file holds it"),
    ("pickle only", lambda m: (m / "model.safetensors").rename(m / "pytorch_model.bin"),
     "m/pytorch_model.bin: weights in pickle format are never loaded (unpickling can run arbitrary code)"),
]


@pytest.mark.parametrize("case,mutate,needle", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_model_errors(tmp_path, tiny_path, case, mutate, needle):
    m = _model_copy(tmp_path, tiny_path)
    mutate(m)
    with pytest.raises(ModelError) as e:
        ModelSpec.load(m)
    assert needle in str(e.value)
    _one_line(str(e.value))


def test_shipped_models_still_load(tiny_path):
    spec = ModelSpec.load(tiny_path)
    assert spec.num_units == 8 and spec.units[-1].tensors == ("model.norm.weight", "model.embed_tokens.weight")


# -- profiles and plans made for another model or cluster ------------------------------------------------
def _devices(*names):
    from edgeshard_mpi.cluster import Device

    return [Device(name=n).to_dict() for n in names]


def _profile_for(spec, devices) -> Profile:
    n = spec.num_units
    return Profile(
        model={"name": spec.name, "fingerprint": model_fingerprint(spec), "dtype": spec.dtype, "num_units": n},
        units=[{"name": u.name, "param_bytes": u.param_bytes, "kv_bytes_per_token": u.kv_bytes_per_token,
                "out_bytes_per_token": u.out_bytes_per_token} for u in spec.units],
        devices=[{**d, "prefill_s": [1e-3] * n, "decode_s": [1e-4] * n} for d in devices],
        bandwidth=[[None if k == j else 1e9 for j in range(len(devices))] for k in range(len(devices))],
        latency=[[0.0] * len(devices) for _ in devices],
        shapes={"prompt_tokens": 8, "context": 16, "micro_batch_size": 1},
        cluster=cluster_fingerprint(devices), source="p.json")


def test_profile_for_another_cluster_is_refused_naming_both_hashes(tiny_path):
    spec = ModelSpec.load(tiny_path)
    here = _devices("local0", "local1")
    prof = _profile_for(spec, _devices("local0", "board"))
    prof.check_for(spec.name, model_fingerprint(spec), prof.cluster, _devices("local0", "board"))  # its own: fine
    with pytest.raises(ProfileError) as e:
        prof.check_for(spec.name, model_fingerprint(spec), cluster_fingerprint(here), here, "two.hosts")
    msg = str(e.value)
    assert f"p.json: profile is for cluster {prof.cluster}, not two.hosts ({cluster_fingerprint(here)})" in msg
    assert "rank 1 name was 'board', is 'local1'" in msg
    with pytest.raises(ProfileError, match="2 devices profiled, 3 running"):
        three = _devices("local0", "local1", "local2")
        prof.check_for(spec.name, model_fingerprint(spec), cluster_fingerprint(three), three)


def test_profile_for_another_model_is_refused_naming_both_hashes(tiny_path, tmp_path):
    spec = ModelSpec.load(tiny_path)
    other = ModelSpec.load(tiny_path, "bfloat16")  # same folder, other dtype: other content hash
    here = _devices("local0", "local1")
    prof = _profile_for(other, here)
    with pytest.raises(ProfileError) as e:
        prof.check_for(spec.name, model_fingerprint(spec), cluster_fingerprint(here), here)
    assert (f"profile is for model '{other.name}' ({model_fingerprint(other)}), not {spec.name} "
            f"({model_fingerprint(spec)})") in str(e.value)


def test_saved_plan_carries_its_hashes_and_is_refused_elsewhere(tmp_path):
    from edgeshard_mpi.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "--profile", str(ROOT / "profiles" / "paper-llama2-7b.json"), "--json",
                 "--out", str(out)]) == 0
    plan = Plan.load(out)
    assert (plan.model, plan.cluster) == ("paper-llama2-7b", "paper-testbed-15")
    plan.check_for("paper-llama2-7b", "paper-testbed-15")  # the model and cluster it was made for
    with pytest.raises(PlanError) as e:
        plan.check_for("a459c46e30cf4674", "paper-testbed-15")
    assert str(e.value) == (f"{out}: plan was made for model paper-llama2-7b, not this model (a459c46e30cf4674); "
                            "plan again from a profile of this model")
    with pytest.raises(PlanError, match="plan was made for cluster paper-testbed-15, not this cluster \\(c0ffee\\)"):
        plan.check_for("paper-llama2-7b", "c0ffee")
    even_plan(8, 2).check_for("anything", "anything")  # a plan without hashes (even split, hand-written) is not checked


@pytest.mark.parametrize("data,needle", [
    (b"[1, 2]", "plan.json: expected a JSON object with stages, got list"),
    (b"{oops", "plan.json: not valid JSON"),
    (b"\xff", "plan.json: not valid JSON"),
    (b'{"stages": [{"rank": 0, "first": 0, "last": 7}], "model": 5}', "plan.json: model and cluster must be"),
])
def test_plan_file_errors(tmp_path, data, needle):
    p = tmp_path / "plan.json"
    p.write_bytes(data)
    with pytest.raises(PlanError) as e:
        Plan.load(p, 8)
    assert needle in str(e.value)



@pytest.mark.parametrize("data,needle", [
    (b"\xff", "p.json: not valid JSON"),
    (b"[]", "p.json: expected an edgeshard profile"),
    (b'{"format": "edgeshard-profile/1", "model": 3}', "p.json: not a valid profile"),
    (b'{"format": "edgeshard-profile/1", "model": {"num_units": 1}, "units": [{}], "devices": 5, '
     b'"bandwidth": [], "latency": [], "shapes": {}}', "p.json: not a valid profile"),
])
def test_profile_file_errors(tmp_path, data, needle):
    p = tmp_path / "p.json"
    p.write_bytes(data)
    with pytest.raises(ProfileError) as e:
        Profile.load(p)
    assert needle in str(e.value)
