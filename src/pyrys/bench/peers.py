"""The systems pyrys is measured against, one small class each.

A peer has a ``name``, ``available() -> (ok, reason)`` and
``prepare(model, inputs) -> callable``; the callable takes the same positional
tensors as the model. ``prepare`` plus the first call is timed as compile time.
"""

from __future__ import annotations

import importlib.util
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

Inputs = tuple[torch.Tensor, ...]
Runner = Callable[..., Any]
PYRYS_BACKENDS = ("dnnl", "reference")


def has_module(name: str) -> tuple[bool, str]:
    """Whether ``name`` can be imported, with a reason when it cannot."""
    if importlib.util.find_spec(name) is None:
        return False, f"{name} is not installed (pip install -e '.[bench]')"
    return True, ""


class Peer:
    """A system to benchmark; subclasses override ``prepare``."""

    name = "peer"
    by_default = True  # run when --systems names none (else only when named)

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def available(self) -> tuple[bool, str]:
        return True, ""

    def prepare(self, model: nn.Module, inputs: Inputs) -> Runner:
        raise NotImplementedError

    def note(self, runner: Runner) -> str:
        """What the table should say of a prepared system beside its numbers ("" for nothing)."""
        return ""


class Eager(Peer):
    """The model itself, run by PyTorch eager under ``torch.no_grad``."""

    name = "eager"

    def prepare(self, model: nn.Module, inputs: Inputs) -> Runner:
        return model


class PyrysPeer(Peer):
    """``pyrys.optimize`` with one backend, at one precision (``pyrys-dnnl``, ``pyrys-dnnl-bf16``,
    ``pyrys-dnnl-int8``: calibrated on :func:`calibration_data`); ``guarded=False`` (``...-unguarded``):
    ``accuracy_budget=None``, every op the precision can run in it, as OpenVINO runs them (on models whose
    outputs amplify rounding, the default guard keeps most ops in float32: the same speed at the same error
    is this system's)."""

    def __init__(self, threads: int, backend: str, precision: str = "fp32", guarded: bool = True) -> None:
        super().__init__(threads)
        self.backend, self.precision, self.guarded = backend, precision, guarded
        self.name = f"pyrys-{backend}" + ("" if precision == "fp32" else f"-{precision}") + \
            ("" if guarded else "-unguarded")
        self.by_default = guarded

    def available(self) -> tuple[bool, str]:
        from pyrys.machine import native_bf16

        if self.backend not in pyrys_backends(available_only=True):
            return False, f"pyrys backend {self.backend!r} is not available on this machine"
        if self.precision == "bf16" and not native_bf16():
            return False, "the CPU has no native bf16 (avx512_bf16 or amx_bf16)"
        return True, ""

    def prepare(self, model: nn.Module, inputs: Inputs) -> Runner:
        import pyrys

        calibration = calibration_data(inputs) if self.precision == "int8" else None
        budget = {} if self.guarded else {"accuracy_budget": None}
        return pyrys.optimize(model, example_inputs=inputs, backend=self.backend, precision=self.precision,
                              calibration=calibration, **budget)

    def note(self, runner: Runner) -> str:
        """Where the compile-time self-check sent the calls to torch ops, that (its times are torch's)."""
        from pyrys.backends.dnnl.self_check import AMPLIFIES, ON_TORCH_OPS

        fault = next((note for note in runner.notes if ON_TORCH_OPS in note), None)
        if fault is None:
            return ""
        why = "its program disagreed more than the model's rounding explains" if AMPLIFIES in fault \
            else "its program disagreed"
        return f"calls run on torch ops: {why} (the self-check; opt.notes)"


def calibration_data(inputs: Inputs) -> list[Inputs]:
    """The calibration samples every int8 system gets: the same ones (:func:`pyrys.quantization.calibration.samples_like`)."""
    from pyrys.quantization.calibration import samples_like

    return samples_like(inputs)


def pyrys_backends(available_only: bool = False) -> list[str]:
    """pyrys's backends: the ones it reports, plus the known ones unless ``available_only``."""
    try:
        import pyrys

        reported = list(pyrys.available_backends())
    except Exception:
        reported = []
    return reported if available_only else list(dict.fromkeys([*PYRYS_BACKENDS, *reported]))


