"""int8: convolutions and linears read 8-bit activations and weights (post-training, calibrated).

With ``precision="int8"`` every convolution and linear with a constant float32 weight reads its input
through a quantize/dequantize pair (the input's scale from calibration, one pair per value however many
ops read it) and its weight through a dequantize of an int8 constant (per output channel); the math is
in :mod:`pyrys.quantization`:

    %y = pyrys::conv2d_relu(%x, %W, %b, ...)
    ->  %x_q = quantized_decomposed::quantize_per_tensor(%x, 0.0187, 0, 0, 255, torch.uint8)
        %x_dq = quantized_decomposed::dequantize_per_tensor(%x_q, 0.0187, 0, 0, 255, torch.uint8)
        %W_dq = quantized_decomposed::dequantize_per_channel(%W_int8, %W_scale, %W_zero_point, 0, -127, 127, torch.int8)
        %y = pyrys::conv2d_relu(%x_dq, %W_dq, %b, ...)

The first compile calibrates (:mod:`pyrys.quantization.calibration`), corrects each int8 op's bias for
its rounding's mean shift (:mod:`pyrys.quantization.bias_correction`: the op's bias argument becomes a
new constant) and runs the accuracy guard (:mod:`pyrys.quantization.guard`); the compiles of other input
shapes reuse its plan where it fits, each value named by its role and checked against a digest of what
computes it (:func:`_roles`, :func:`_origin`), and a graph that computes some value otherwise is calibrated on
its own, on the samples the first compile kept (:func:`_plan_or_samples`).  Every
conv or linear left in float32 is a miss with its reason (``opt.report()``, ``pyrys explain``); those the
guard keeps run in bf16 where the CPU has it (:func:`keeps_in_bf16`,
:func:`~pyrys.passes.precision.run_in_bf16`).  This runs last: constant propagation must not fold the weight's dequantize back into a float32 constant.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import replace

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from pyrys.calling_context import callers_level
from pyrys.ir.edit import insert_op
from pyrys.ir.fused import (FUSED_BY_BASE, FUSED_CONV, FUSED_CONV_TRANSPOSE, FUSED_OPS, as_fused, fused_form_miss,
                            read_fused, to_fused)
from pyrys.ir.graph import add_constant, constant_value, values_crc
from pyrys.ir.provenance import copies
from pyrys.ir.vocabulary import ATTENTION
from pyrys.machine import give_back_freed_memory, native_bf16
from pyrys.passes import cleanup
from pyrys.passes.precision import run_in_bf16
from pyrys.passes.rewrite import Miss, PassResult
from pyrys.quantization import DEQUANTIZE, DEQUANTIZE_WEIGHT, QUANTIZE, TensorQuant, quantize_weight, weight_max
from pyrys.quantization.bias_correction import bias_corrections, corrected_args, correctable
from pyrys.quantization.calibration import (CALIBRATED_SIZES_KEY, MAX_SAMPLES, Calibration, QuantizationPlan,
                                           observe, sample_sizes, spread_first)
from pyrys.numerics.budget import GUARD_MEASURE_KEY, GUARD_SAMPLES, GuardMeasure
from pyrys.quantization.guard import (BF16, FLOAT32, SCREENED, Switch, calibration_data, dequantized_weights, guard,
                                     most_moved)
from pyrys.signature import InputError
from pyrys.size_one import fitted_samples, held_by, held_shapes, shapes_of

RULE = "int8"
aten = torch.ops.aten
# ops that read an int8 layer's result as it is, with its scale (the dnnl backend's binary and pooling
# kernels take int8 sources): the full-shape operand of an elementwise mul or add (a squeeze-and-excitation
# scale), an average pooling.  Where every reader of a layer's result is one of these or another layer,
# the result is quantized and the layer writes int8 (:func:`_shared_results`).
INT8_READERS = frozenset({aten.mul.Tensor, aten.add.Tensor, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default})
COMMUTATIVE = frozenset({aten.mul.Tensor, aten.add.Tensor})
OWN_CALIBRATION = "precision='int8': this capture computes some values otherwise"  # a later capture's note,
OWN_SIZES = "precision='int8': this capture is of sizes the first plan's samples did not have"  # (or this one)
OWN_NOTES = (OWN_CALIBRATION, OWN_SIZES)
CALIBRATED_ON_ITS_OWN = "so it is calibrated on its own"  # and what it says where the capture was calibrated


def quantize(gm: fx.GraphModule, precision: str, calibration: Calibration | None) -> PassResult:
    """Quantize every conv and linear it can when ``precision == "int8"`` (see the module docstring);
    ``fired["int8"]`` counts the ops in int8, misses name those left in floating point (float32, or bf16
    where the guard keeps them so)."""
    result = PassResult()
    if precision != "int8":
        return result
    if calibration is None:
        raise ValueError("pyrys: precision='int8' needs calibration= (input samples to measure activations on)")
    layers = _candidates(gm, result)
    keys, shared = _layer_keys(layers), _shared_results(layers)
    roles = _roles(layers, keys, shared)  # before the rewrite: each value the plan names, by its role
    with calibration.lock:
        plan, samples, cut = _plan_or_samples(gm, calibration, roles, keys)
        planning = plan is None
        if planning:
            try:
                samples = spread_first(samples, GUARD_SAMPLES)  # (the guard's: of every size, where they vary)
                count = len(samples)
                quants, answered, samples, (failed, said), lost = observe(
                    gm, {value.name for value in roles.values()}, samples, SCREENED)
                expected = answered[:GUARD_SAMPLES]
                if failed:  # left out: the model's own refusal, or the cut's (positions past the dim cut)
                    left = (f"{failed} of the {count} samples made to fit it do not run on it" if cut else
                            f"the model fails on {failed} of the {count} samples")
                    calibration.note = "; ".join(filter(None, [calibration.note, f"calibration: {left}, left out "
                                                                                 f"({said})"]))
                if cut and _degenerate(expected, samples):  # a guard measuring NaN against NaN, or one answer,
                    # says 0
                    raise ValueError("its float32 outputs on them are not finite, or all alike (the positions "
                                     "kept may be all padding, masked out)")
            except Exception as error:  # noqa: BLE001 -- samples cut by shapes may not run: the first plan then
                if not cut:
                    raise
                plan, planning = calibration.parent.plan, False
                if isinstance(error, InputError) and error.__cause__ is not None:
                    error = error.__cause__  # (every sample failed: what the first raised)
                line = (str(error).strip().splitlines() or [""])[0][:200]
                calibration.note = (f"{OWN_CALIBRATION} than the graph calibrated first, and it does not run on the "
                                    f"calibration samples made to fit it ({type(error).__name__}: {line}): "
                                    "the first plan quantizes what it computes alike, the rest stays in floating point")
        if planning:
            memo: dict = {}
            origins = {role: _origin(value, keys, memo) for role, value in roles.items()}
            plan = QuantizationPlan({role: (origins[role], quants[value.name])
                                     for role, value in roles.items() if value.name in quants}, origins,
                                    sizes=sample_sizes(samples))
        switches = _rewrite(gm, layers, keys, shared, _lookup(plan, roles, keys), result)
        # every int8 weight's float32 value, once for bias correction and the guard (BERT-base: 326 MiB a copy)
        weights = dequantized_weights(gm) if planning and switches else {}
        if planning and switches:
            plan.biases = bias_corrections(gm, switches, samples, weights)
        _correct_biases(gm, switches, plan.biases)
        attention = _bf16_attention(gm) if switches else frozenset()  # no int8 op: all float32, as the note says
        if planning:
            plan.floating = BF16 if keeps_in_bf16() else FLOAT32
            if calibration.accuracy_budget is not None and switches:
                try:
                    measured, answers = samples[:len(expected)], expected
                    screened = samples[len(expected):SCREENED]
                    plan.measured_on = calibration_data(len(measured), len(screened))
                    worst = most_moved(gm, switches, screened, answered[len(expected):SCREENED], weights)
                    if worst is not None:
                        measured, answers = measured + [worst[0]], answers + [worst[1]]
                    plan.kept, plan.error, plan.floating = guard(
                        gm, switches, measured, answers, calibration.accuracy_budget,
                        run_in_bf16 if plan.floating == BF16 else None, attention, plan.measured_on, weights)
                    gm.meta[GUARD_MEASURE_KEY] = GuardMeasure("int8", measured, answers, plan.error,
                                                              calibration.accuracy_budget, plan.measured_on)
                except Exception as error:  # noqa: BLE001 -- a guard never stops a compile: say why, as bf16's does
                    for switch in switches.values():
                        switch.set(True)
                    plan.kept, plan.error = {}, None
                    line = (str(error).strip().splitlines() or [""])[0][:200]
                    calibration.note = "; ".join(filter(None, [calibration.note, (
                        f"precision='int8': the accuracy guard could not measure the graph on {plan.measured_on} "
                        f"({type(error).__name__}: {line}); every op that can runs in int8")]))
            read = _read_in_int8(roles, switches, plan.kept)  # (after the guard: what stays in int8)
            lost = {name: share for name, share in lost.items() if name in read and not cut}
            if lost:
                said_lost = _lost_note(lost, read, quants)
                calibration.note = "; ".join(filter(None, [calibration.note, said_lost]))
                warnings.warn(f"pyrys: {said_lost}", UserWarning, stacklevel=callers_level())
            calibration.planned(plan, samples)
            if weights:  # the trials that read them are fx modules, in cycles: freed by the collector alone
                weights.clear()
                give_back_freed_memory()
        else:
            calibration.plan = plan  # the first plan, which this capture takes (its notes read it here)
    gm.meta[CALIBRATED_SIZES_KEY] = plan.sizes  # what later shapes specialized from this graph are told of
    kept = set()
    for key, why in plan.kept.items():
        if key in switches:
            switches[key].set(False)
            kept.add(switches[key].layer.name)
            result.misses.append(Miss(RULE, switches[key].layer.name, why))
    result.fired[RULE] = sum(switch.int8 for switch in switches.values())
    if plan.floating == BF16 and (kept or attention):
        result.fired.update(run_in_bf16(gm, kept | attention).fired)
    cleanup.dead_code_elimination(gm)  # the quantize/dequantize nodes and constants of ops kept out of int8
    return result


def _read_in_int8(roles: dict[str, fx.Node], switches: dict, kept: dict) -> dict[str, str]:
    """Each value (by name) a layer running in int8 reads (in ``switches``, not ``kept`` in floating point by the
    guard), with the first such role."""
    int8 = {key for key in switches if key not in kept}
    read: dict[str, str] = {}
    for role, value in roles.items():
        if role.rsplit(" of ", 1)[-1] in int8:
            read.setdefault(value.name, role)
    return read


def _lost_note(lost: dict[str, float], read: dict[str, str], quants: dict[str, TensorQuant]) -> str:
    """What the calibration's ranges set by rare values (:func:`~pyrys.quantization.calibration.observe`'s
    ``lost``, each read in int8: ``read``, by :func:`_read_in_int8`) cost: the values named by their roles,
    the first one's range and step."""
    first = next(iter(lost))
    where, quant, share = [read[name] for name in lost], quants[first], lost[first]
    low, high = quant.bounds
    reach = quant.scale * max(quant.zero_point - low, high - quant.zero_point)
    more = f" and {len(where) - 1} more" if len(where) > 1 else ""
    return (f"int8 calibration: a few values far beyond the rest set the range of the {where[0]}{more} (up to "
            f"{reach:.1e}, steps of {quant.scale:.1e}): int8 rounds {share:.1%} of its nonzero values to 0. Where "
            "such values are rare in what will be served (an outlier, a corrupt sample), leave those samples out: "
            "the error measured on the calibration data holds for data with them alone; where they are the "
            "signal (an activation mostly off), this is as it should be")


