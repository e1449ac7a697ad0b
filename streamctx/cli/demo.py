"""The bundled demo job: multi-session conversations through SmolLM2.

The spec lives in `streamctx/data/demo_job.yaml` (package data) next to its conversations; the
command line overrides the runner, the model, the reply length and the output folder.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from streamctx.cli.errors import CLIError
from streamctx.cli.outputs import with_output_dir

if TYPE_CHECKING:
    from streamctx.spec import JobSpec

DEMO_SPEC = "demo_job.yaml"


def demo_spec_data() -> dict[str, Any]:
    """The demo job spec as a mapping."""
    text = resources.files("streamctx.data").joinpath(DEMO_SPEC).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def build_demo_spec(
    *, out: Path, runner: str | None = None, model: str | None = None, max_new_tokens: int | None = None
) -> JobSpec:
    """The demo `JobSpec`, writing under `out`.

    `model`: a known name (smollm2) or a path (GGUF file or Hugging Face folder).
    """
    from pydantic import ValidationError

    from streamctx.spec import JobSpec

    data = demo_spec_data()
    if runner:
        data["runner"]["type"] = runner
    if model:
        if Path(model).expanduser().exists():
            data["model"].update(name=None, path=str(Path(model).expanduser().resolve()))
        elif "/" in model or model.endswith(".gguf"):
            raise CLIError(f"--model: not found: {model}")
        else:
            data["model"].update(name=model, path=None)
    if max_new_tokens:
        data["model"]["max_new_tokens"] = max_new_tokens
    data_dir = Path(str(resources.files("streamctx.data")))
    try:
        spec = JobSpec.from_dict(data, base_dir=data_dir)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(x) for x in first["loc"])
        raise CLIError(f"demo spec: {field}: {first['msg']}") from None
    return with_output_dir(spec, out)