class TorchScript(Peer):
    """``torch.jit.trace`` (``script`` if tracing fails), ``freeze``, ``optimize_for_inference``."""

    name = "torchscript"

    def prepare(self, model: nn.Module, inputs: Inputs) -> Runner:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                scripted = torch.jit.trace(model, inputs)
            except Exception:
                scripted = torch.jit.script(model)
            return torch.jit.optimize_for_inference(torch.jit.freeze(scripted.eval()))


class Inductor(Peer):
    """``torch.compile`` (inductor) with weight freezing; compiles on the first call."""

    name = "torch.compile"

    def prepare(self, model: nn.Module, inputs: Inputs) -> Runner:
        import torch._inductor.config as inductor_config

        compiled = torch.compile(model, backend="inductor")
        with inductor_config.patch(freezing=True), torch.no_grad():
            compiled(*inputs)
        return compiled


def export_onnx(model: nn.Module, inputs: Inputs, path: Path) -> None:
    """Export with the torch.export-based exporter, else the legacy TorchScript one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, inputs, str(path), dynamo=True, optimize=True, verbose=False)
        except Exception:
            torch.onnx.export(model, inputs, str(path), dynamo=False)


class OnnxRuntime(Peer):
    """ONNX Runtime, CPU execution provider, all graph optimizations."""

    name = "onnxruntime"

    def available(self) -> tuple[bool, str]:
        for module in ("onnxruntime", "onnx", "onnxscript"):
            ok, reason = has_module(module)
            if not ok:
                return ok, reason
        return True, ""

    def prepare(self, model: nn.Module, inputs: Inputs) -> Runner:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            export_onnx(model, inputs, path)
            session = ort.InferenceSession(str(path), self._options(ort), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *xs: session.run(None, {n: x.numpy() for n, x in zip(names, xs)})

    def _options(self, ort: Any) -> Any:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        return options


class OnnxRuntimeInt8(OnnxRuntime):
    """ONNX Runtime static int8 on :func:`calibration_data`: its pre-processing (shape inference, graph
    optimization), then ``quantize_static`` with its defaults otherwise (QDQ, u8 activations and s8 weights
    per channel, min/max calibration); without VNNI, ``reduce_range`` (7-bit weights, as its documentation
    advises against the saturation pyrys avoids the same way)."""

    name = "onnxruntime-int8"

    def prepare(self, model: nn.Module, inputs: Inputs) -> Runner:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        from pyrys.quantization import vnni

        class Samples(CalibrationDataReader):
            def __init__(self, names: list[str]):
                samples = calibration_data(inputs)
                self.feeds = iter([{n: x.numpy() for n, x in zip(names, sample)} for sample in samples])

            def get_next(self):
                return next(self.feeds, None)

        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported, prepared, quantized = (str(Path(folder) / f"{n}.onnx") for n in ("model", "prepared", "int8"))
            export_onnx(model, inputs, Path(exported))
            quant_pre_process(exported, prepared)
            names = [i.name for i in ort.InferenceSession(prepared, providers=["CPUExecutionProvider"]).get_inputs()]
            quantize_static(prepared, quantized, Samples(names), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=not vnni())
            session = ort.InferenceSession(quantized, self._options(ort), providers=["CPUExecutionProvider"])
        return lambda *xs: session.run(None, {n: x.numpy() for n, x in zip(names, xs)})


class OpenVino(Peer):
    """OpenVINO CPU plugin, converted from the torch model, at a given precision."""

    def __init__(self, threads: int, precision: str = "f32") -> None:
        super().__init__(threads)
        self.precision = precision
        self.name = "openvino" if precision == "f32" else f"openvino-{precision}"

    def available(self) -> tuple[bool, str]:
        ok, reason = has_module("openvino")
        if ok and self.precision == "bf16" and not openvino_has_bf16():
            return False, "the CPU has no bf16 support (OpenVINO OPTIMIZATION_CAPABILITIES)"
        return ok, reason

    def prepare(self, model: nn.Module, inputs: Inputs) -> Runner:
        import openvino as ov

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = ov.convert_model(model, example_input=inputs)
        config = {"INFERENCE_PRECISION_HINT": self.precision, "INFERENCE_NUM_THREADS": self.threads,
                  "PERFORMANCE_HINT": "LATENCY"}
        compiled = ov.Core().compile_model(converted, "CPU", config)
        return lambda *xs: compiled([x.numpy() for x in xs]).to_tuple()


class OpenVinoInt8(Peer):
    """OpenVINO with NNCF's post-training int8 quantization (its defaults) on :func:`calibration_data`;
    what NNCF leaves in floating point runs at OpenVINO's default precision for the CPU."""

    name = "openvino-int8"

    def available(self) -> tuple[bool, str]:
        for module in ("openvino", "nncf"):
            ok, reason = has_module(module)
            if not ok:
                return False, f"{module} is not installed (pip install nncf)" if module == "nncf" else reason
        return True, ""

    def prepare(self, model: nn.Module, inputs: Inputs) -> Runner:
        import nncf
        import openvino as ov

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = ov.convert_model(model, example_input=inputs)
            samples = calibration_data(inputs)
            dataset = nncf.Dataset(samples, lambda sample: [x.numpy() for x in sample])
            quantized = nncf.quantize(converted, dataset, subset_size=len(samples))
        config = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
        compiled = ov.Core().compile_model(quantized, "CPU", config)
        return lambda *xs: compiled([x.numpy() for x in xs]).to_tuple()


