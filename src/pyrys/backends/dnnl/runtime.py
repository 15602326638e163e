"""The dnnl backend's entry point: one compiled signature, a program per thread count.

The layout policy (channels-last or channel-blocked) is chosen once, by building the
program under each candidate and timing them interleaved; the choice is kept in the tuning
cache (``pyrys.tuning_cache``), so the next compile of the same graph on this CPU and thread
count builds only the winner.  A graph whose convolutions do under 10% of the multiply-adds
(``pyrys.ir.work``: a transformer's patch or feature convolution) takes channels-last unmeasured.
oneDNN fixes a primitive's thread count when it is created,
so a caller running with another thread count (its own ``torch.get_num_threads()``, or
``threads=``) gets a program built for that count, from the same graph and policy, sharing
the packed weights.  Unless ``threads=`` pins the count, a call may run with fewer threads than
the caller's while other work keeps the CPUs busy (``pyrys.backends.thread_choice``).

NaN and infinities: relu keeps NaN (``post_ops.py``), but oneDNN's max-pooling, clip
(relu6, clamp, hardtanh) and hardsigmoid kernels turn it into a number.  A program with
such a step checks its floating-point inputs (one sum each: 5-15 µs at batch 1); a call
whose inputs are not all finite runs on the reference backend, the same optimized graph on
torch ops, so its NaN and infinities reach the outputs exactly as in eager.  Programs
without one run on: NaN passes every step as in eager, and -inf through relu gives NaN
(eager: 0).  What a network makes inside from finite inputs (overflow, ``log`` of a
negative number) is never checked; the README lists the differences.
"""
from __future__ import annotations

import contextlib
import copy
import threading
import time
import warnings
import weakref

import torch
import torch.fx as fx

from pyrys import tuning_cache
from pyrys.backends.dnnl.builder import PackedWeights
from pyrys.backends.dnnl.layout import candidate_policies
from pyrys.backends.dnnl.lower import LAYOUT_CHOOSERS, build_program, layout_applies
from pyrys.backends.dnnl.measured import machine_key
from pyrys.backends.dnnl.primitives import Engine
from pyrys.backends.dnnl import int8_or_float, measured, self_check
from pyrys.backends.dnnl.program import DnnlProgram
from pyrys.backends.options import BackendOptions
from pyrys.backends.reference import ReferenceProgram, held_bytes, with_values
from pyrys.backends.thread_choice import ThreadChooser
from pyrys.backends.cpu_share import CpuShare, timed_quietly
from pyrys.backends.threads import PER_CALLER_THREADS, current_threads, with_threads
from pyrys.forwarding import forwarded
from pyrys.ir.finite import all_finite
from pyrys.ir.graph import named_constants
from pyrys.ir.printer import format_graph
from pyrys.ir.work import share_of
from pyrys.machine import give_back_freed_memory
from pyrys.quantization.nonfinite import rounds_activations

# below this share of the multiply-adds in convolutions, the layout policy is not timed
LAYOUT_MIN_SHARE = 0.10


