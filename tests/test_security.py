"""Security properties: weights only from safetensors, never custom model code, nothing from a prompt
file evaluated, no listening socket of the tool's own. Static checks of the package source, each
pattern first shown to catch what it is meant to catch, plus loading a model folder that holds a
booby-trapped pickle next to its safetensors."""

from __future__ import annotations

import os
import pickle
import re
import shutil

import pytest

from conftest import ROOT
from edgeshard_mpi.models import ModelError, ModelSpec

PACKAGE = ROOT / "edgeshard_mpi"

# pattern -> (why it is forbidden, a line it must catch)
FORBIDDEN = {
    r"trust_remote_code\s*=\s*True": ("runs code shipped with a model", "m = f(p, trust_remote_code = True)"),
    r"(?<![\w.])eval\s*\(": ("evaluates text", "x = eval(line)"),  # not `module.eval()`, torch's eval mode
    r"(?<![\w.])exec\s*\(": ("executes text", "exec(code)"),
    r"\bpickle\.loads?\s*\(|\bimport\s+(c?pickle|dill|cloudpickle|joblib)\b|\bfrom\s+(c?pickle|dill|joblib)\b":
        ("unpickling runs code", "obj = pickle.load(f)"),
    r"\btorch\.load\s*\(": ("torch.load unpickles", "state = torch.load(path)"),
    r"weights_only\s*=\s*False": ("unpickles arbitrary objects", "torch.load(p, weights_only=False)"),
    r"\byaml\.(unsafe_)?load\s*\(|\bmarshal\.loads?\s*\(": ("deserialises code", "cfg = yaml.load(f)"),
    r"\bimport\s+socket\b|\bfrom\s+socket\b|socketserver|http\.server|xmlrpc|\.listen\s*\(":
        ("opens a socket of its own", "import socket"),
}


def _package_lines():
    for path in sorted(PACKAGE.rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            yield f"{path.relative_to(ROOT)}:{lineno}", line


@pytest.mark.parametrize("pattern", list(FORBIDDEN))
def test_package_source_has_no(pattern):
    why, example = FORBIDDEN[pattern]
    assert re.search(pattern, example), "the pattern must catch its own example"
    hits = [f"{where}: {line.strip()}" for where, line in _package_lines() if re.search(pattern, line)]
    assert not hits, f"{why}:\n" + "\n".join(hits)


def test_the_static_check_reads_the_package():
    # a check that read no files would pass vacuously: make sure it sees the modules that load models
    files = {where.split(":")[0] for where, _ in _package_lines()}
    assert {"edgeshard_mpi/models.py", "edgeshard_mpi/shard.py", "edgeshard_mpi/jobs.py"} <= files
    assert any("safe_open" in line for _, line in _package_lines())


def test_a_folder_with_only_a_pickle_is_refused_naming_it(tmp_path, tiny_path, capsys):
    from edgeshard_mpi.cli import main

    model = tmp_path / "m"
    shutil.copytree(tiny_path, model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"m/pytorch_model.bin: weights in pickle format are never loaded"):
        ModelSpec.load(model)
    assert main(["model", "info", str(model)]) == 1  # the CLI says why in one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("edgeshard: error: ") and "pytorch_model.bin" in err and "arbitrary code" in err
    assert err.count("\n") == 1


class _Trap:
    """Unpickling this makes a folder: proof that the file was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_next_to_the_safetensors_is_never_unpickled(tmp_path, tiny_path):
    from transformers import AutoTokenizer

    from edgeshard_mpi.shard import Shard

    model = tmp_path / "m"
    shutil.copytree(tiny_path, model)
    marker = tmp_path / "unpickled"
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (model / name).write_bytes(pickle.dumps(_Trap(str(marker))))
    pickle.loads((model / "optimizer.pt").read_bytes())  # the trap works...
    assert marker.is_dir()
    marker.rmdir()
    spec = ModelSpec.load(model)  # ...and loading the model, every unit, and its tokenizer never springs it
    Shard(spec, 0, spec.num_units - 1)
    AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    assert not marker.exists()