class InductorInt8(Peer):
    """PyTorch's own int8 path: PT2E post-training quantization with torchao's ``X86InductorQuantizer``
    (its default config: static, u8 activations per tensor, s8 weights per channel) calibrated on
    :func:`calibration_data`, then ``torch.compile`` (inductor, weights frozen), which runs oneDNN's int8
    convolutions and linears with their post-ops fused."""

    name = "torch.compile-int8"

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("torchao") is None:
            return False, "torchao is not installed (pip install -e '.[bench]')"
        return True, ""

    def prepare(self, model: nn.Module, inputs: Inputs) -> Runner:
        import torch._inductor.config as inductor_config
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            captured = torch.export.export(model, inputs).module()
            one_partition_per_call(captured)
            quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
            observed = prepare_pt2e(captured, quantizer)
            with torch.no_grad():
                for sample in calibration_data(inputs):
                    observed(*sample)
            compiled = torch.compile(convert_pt2e(observed), backend="inductor")
            with inductor_config.patch(freezing=True), torch.no_grad():
                compiled(*inputs)
        return compiled


def one_partition_per_call(captured: torch.fx.GraphModule) -> None:
    """Name each op's innermost module after the op, in the captured copy's metadata.

    torchao's quantizer groups ops into partitions by the module that made them; a module called twice
    (torchvision's ResNet blocks call one ``ReLU`` twice) becomes one partition with two outputs, which it
    refuses ("Input partition has more than one output node").  The modules it matches (convolutions,
    linears, norms, activations) make one aten op per call in a non-strict export, so a name per op keeps
    each call apart.
    """
    for node in captured.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack:
            key, (path, kind) = next(reversed(stack.items()))
            stack[key] = (f"{path}@{node.name}", kind)


def openvino_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin reports bf16 support."""
    from openvino import Core

    return "BF16" in Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def default_peers(threads: int) -> list[Peer]:
    """Every system, in report order: pyrys backends first, then eager and the peers."""
    pyrys = [PyrysPeer(threads, backend) for backend in pyrys_backends()] + [
        PyrysPeer(threads, "dnnl", precision, guarded) for guarded in (True, False) for precision in ("bf16", "int8")]
    others = [Eager(threads), TorchScript(threads), Inductor(threads), OnnxRuntime(threads), OnnxRuntimeInt8(threads),
              InductorInt8(threads), OpenVino(threads), OpenVino(threads, "bf16"), OpenVinoInt8(threads)]
    return pyrys + others


def select_peers(peers: list[Peer], names: list[str] | None) -> list[Peer]:
    """The peers named (when ``names`` is empty, those run by default; ``["all"]``: every one); eager is always
    kept as the reference."""
    if not names:
        return [peer for peer in peers if peer.by_default]
    if names == ["all"]:
        return peers
    known = {peer.name: peer for peer in peers}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; choose from {sorted(known)}")
    wanted = ["eager", *[name for name in names if name != "eager"]]
    return [known[name] for name in wanted]