class DnnlRuntime:
    """Calls the program built for the caller's thread count (``threads=`` pins it for every call)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, options: BackendOptions,
                 like: "DnnlRuntime | None" = None):
        self.gm, self.pinned = gm, options.threads
        self.saved_choices: measured.SavedChoices | None = None  # a loaded program's (``saving/program.py``)
        self._building = threading.Lock()
        threads = options.threads or current_threads()
        if like is None:
            self.engine, self.packed = Engine(), PackedWeights()
            self.first = self._choose_policy(example_inputs, options.layout, threads)
        else:  # another shape of the same graph: its layout, engine and packed weights (in their layouts)
            self.engine, self.packed, self.layout = like.engine, like.packed, like.layout
            self.first = build_program(gm, self.layout, self.engine, threads, self.packed, reuse_packed=True)
            self.first.policy = f"{self.layout} (as chosen for the first input shape)"
        self.programs: dict[int, DnnlProgram] = {threads: self.first}
        self.choosers: dict[int, ThreadChooser] = {}  # by the caller's thread count, when not pinned
        self.unbuildable: dict[int, str] = {}  # thread counts whose program failed to build, and why
        self._reference: ReferenceProgram | None = None
        self._checked_outputs: dict[str, CheckedOutputs] = {}  # the check's, for the call that follows it
        # calls with NaN or infinities in these inputs run on the reference backend (which takes an int8
        # graph's float path: ``quantization/nonfinite.py``)
        checked = self.first.unlike_eager_on_nonfinite or rounds_activations(gm)
        self.float_inputs = [i for i, t in enumerate(example_inputs)
                             if checked and isinstance(t, torch.Tensor) and t.is_floating_point()]
        self.fault: str | None = None  # why every call runs on the reference backend (``self_check.py``)
        self.check_note: str | None = None  # why a program that differs from torch's ops runs all the same
        # the structures (self_check.structure) of this graph's programs checked so far, shared by its shapes:
        # those that passed (None; also one trusted with a note, self_check.TRUSTED: a later shape of it is not
        # checked, and its note is the first's), and those that disagreed, with why (a later shape of one runs
        # on torch ops at once)
        self.checked: dict[str, str | None] = like.checked if like is not None else {}
        if options.check and self_check.checkable(gm, example_inputs):
            structure = self_check.structure(self.first)
            if like is None or like.fault or structure not in self.checked:
                self._check(example_inputs, threads, keep_outputs=options.keep_outputs)
                self.checked[structure] = self.fault
            elif self.checked[structure] is not None:
                self.fault = self.checked[structure]
                warnings.warn(f"pyrys: {self.fault}", RuntimeWarning, stacklevel=2)

    def _check(self, example_inputs: list, threads: int, keep_outputs: bool = False) -> None:
        """The first program against the reference backend on the example inputs; the reference is kept only
        where they disagree.  The first shape's graph holds its constants still (the reference reads them,
        nothing is copied); another shape's holds stand-ins of released ones, whose plain copies the
        reference restores from the packed ones for the check alone (one copy of the weights, freed after;
        where they disagree, calls take :attr:`reference`, on the copies every shape shares).
        ``keep_outputs``: the program's outputs are kept for the call on these inputs that made this shape's
        program (the caller's call, next: it returns them rather than run the program again)."""
        reference = ReferenceProgram(self.gm)
        self.fault, outputs, self.check_note = with_threads(threads, self_check.disagreement, self.first, reference,
                                                            self.gm, example_inputs)
        if keep_outputs and self.fault is None and outputs is not None:
            self._checked_outputs["next"] = CheckedOutputs(example_inputs, outputs)
        if self.fault is not None:
            warnings.warn(f"pyrys: {self.fault}", RuntimeWarning, stacklevel=2)
        if self.fault is not None and not reference.restored:
            self._reference = reference
            return
        reference.discard()
        if reference.restored:
            give_back_freed_memory(collect_cycles=False)  # the restored copies' pages

    @property
    def reference(self) -> ReferenceProgram:
        """The graph on torch ops, for calls with NaN or infinite inputs; made at the first such call, on
        plain copies of the released constants (restored once, shared by every shape: ``packed_weights``)."""
        if self._reference is None:
            with self._building:
                if self._reference is None:
                    self._reference = ReferenceProgram(with_values(self.gm, self._values))
        return self._reference

    def _values(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.packed.values(self.engine, tensor)

    def release_constants(self, gms: list[fx.GraphModule]) -> int:
        """Give every constant the programs hold only packed (in other layouts) a stand-in in ``gms``
        (:mod:`pyrys.ir.released`): the graphs keep its shape, the packed copy its values, and the plain
        copy is freed once nothing else holds it.  How many constants were released (none by a program
        whose calls run on the reference backend: it reads them)."""
        if self.fault is not None:
            return 0
        stand_ins: dict[int, torch.Tensor] = {}
        plain: list[weakref.ref] = []
        for gm in dict.fromkeys(gms):
            for name, tensor in named_constants(gm):
                stand_in = stand_ins.get(id(tensor))
                if stand_in is None:
                    stand_in = self.packed.release(self.engine, tensor)
                    if stand_in is not None:
                        plain.append(weakref.ref(tensor))
                if stand_in is not None:
                    stand_ins[id(tensor)] = stand_in
                    setattr(gm, name, stand_in)
        tensor = None  # the loop's last one
        released = self.packed.release_float_copies(self.engine)  # (int8 weights run in float32: int8_or_float.py)
        # a full collection (0.2 s once torch is loaded) only where a plain copy outlived its graphs: held by a
        # reference cycle (a discarded graph module of calibration or the accuracy guard), or by its owner
        give_back_freed_memory(collect_cycles=any(ref() is not None for ref in plain))
        return len(stand_ins) + released

    def __call__(self, inputs: list) -> list:
        if self.fault is not None or self.float_inputs and not all_finite(inputs, self.float_inputs):
            return self.reference(inputs) if self.pinned is None else with_threads(self.pinned, self.reference, inputs)
        if self._checked_outputs:  # the first call after the check: taken once, by whichever call comes
            checked = self._checked_outputs.pop("next", None)
            if checked is not None and checked.made_from(inputs):
                return checked.outputs
        if self.pinned is not None:
            return with_threads(self.pinned, self._program(self.pinned), inputs)
        threads = current_threads()
        if threads == 1 or not PER_CALLER_THREADS:
            return self._program(threads)(inputs)
        return self._call_adapting(threads, inputs)

    def _call_adapting(self, threads: int, inputs: list) -> list:
        """A call with the count the caller's chooser picks (at most ``threads``), timed for the next pick."""
        start = time.perf_counter()
        chooser = self.choosers.get(threads)
        if chooser is None:
            chooser = self.choosers.setdefault(threads, ThreadChooser(threads, start))
        count = chooser.pick(self.programs, start)
        program, first = self.programs.get(count), False
        if program is None:
            program, first = self._probe_program(count) if count != threads else self._program_for(count), True
            if program is None:  # a probe's program another caller is building (not this call's to wait
                chooser.cancel(count)  # for) or one that failed to build: the call runs the active count
                count, first = chooser.active, False
                program = self._program(count)
            start = time.perf_counter()  # a build is not the call's time
        outputs = program(inputs) if count == threads else with_threads(count, program, inputs)
        end = time.perf_counter()
        chooser.record(count, end - start, end, first)
        return outputs

    def _probe_program(self, threads: int) -> DnnlProgram | None:
        """The program for a probe of ``threads`` threads; None while another caller builds one, or if it
        failed to build (memory, a primitive oneDNN refuses at that count): a probe is optional, so the
        failure is kept in ``unbuildable`` (``thread_choice()`` says it, a warning once) and that count
        is not tried again."""
        if threads in self.unbuildable or not self._building.acquire(blocking=False):
            return None
        try:
            if threads not in self.unbuildable:
                return self._built(threads)
        except Exception as error:  # noqa: BLE001 -- whatever the build raised, the call runs on
            message = (str(error).splitlines() or [""])[0][:200]
            self.unbuildable[threads] = type(error).__name__ + (f": {message}" if message else "")
            warnings.warn(f"pyrys: the program for {threads} threads failed to build "
                          f"({self.unbuildable[threads]}); calls keep their thread count", RuntimeWarning)
        finally:
            self._building.release()
        return None

    def _program(self, threads: int) -> DnnlProgram:
        """The program for ``threads`` threads, built at its first call."""
        program = self.programs.get(threads)
        return program if program is not None else self._program_for(threads)

    def _program_for(self, threads: int) -> DnnlProgram:
        """Build the program for ``threads`` (reading the weights as packed already), waiting for a
        build another caller has under way."""
        with self._building:
            return self._built(threads)

    def _built(self, threads: int) -> DnnlProgram:
        """The program for ``threads``, built now if it is not yet (the caller holds ``_building``); a loaded
        one's with the kernels its save chose (:func:`measured.saved`)."""
        if threads not in self.programs:
            with measured.saved(self.saved_choices) if self.saved_choices else contextlib.nullcontext():
                program = build_program(self.gm, self.layout, self.engine, threads, self.packed, reuse_packed=True)
            program.policy = self.first.policy
            self.programs = {**self.programs, threads: program}
        return self.programs[threads]

    def _choose_policy(self, example_inputs: list, layout: str, threads: int) -> DnnlProgram:
        """The program in the layout policy asked for; for ``"auto"`` the faster candidate, measured here
        or found in the tuning cache (``pyrys.tuning_cache``) under this graph, thread count and CPU, where
        it was timed on a quiet CPU (:mod:`pyrys.backends.cpu_share`; a
        graph with no convolution, or whose convolutions do little of the work, is built once:
        :func:`_why_not_measured`)."""
        policies = candidate_policies() if layout == "auto" else [layout]
        unmeasured = _why_not_measured(self.gm) if len(policies) > 1 else None
        if unmeasured:  # a transformer, an MLP: nothing (worth measuring) to choose
            self.layout = policies[0]
            program = build_program(self.gm, self.layout, self.engine, threads, self.packed)
            program.policy = f"{self.layout} ({unmeasured})"
            return program
        key = _tuning_key(self.gm, threads, policies) if len(policies) > 1 else None
        cached = tuning_cache.lookup("layout", key) if key else None
        if cached and cached.get("policy") in policies and timed_quietly(cached):
            program = build_program(self.gm, cached["policy"], self.engine, threads, self.packed)
            program.policy = f"{cached['policy']} (tuning cache: {cached.get('measured', 'measured before')})"
            self.layout = cached["policy"]
            return program
        programs = [build_program(self.gm, name, self.engine, threads, self.packed) for name in policies]
        best = 0
        if len(programs) > 1:
            inputs = [t.contiguous() if isinstance(t, torch.Tensor) else t for t in example_inputs]
            with CpuShare(threads) as load:
                seconds = with_threads(threads, _time_policies, programs, inputs)
            best = min(range(len(programs)), key=lambda i: seconds[i])
            timings = ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in zip(policies, seconds))
            programs[best].policy = f"{policies[best]} (measured: {timings}{load.said})"
            if load.quiet:  # a busy CPU's timings serve this compile alone
                tuning_cache.store("layout", key, {"policy": policies[best], "measured": timings,
                                                   "cpu_share": round(load.share, 2)})
        self.layout = policies[best]
        chosen = programs[best]
        if len(programs) > 1:
            self.packed.retain({slot.constant.data_ptr() for slot in chosen.slots if slot.constant is not None})
            for loser in programs:
                if loser is not chosen:
                    loser.close()
            del programs, loser
            give_back_freed_memory(collect_cycles=False)  # closed, the losers are freed without the collector
        return chosen

    def __deepcopy__(self, memo: dict) -> "DnnlRuntime":
        """A runtime with its own frames; graph, primitives and packed weights are shared (read-only)."""
        copied = object.__new__(DnnlRuntime)
        copied.__dict__.update(self.__dict__)
        copied._building = threading.Lock()
        copied.programs = {threads: copy.deepcopy(program, memo) for threads, program in self.programs.items()}
        copied.choosers, copied.unbuildable = {}, dict(self.unbuildable)
        copied._checked_outputs = {}
        copied.first = copied.programs[next(iter(self.programs))]
        return copied

    def __reduce__(self):
        raise TypeError("pyrys: a compiled dnnl program holds oneDNN primitives and cannot be pickled")

    # what the first program says (the program text, memory, profile) -------------------
    @property
    def notes(self) -> list[str]:
        """What the first program's lowering says for ``opt.notes`` (int8 linears run in float32 here); nothing
        where its calls run on the reference backend (:attr:`fault`, which the notes give instead)."""
        if self.fault is not None:
            return []
        said = int8_or_float.note([step.text for step in self.first.steps])
        return [note for note in (said, self.check_note) if note]

    def describe(self) -> str:
        said = f"# every call runs on the reference backend: {self.fault}\n" if self.fault is not None else \
            (f"# {self.check_note}\n" if self.check_note else "")
        return said + self.first.describe()

    def profile(self, inputs: list, runs: int = 20) -> list[tuple[str, float]]:
        return with_threads(self.first.threads, self.first.profile, inputs, runs)

    def memory(self) -> dict[str, int]:
        """Bytes: the graph's constants still held as plain tensors (a released one is counted in its
        packed copy), the packed copies every thread count's program shares, one call's arena, and the
        idle frames of every program."""
        programs = [program.memory() for program in self.programs.values()]
        return {"weights": held_bytes(self.gm), "packed_weights": self.packed.copied_bytes(),
                "activations": max(m["activations"] for m in programs), "frames": sum(m["frames"] for m in programs)}

    def thread_choice(self) -> str:
        """How many threads the calls of the asking thread run with now (its ``torch.get_num_threads()`` picks
        the chooser, as its calls do), and why."""
        if self.pinned is not None:
            return f"{self.pinned} thread{'s' * (self.pinned > 1)} (threads= pins it)"
        if not PER_CALLER_THREADS:
            return "the caller's thread count (not adapted: OpenMP's per-thread count is not reachable here)"
        threads = current_threads()
        if threads == 1:
            return "1 thread (the caller's torch.get_num_threads(): nothing fewer to choose)"
        chooser = self.choosers.get(threads)
        if chooser is None:
            return f"the caller's {threads} threads (no call with {threads} threads yet)"
        failed = "".join(f"; {count} thread{'s' * (count > 1)} not used: its program failed to build ({why})"
                         for count, why in list(self.unbuildable.items()))
        return chooser.describe() + failed

    policy = forwarded("first.policy", "The activation layout chosen, with the measurements when it was measured.")

    @property
    def kernel_choices(self) -> dict[str, dict]:
        """The kernel choices measured for every program built (``attention_kernels.py``), by their key."""
        return {key: choice for program in list(self.programs.values()) for key, choice in program.kernel_choices.items()}

    peak_activation_bytes = forwarded("first.peak_activation_bytes", "One call's activation arena, in bytes.")
    weight_bytes = forwarded("first.weight_bytes", "The packed weights, in bytes.")


class CheckedOutputs:
    """A program's outputs on some inputs (its check's run), for a call on those very inputs, unwritten since."""

    def __init__(self, inputs: list, outputs: list):
        self.inputs, self.outputs = list(inputs), outputs
        self.versions = [self_check.version_of(t) for t in inputs]

    def made_from(self, inputs: list) -> bool:
        """Whether ``inputs`` are the same objects, none written since (a tensor's version: an inference tensor,
        which counts no writes, never is)."""
        return len(inputs) == len(self.inputs) and all(
            a is b and (not isinstance(a, torch.Tensor) or version is not None and self_check.version_of(a) == version)
            for a, b, version in zip(inputs, self.inputs, self.versions))


def _why_not_measured(gm: fx.GraphModule) -> str | None:
    """Why the layout policies need not be timed on ``gm`` (None: they must be).

    With no convolution every policy gives the same program. Where convolutions do under
    ``LAYOUT_MIN_SHARE`` of the multiply-adds (Whisper's and ViT's input convolutions: 5% and 0.7%),
    the choice moves little (ConvNeXt-tiny, 6.6%: blocked8 / nhwc 1.007) and timing it costs a dozen
    calls of the whole model; the first policy (channels-last, the plain rows a linear reads) is taken."""
    if not layout_applies(gm):
        return "no convolution: every layout policy gives this program"
    share = share_of(gm, LAYOUT_CHOOSERS)
    if share is not None and share < LAYOUT_MIN_SHARE:
        return f"convolutions do {share:.1%} of the multiply-adds: not worth timing the layouts"
    return None


def _tuning_key(gm: fx.GraphModule, threads: int, policies: list[str]) -> dict:
    """What a layout decision depends on: the graph (ops, shapes, dtypes; not the weights' values),
    the candidates, the thread count, the CPU's ISA flags and the pyrys and oneDNN versions."""
    return {"graph": format_graph(gm), "candidates": policies, **machine_key(threads)}


def _time_policies(programs: list[DnnlProgram], inputs: list, budget: float = 0.2, min_rounds: int = 3) -> list[float]:
    """Median seconds per call of each program, timed interleaved (one call each per round), for
    ``budget`` seconds and at least ``min_rounds`` rounds, the first (cold) one included: the median
    of three is a warm call (ResNet-50 at batch 1: 3 rounds of 65 ms calls).

    A program whose first call is over 3x the fastest one's is not timed further: it has lost,
    and timing it again could take minutes (a primitive left on oneDNN's reference code)."""
    samples: dict[int, list[float]] = {i: [_seconds(program, inputs)] for i, program in enumerate(programs)}
    fastest = min(times[0] for times in samples.values())
    contenders = [i for i, times in samples.items() if times[0] <= 3 * fastest]
    deadline = time.perf_counter() + budget
    while time.perf_counter() < deadline or len(samples[contenders[0]]) < min_rounds:
        for i in contenders:
            samples[i].append(_seconds(programs[i], inputs))
    return [sorted(times)[len(times) // 2] if i in contenders else times[0] for i, times in samples.items()]


def _seconds(program: DnnlProgram, inputs: list) -> float:
    start = time.perf_counter()
    program(inputs)
    return time.perf_counter() - start


def compile_program(gm: fx.GraphModule, example_inputs: list, options: BackendOptions = BackendOptions(),
                    like=None):
    """The dnnl backend: see :class:`DnnlRuntime` (``like``: a runtime of another shape, or None)."""
    return DnnlRuntime(gm, example_inputs, options, like if isinstance(like, DnnlRuntime) else None)


def keep_held(programs: list, graphs: list[fx.GraphModule]) -> int:
    """Each packing the held runtimes among ``programs`` share keeps only what their programs read or ``graphs``
    (every graph still held) hold: a signature ``max_shapes`` dropped leaves nothing packed behind.  How many
    constants were forgotten."""
    groups: dict[int, list[DnnlRuntime]] = {}
    for program in programs:
        if isinstance(program, DnnlRuntime):
            groups.setdefault(id(program.packed), []).append(program)
    constants = [t for gm in dict.fromkeys(graphs) for t in gm.buffers()]
    forgotten = 0
    for group in groups.values():
        used = {slot.constant.data_ptr() for runtime in group for program in list(runtime.programs.values())
                for slot in program.slots if slot.constant is not None}
        own = [t for runtime in group for t in runtime.gm.buffers()]
        forgotten += group[0].packed.keep_held(used, constants + own)
    return forgotten
