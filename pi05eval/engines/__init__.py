"""How a Pi0.5 model runs: `eager` (op by op), `compile` (torch.compile + CUDA graphs, exact shortcuts).

Engines share one contract, a drop-in for `Pi05Model.sample_actions`:
`prepare(prompt_lengths) -> seconds` (build ahead of the first call), `sample_actions(images, image_masks, tokens,
token_mask, noise) -> actions` and `stage_ms()` (CUDA-event times of the last call, read after synchronizing).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from pi05eval.engines.fast import Shortcuts

ENGINES = ("eager", "compile", "tensorrt")


@dataclass(frozen=True)
class EngineSpec:
    """An engine name plus its options; `label` is how benchmarks and results name it."""

    name: str = "compile"
    shortcuts: dict[str, bool] = field(default_factory=dict)  # Shortcuts fields switched from their default
    options: dict[str, Any] = field(default_factory=dict)  # CompileOptions fields

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ValueError(f"unknown engine {self.name!r}; choices: {', '.join(ENGINES)}")

    @property
    def label(self) -> str:
        opts = [("" if v else "-") + k for k, v in self.shortcuts.items()]
        opts += [f"{k}={v}" for k, v in self.options.items()]
        return self.name + (":" + ",".join(opts) if opts else "")


def _options_class(engine: str) -> type:
    if engine == "tensorrt":
        from pi05eval.engines.tensorrt import TensorRTOptions

        return TensorRTOptions
    from pi05eval.engines.compile import CompileOptions

    return CompileOptions


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def coerce_option(owner: type, name: str, value: Any) -> Any:
    """An option's value as written in a spec (`true`, `5`, `32/64`, `none`) -> the type of `owner`'s field `name`
    (a dataclass of options); other values pass through. A text that does not parse names the option and the type."""
    if not isinstance(value, str):
        return value
    kind = str(next(f.type for f in fields(owner) if f.name == name))
    text = value.strip().lower()
    if "None" in kind and text in ("none", "null"):
        return None
    try:
        if kind.startswith("bool"):
            return _BOOLS[text]
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
        if kind.startswith("tuple[int"):
            return tuple(int(part) for part in text.split("/"))
    except (KeyError, ValueError):
        raise ValueError(f"engine option {name}={value!r}: expected {kind}") from None
    return value


def parse_engine_spec(text: str) -> EngineSpec:
    """`compile:-trim_prefix,-cuda_graph,mode=default` → EngineSpec (a leading `-` switches a flag off)."""
    name, _, rest = text.partition(":")
    short_names = {f.name for f in fields(Shortcuts)}
    option_names = {f.name: f for f in fields(_options_class(name))}
    shortcuts: dict[str, bool] = {}
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        flag = key.lstrip("+-")
        if not eq and flag in short_names:
            shortcuts[flag] = not key.startswith("-")
        elif not eq and flag in option_names:
            options[flag] = not key.startswith("-")
        elif eq and key in option_names:
            options[key] = coerce_option(_options_class(name), key, value)
        else:
            raise ValueError(
                f"unknown engine option {item!r}; flags: {sorted(short_names | set(option_names))}, "
                f"values: {sorted(option_names)}"
            )
    return EngineSpec(name, shortcuts, options)


def build_engine(
    spec: EngineSpec, model, num_steps: int, batch_size: int = 1, precision: str = "bf16", enabled_precisions=None
):
    if spec.name == "eager":
        from pi05eval.engines.eager import EagerEngine

        return EagerEngine(model, num_steps)
    if spec.name == "tensorrt":
        from pi05eval.engines.tensorrt import TensorRTEngine, TensorRTOptions

        options = TensorRTOptions.from_spec(spec.options)
        shortcuts = Shortcuts(**spec.shortcuts)
        return TensorRTEngine(model, num_steps, shortcuts, options, batch_size, precision, enabled_precisions)
    from pi05eval.engines.compile import CompiledEngine, CompileOptions

    options = {k: coerce_option(CompileOptions, k, v) for k, v in spec.options.items()}
    return CompiledEngine(
        model, num_steps, Shortcuts(**spec.shortcuts), CompileOptions(**options), batch_size, precision
    )
