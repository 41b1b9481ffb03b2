"""The model artifact's manifest: the contract between the artifact builder, the worker and the api.

`manifest.json` sits beside the model file. It names the file and its sha256, says how to turn an
image into the model's input (`InputSpec`), and lists the labels, index-aligned with the outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1


class InputSpec(BaseModel):
    """How raw image bytes become one model input (CHW float tensor)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize: int = Field(gt=0, description="Shorter side is resized to this many pixels.")
    crop: int = Field(gt=0, description="Then a centred square of this side is cut out.")
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color: Literal["RGB"] = Field(default="RGB", description="Channel order of the input.")
    scale: float = Field(default=1 / 255, description="8-bit values are multiplied by this before mean/std.")
    dtype: Literal["float32"] = "float32"
    layout: Literal["NCHW"] = "NCHW"
    alpha: Literal["composite_white"] = Field(
        default="composite_white", description="Transparent pixels are composited on white."
    )
    jpeg_draft: bool = Field(
        default=False,
        description="JPEGs at least twice `resize` on their shorter side are decoded DCT-scaled "
        "(1/2, 1/4 or 1/8, never below the resized size) before the resize. False (manifests that "
        "predate the field): every JPEG is decoded at full size.",
    )

    @model_serializer(mode="wrap")
    def _omit_jpeg_draft_when_off(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Off, the recipe is the one manifests described before the field existed: leaving it out
        # keeps those manifests (and artifacts built since, without it) byte-identical.
        data = handler(self)
        if not self.jpeg_draft:
            data.pop("jpeg_draft", None)
        return data


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest_version: int = MANIFEST_VERSION
    name: str
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    format: Literal["torchscript"]
    arch: str
    input: InputSpec
    num_classes: int = Field(gt=0)
    labels: list[str]
    source_weights_sha256: str | None = Field(
        default=None, description="sha256 of the weights file the artifact was built from."
    )
    torch_version: str
    torchvision_version: str | None = None

    def to_json(self) -> str:
        """Canonical form: sorted keys, fixed indent, trailing newline, so equal manifests are equal bytes."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def read(cls, artifact_dir: Path) -> Manifest:
        return cls.model_validate_json((artifact_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