def _degenerate(outputs: list, samples: list[list]) -> bool:
    """Whether the float32 outputs of samples cut to fit a capture say nothing: one not finite, or every
    sample's the same where the samples are not (samples cut to their padding)."""
    def alike(values: list[list]) -> bool:
        return len(values) > 1 and all(len(v) == len(values[0]) and all(
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(v, values[0]))
            for v in values[1:])

    tensors = [[t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
               for output in outputs]
    if not any(tensors):  # (integer outputs alone, an argmax: nothing to say)
        return False
    if not all(bool(t.isfinite().all()) for output in tensors for t in output):
        return True
    inputs = [[t for t in sample if isinstance(t, torch.Tensor)] for sample in samples[:len(outputs)]]
    return alike(tensors) and not alike(inputs)


def keeps_in_bf16() -> bool:
    """Whether the ops not in int8 run in bf16 rather than float32 where they can (those the accuracy guard
    keeps, and attention): where the CPU computes in bf16 itself."""
    return native_bf16()


def _bf16_attention(gm: fx.GraphModule) -> frozenset[str]:
    """The attention ops (no int8 kernel here) that run in bf16 alongside the int8 ones where the CPU has
    native bf16, on the int8 projections' results converted (BERT-base at batch 1 on AMX: 7.9 -> 2.6 ms)."""
    return frozenset(node.name for node in gm.graph.nodes if node.op == "call_function" and node.target is ATTENTION)


def _correct_biases(gm: fx.GraphModule, switches: dict[str, Switch], corrections: dict[str, torch.Tensor]) -> None:
    """Each int8 op's arguments with its bias corrected by the plan (:mod:`pyrys.quantization.bias_correction`)."""
    for key, correction in corrections.items():
        switch = switches.get(key)
        if switch is not None and correctable(switch):
            int8 = switch.int8
            switch.int8_args = corrected_args(gm, switch.layer, switch.int8_args, correction, key)
            switch.set(int8)


def _layer_keys(layers: list[fx.Node]) -> dict[fx.Node, str]:
    """A name for each layer that does not depend on node names (another input shape's capture may number
    them differently): its weight's constant name, from the frozen parameter's, with a count where layers
    share a weight."""
    keys, seen = {}, Counter()
    for layer in layers:
        weight = read_fused(layer).args["weight"].target
        keys[layer] = weight if not seen[weight] else f"{weight}#{seen[weight]}"
        seen[weight] += 1
    return keys


def _roles(layers: list[fx.Node], keys: dict[fx.Node, str], shared: dict) -> dict[str, fx.Node]:
    """Every value calibration measures, by its role: each layer's input, the residuals a layer adds when
    its own result is another layer's input (the sum is then made in int8) or when they are made in int8
    anyway (:func:`_made_in_int8`), and the results of :func:`_shared_results`.  Any other residual is
    added as it is, in float32: the float32 value exists, and reading its int8 copy would cost a
    dequantize (a transformer's layer norm, quantized for the next projection, is also its residual)."""
    inputs = {read_fused(layer).args["input"] for layer in layers}
    roles = {f"input of {keys[layer]}": read_fused(layer).args["input"] for layer in layers}
    made_in_int8 = _made_in_int8(layers, inputs)
    for layer in layers:  # a residual a layer writing int8 adds, or one that only exists in int8
        roles.update({f"residual {i} of {keys[layer]}": r for i, r in enumerate(_residuals(layer))
                      if layer in inputs or r in made_in_int8})
    roles.update({f"output of {keys[layer]}": layer for layer in shared})
    return roles


def _made_in_int8(layers: list[fx.Node], inputs: set[fx.Node]) -> set[fx.Node]:
    """The layers' results that are only ever read by layers, at least one as its input: each is written in
    int8 (quantized for the layer reading it), so a layer adding it as a residual reads that."""
    layer_set = set(layers)
    return {layer for layer in layers if layer in inputs and all(user in layer_set for user in layer.users)}


def _origin(value: fx.Node, keys: dict[fx.Node, str], memo: dict | None = None) -> int:
    """What computes ``value``, to check a reused plan against: a digest of every op upstream of it (a layer
    by its key, an input or constant by name, other ops by target; each with its :func:`_literals`), over the
    tensors they read.  A value computed otherwise in another capture (a branch taken at one shape only, even
    one that differs only in a fused activation, a scalar or where a slice starts) gets another digest, and so
    does everything after it: its distribution is not the one calibrated."""
    memo = {} if memo is None else memo
    if value not in memo:
        own = keys.get(value) or (f"{value.op} {value.target}" if value.op in ("placeholder", "get_attr")
                                  else str(value.target))
        if value.op == "get_attr":  # by its values too: a constant folded into a weight (``x * scale`` picked
            own = (own, _constant_crc(value))  # by the length) keeps the weight's name with other values
        reads = tuple(_origin(arg, keys, memo) for arg in value.all_input_nodes
                      if isinstance(arg.meta.get("val"), torch.Tensor))  # not symbolic sizes: any shape
        memo[value] = hash((own, _literals(value) if value.op == "call_function" else (), reads))
    return memo[value]


def _constant_crc(node: fx.Node) -> int | None:
    """The CRC-32 of the constant a ``get_attr`` node reads (None: not a tensor, or no bytes to read)."""
    value = constant_value(node.graph.owning_module, node)
    return values_crc(value) if isinstance(value, torch.Tensor) else None


# the arguments of ops that select positions which say what is computed (dim and start), not those that
# follow the input's shape (a slice's end, a narrow's length)
_POSITION_ARGS = {aten.slice.Tensor: (1, 2), aten.narrow.default: (1, 2)}
_SIZES = "sizes"  # a list of ints (a view's shape, an expand's sizes, a mean's dims): follows the shape


def _literals(node: fx.Node) -> tuple:
    """The arguments of ``node`` that are not graph values and say what it computes: scalars, strings, dtypes,
    a fused op's post-ops; not sizes, which follow the inputs' shapes (see :data:`_POSITION_ARGS`)."""
    kept = _POSITION_ARGS.get(node.target)
    args = [arg for i, arg in enumerate(node.args) if kept is None or i in kept]
    return tuple(_literal(arg) for arg in args) + tuple((name, _literal(arg)) for name, arg in sorted(node.kwargs.items()))


def _literal(arg):
    if isinstance(arg, fx.Node):
        return None  # a graph value: read through ``reads`` (a symbolic size: any shape)
    if isinstance(arg, (list, tuple)):
        if all(isinstance(item, (int, fx.Node)) and not isinstance(item, bool) for item in arg):
            return _SIZES
        return tuple(_literal(item) for item in arg)
    if isinstance(arg, float):
        return arg.hex()  # NaN too: equal NaNs hash alike
    return arg if isinstance(arg, (bool, int, str, torch.dtype)) or arg is None else type(arg).__name__


def _plan_or_samples(gm: fx.GraphModule, calibration: Calibration, roles: dict[str, fx.Node],
                     keys: dict[fx.Node, str]) -> tuple[QuantizationPlan | None, list[list] | None, bool]:
    """The plan this compile uses, or None and the samples to make one from (and whether they were cut).  A
    later capture (another shape: ``calibration.parent`` is the first compile's) takes the first plan where that
    names every value this graph quantizes, computed alike; else (a batch of one, a step of one token:
    constants folded at size 1 change what computes a layer's input) it is calibrated on its own, on the
    samples the first compile kept cut to its size-1 dims (:func:`~pyrys.size_one.fitted_samples`), and says so
    in ``calibration.note``; where it takes none of them, the first plan quantizes what it computes alike."""
    if calibration.plan is not None:
        return calibration.plan, None, False
    if calibration.parent is None:
        return None, held_samples(gm, calibration), False
    first = calibration.parent.plan
    memo: dict = {}
    if all(first.roles.get(role) == _origin(value, keys, memo) for role, value in roles.items()):
        held = held_by(gm, calibration.parent.kept)  # samples of its sizes the first plan did not read (a
        if not any(not _read_by(first, sample) for sample in held):  # TorchScript import's or an image size's)
            return first, None, False
        calibration.note = f"{OWN_SIZES}, {CALIBRATED_ON_ITS_OWN}, on {len(held)} of the calibration samples"
        return None, held, True  # (where none runs, the first plan, as for samples cut to fit)
    samples, how = fitted_samples(gm, calibration.parent.kept, MAX_SAMPLES, calibration.example_shapes)
    if not samples:
        return first, None, False
    calibration.note = (f"{OWN_CALIBRATION} than the graph calibrated first, {CALIBRATED_ON_ITS_OWN}, on "
                        + (f"{len(samples)} samples {how}" if how else f"{len(samples)} of the calibration samples"))
    return None, samples, bool(how)


def held_samples(gm: fx.GraphModule, calibration: Calibration) -> list[list]:
    """The first compile's samples that ``gm`` holds for (read at other sizes with ``dynamic=True``, a sample
    may be of a size its graph excludes, or the capture may have kept fixed shapes); those left out are said
    in ``calibration.note``.  Where it holds for none: the samples fitted to it (one-row samples joined for a
    graph for batches from 2: :func:`~pyrys.size_one.fitted_samples`), else :class:`InputError`."""
    samples = calibration.samples or []
    shapes = [shapes_of(sample) for sample in samples]
    held = held_shapes(gm, samples)
    left = [shape for shape, holds in held.items() if not holds]
    if not left:
        return samples
    described = ", ".join(" and ".join(str(list(s)) for s in shape if s is not None) for shape in left[:4])
    if len(left) == len(held):  # (a graph for batches from 2, one-row samples: joined into its rows)
        fitted, how = fitted_samples(gm, samples, len(samples), calibration.example_shapes)
        if fitted:
            calibration.note = "; ".join(filter(None, [
                calibration.read_note, f"calibration: the captured graph holds for none of the samples as they are "
                                       f"({described}{', ...' if len(left) > 4 else ''}): read {len(fitted)} {how}"]))
            return fitted
        raise InputError(f"pyrys: the captured graph holds for none of the calibration samples' shapes ({described}"
                         f"{', ...' if len(left) > 4 else ''}): give samples of the example's shapes")
    taken = [sample for shape, sample in zip(shapes, samples) if held[shape]]
    count = len(samples) - len(taken)
    left_out = (f"calibration: {count} sample{'s' * (count != 1)} of shapes the captured graph does not hold for "
                f"{'were' if count != 1 else 'was'} left out ({described}{', ...' if len(left) > 4 else ''}); "
                "a capture for such shapes, at their first call, is calibrated on them")
    calibration.note = "; ".join(filter(None, [calibration.read_note, left_out]))
    return taken


def _read_by(plan: QuantizationPlan, sample: list) -> bool:
    """Whether the samples ``plan`` was made on had every size of ``sample``."""
    return all(size in plan.sizes.get((i, d), ()) for i, t in enumerate(sample) if isinstance(t, torch.Tensor)
               for d, size in enumerate(t.shape))


def _lookup(plan: QuantizationPlan, roles: dict[str, fx.Node], keys: dict[fx.Node, str]):
    """``quant(role)``: the plan's quantization for the value in ``role``, or None if the plan has none or
    measured another value in that role (computed otherwise: this graph differs from the calibrated one)."""
    memo: dict = {}
    origins = {role: _origin(value, keys, memo) for role, value in roles.items()}  # now, before the rewrite

    def quant(role: str) -> TensorQuant | None:
        entry = plan.activations.get(role)
        return entry[1] if entry is not None and entry[0] == origins.get(role) else None

    return quant


def _candidates(gm: fx.GraphModule, result: PassResult) -> list[fx.Node]:
    """The convs and linears that can run in int8 (in their fused form); a miss for each other one."""
    layers = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or (node.target not in FUSED_BY_BASE and node.target not in FUSED_OPS):
            continue
        why = _why_float(node)
        if why:
            dtype = str(node.meta["val"].dtype).removeprefix("torch.")
            result.misses.append(Miss(RULE, node.name, f"stays {dtype}: {why}"))
        else:
            layers.append(to_fused(gm, node, in_place=True))
    return layers


def _why_float(node: fx.Node) -> str:
    """Why ``node`` cannot run in int8 ("" if it can)."""
    if node.target not in FUSED_OPS and fused_form_miss(node):
        return fused_form_miss(node)
    fused = as_fused(node)
    if not fused.kind.weighted:
        return "a product of two activations has no int8 lowering here"
    if fused.kind.op is FUSED_CONV_TRANSPOSE:
        return "transposed convolutions have no int8 lowering here yet"
    x, weight = fused.args["input"], fused.args["weight"]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr" or weight.meta["val"].dtype != torch.float32:
        return "its weight is not a float32 constant"
    if weight.meta["val"].numel() == 0:
        return "its weight is empty (no input or output features): there is nothing to quantize"
    if not isinstance(x, fx.Node) or x.op == "get_attr" or x.meta["val"].dtype != torch.float32:
        return "its input is not a float32 activation"
    if node.meta["val"].dtype != torch.float32:
        return f"it makes {node.meta['val'].dtype}"
    return ""


def _residuals(layer: fx.Node) -> list[fx.Node]:
    """The float32 activations of the layer's shape a fused op adds to its result (``conv(x) + r``)."""
    fused, shape = read_fused(layer), layer.meta["val"].shape
    operands = iter(fused.post_inputs)
    added = [next(operands) if p.binary else None for p in fused.post_ops]
    return [r for p, r in zip(fused.post_ops, added) if p.name == "add" and r.op != "get_attr"
            and r.meta["val"].dtype == torch.float32 and r.meta["val"].shape == shape]


def _rewrite(gm: fx.GraphModule, layers: list[fx.Node], keys: dict[fx.Node, str], shared: dict, quant,
             result: PassResult) -> dict[str, Switch]:
    """Give each layer whose input the plan quantizes (``quant(role)``) its int8 arguments, and its residual
    when the plan quantizes it; the readers of :func:`_shared_results` read its int8 result.  The switches,
    by layer key, set to int8."""
    pairs: dict[fx.Node, fx.Node] = {}  # value -> its dequantized form
    weights: dict[tuple, list] = {}  # the int8 weights made (:func:`_dequantized_weight`)
    switches = {}

    def dequantized(x: fx.Node, role: str) -> fx.Node | None:
        wanted = quant(role)
        if wanted is None:
            return None
        if x not in pairs:
            pairs[x] = _quantize_dequantize(gm, x, wanted)
        return pairs[x] if TensorQuant.of_node(pairs[x]) == wanted else None  # one value, one quantization

    for layer in layers:
        fused, key = read_fused(layer), keys[layer]
        x = fused.args["input"]
        x_dq = dequantized(x, f"input of {key}")
        if x_dq is None:
            result.misses.append(Miss(RULE, layer.name, f"stays float32: its input %{x.name} was not calibrated "
                                                        "(not in the graph the calibration ran on)"))
            continue
        with gm.graph.inserting_before(layer):
            weight = _dequantized_weight(gm, fused.args["weight"], TensorQuant.of_node(x_dq).dtype,
                                         fused.kind.op is FUSED_CONV, weights)
        residuals = {r: dequantized(r, f"residual {i} of {key}") for i, r in enumerate(_residuals(layer))}
        operands = tuple(residuals.get(p) or p for p in fused.post_inputs)
        int8 = replace(fused, args={**fused.args, "input": x_dq, "weight": weight}, post_inputs=operands).node_args()
        switches[key] = Switch(layer, tuple(layer.args), tuple(int8))
        switches[key].set(True)
    for value, readers in shared.items():
        source = dequantized(value, f"output of {keys[value]}")
        if source is not None and keys[value] in switches:
            for reader in readers:  # the same value, rounded as the layers read it
                switches[keys[value]].readers.append((reader, value, source))
            switches[keys[value]].set(True)
    return switches


def _shared_results(layers: list[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """The layers' results read only by :data:`INT8_READERS` (a pooling's input, a full-shape operand of mul or add)
    and by layers (as their
    input), each reader reading it once, with the readers of the first kind: quantized once, read in int8 by
    every one."""
    layer_set = set(layers)
    shared = {}
    for layer in layers:
        readers = [user for user in layer.users if user.target in INT8_READERS and _reads_once(user, layer) and (
            user.args[0] is layer if user.target not in COMMUTATIVE  # a pooling's input; either operand of mul, add
            else layer in user.args[:2] and user.meta["val"].shape == layer.meta["val"].shape)]
        if readers and all(user in readers or (user in layer_set and read_fused(user).args["input"] is layer
                                               and _reads_once(user, layer)) for user in layer.users):
            shared[layer] = readers
    return shared


def _quantize_dequantize(gm: fx.GraphModule, x: fx.Node, quant: TensorQuant) -> fx.Node:
    """``x``'s quantize/dequantize pair, right after ``x`` (after the inputs, for an input): before every reader."""
    anchor = x if x.op != "placeholder" else [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(anchor):
        q = insert_op(gm.graph, QUANTIZE, (x, *quant.node_args()), f"{x.name}_q")
    with gm.graph.inserting_after(q):
        dq = insert_op(gm.graph, DEQUANTIZE, (q, *quant.node_args()), f"{x.name}_dq")
    copies(dq, x)  # it stands for x (numerics compare it with x's value)
    return dq


def _dequantized_weight(gm: fx.GraphModule, weight: fx.Node, src_dtype: torch.dtype, convolution: bool,
                        made: dict[tuple, list]) -> fx.Node:
    """The int8 form of a layer's ``weight`` for an input of ``src_dtype``, dequantized (per output channel).
    Equal int8 weights with equal scales are one tensor (``made``: those of this graph, by shape and
    checksums): a weight two layers read (one module called twice, tied weights, equal copies) is kept
    once, as a save keeps equal bytes once, so that the backend's choices per int8 tensor
    (``int8_or_float.py``) are the same before saving and after loading."""
    q, scales = _one_of_equals(made, *quantize_weight(getattr(gm, weight.target), src_dtype, convolution))
    w_max = weight_max(src_dtype, convolution)
    nodes = [add_constant(gm, value, f"{weight.target}_{suffix}") for value, suffix in
             ((q, "int8"), (scales, "scale"), (torch.zeros(scales.shape, dtype=torch.int64), "zero_point"))]
    dq = insert_op(gm.graph, DEQUANTIZE_WEIGHT, (*nodes, 0, -w_max, w_max, torch.int8), f"{weight.target}_dq")
    copies(dq, weight)
    return dq


def _one_of_equals(made: dict[tuple, list], q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)``, or the pair ``made`` holds with equal values (then ``made`` holds it still)."""
    key = (tuple(q.shape), tuple(scales.shape), values_crc(q), values_crc(scales))
    for pair in made.setdefault(key, []):
        if torch.equal(pair[0], q) and torch.equal(pair[1], scales):
            return pair
    made[key].append((q, scales))
    return q, scales


def _reads_once(user: fx.Node, value: fx.Node) -> bool:
    return sum(1 for arg in tree_leaves((user.args, user.kwargs)) if arg is value) == 1
