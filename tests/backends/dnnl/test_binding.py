"""The ctypes binding: constants match the headers, errors name the call, lookup is overridable."""

from __future__ import annotations

import enum
import importlib.metadata
import pathlib
import re

import pytest

from pyrys.backends.dnnl import binding, constants

HEADERS = ("dnnl_config.h", "dnnl_common_types.h", "dnnl_types.h")


# ------------------------------------------------------------ header parsing


def _include_dir() -> pathlib.Path:
    try:
        dist = importlib.metadata.distribution("onednn-devel-cpu-gomp")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("onednn-devel-cpu-gomp (oneDNN headers) is not installed")
    for file in dist.files or ():
        if str(file).endswith("oneapi/dnnl/dnnl_types.h"):
            return pathlib.Path(dist.locate_file(file)).parent
    pytest.skip("onednn-devel-cpu-gomp has no oneapi/dnnl/dnnl_types.h")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _value(expr: str, known: dict[str, int]) -> int:
    expr = expr.strip().strip("()").strip()
    if expr in known:
        return known[expr]
    return int(expr.rstrip("uUlL"), 0)


def _parse_enums(text: str) -> dict[str, int]:
    """name -> value for every enumerator, implicit values counted like C does."""
    values: dict[str, int] = {}
    for body in re.findall(r"typedef\s+enum\s*\w*\s*\{(.*?)\}\s*\w+\s*;", text, re.S):
        lines = [line for line in body.splitlines() if not line.strip().startswith("#")]
        previous = -1
        for item in "\n".join(lines).split(","):
            item = item.strip()
            if not item:
                continue
            name, _, expr = item.partition("=")
            previous = _value(expr, values) if expr else previous + 1
            values[name.strip()] = previous
    return values


def _parse_defines(text: str) -> dict[str, int]:
    values: dict[str, int] = {}
    for name, expr in re.findall(r"^\s*#define\s+(DNNL_\w+)[ \t]+([^\n]+)$", text, re.M):
        try:
            values[name] = _value(expr, values)
        except ValueError:
            continue  # not a plain integer macro
    return values


@pytest.fixture(scope="module")
def header_values() -> dict[str, int]:
    include = _include_dir()
    text = _strip_comments("".join((include / name).read_text() for name in HEADERS))
    return _parse_enums(text) | _parse_defines(text)


def _enum_classes() -> list[type[enum.Enum]]:
    return list(constants.C_PREFIX)


# ------------------------------------------------------------ tests


def test_parser_counts_implicit_enumerators(header_values: dict[str, int]) -> None:
    assert header_values["dnnl_format_tag_undef"] == 0
    assert header_values["dnnl_nchw"] == header_values["dnnl_abcd"]
    assert header_values["dnnl_eltwise_tanh"] == header_values["dnnl_eltwise_relu"] + 1


@pytest.mark.parametrize("enum_cls", _enum_classes(), ids=lambda cls: cls.__name__)
def test_enum_values_match_headers(enum_cls: type[enum.Enum], header_values: dict[str, int]) -> None:
    mismatches = []
    for name, member in enum_cls.__members__.items():
        c_name = constants.c_name(enum_cls, name)
        if header_values.get(c_name) != int(member.value):
            mismatches.append(f"{c_name}: pyrys {int(member.value)}, header {header_values.get(c_name)}")
    assert not mismatches, "\n".join(mismatches)


def test_arg_ids_and_macros_match_headers(header_values: dict[str, int]) -> None:
    names = [name for name in vars(constants) if name.startswith("ARG_")] + ["MAX_NDIMS"]
    assert len(names) > 15
    for name in names:
        assert getattr(constants, name) == header_values["DNNL_" + name], name


def test_post_op_arg_macro() -> None:
    # DNNL_ARG_ATTR_MULTIPLE_POST_OP(idx) = BASE * (idx + 1)
    assert constants.arg_attr_multiple_post_op(0) == 32768
    assert constants.arg_post_op_src1(1) == 65536 | 2


# ------------------------------------------------------------ library-backed tests

needs_dnnl = pytest.mark.skipif(not binding.is_available()[0], reason=binding.is_available()[1])


@needs_dnnl
def test_every_declared_function_has_types() -> None:
    lib = binding.load_library()
    for name, restype, argtypes in binding.FUNCTIONS:
        function = getattr(lib, name)
        assert function.restype is restype and tuple(function.argtypes) == tuple(argtypes), name


@needs_dnnl
def test_bad_call_raises_error_naming_call_and_status() -> None:
    from pyrys.backends.dnnl.constants import DataType, FormatTag
    from pyrys.backends.dnnl.descriptors import convolution_pd
    from pyrys.backends.dnnl.primitives import Engine, MemoryDesc

    engine = Engine()
    src = MemoryDesc.from_tag((1, 16, 8, 8), DataType.f32, FormatTag.nchw)
    weights = MemoryDesc.from_tag((16, 8, 3, 3), DataType.f32, FormatTag.oihw)  # 8 != 16 channels
    dst = MemoryDesc.from_tag((1, 16, 8, 8), DataType.f32, FormatTag.nchw)
    with pytest.raises(binding.DnnlError) as info:
        convolution_pd(engine, src, weights, dst, strides=(1, 1), padding_l=(1, 1))
    message = str(info.value)
    assert "dnnl_convolution_forward_primitive_desc_create" in message
    assert "dnnl_invalid_arguments" in message
    assert "convolution" in message and "16x8x3x3" in message
    assert info.value.status == constants.Status.invalid_arguments


@needs_dnnl
def test_prevalidated_checks_arguments_once_against_argtypes() -> None:
    with pytest.raises(TypeError):
        binding.prevalidated("dnnl_primitive_execute", (None, None, "two", None))
    with pytest.raises(TypeError, match="takes 4 arguments"):
        binding.prevalidated("dnnl_primitive_execute", (None, None))


def test_check_raises_with_status_name() -> None:
    with pytest.raises(binding.DnnlError, match=r"dnnl_foo failed with dnnl_unimplemented .*: ctx"):
        binding.check(3, "dnnl_foo", "ctx")
    binding.check(0, "dnnl_foo", "ctx")


def test_env_var_override_is_honoured(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nowhere" / "libdnnl.so.3"
    monkeypatch.setenv(binding.ENV_VAR, str(missing))
    assert binding.library_path() == str(missing)
    ok, reason = binding.is_available()
    assert not ok
    assert str(missing) in reason and "does not exist" in reason
    with pytest.raises(binding.DnnlUnavailable, match="PYRYS_DNNL_LIBRARY"):
        binding.load_library()


def test_env_var_pointing_at_a_non_library(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    fake = tmp_path / "libdnnl.so.3"
    fake.write_text("not a shared object")
    monkeypatch.setenv(binding.ENV_VAR, str(fake))
    ok, reason = binding.is_available()
    assert not ok and "cannot load" in reason


def test_env_var_with_a_relative_path_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    (tmp_path / "libdnnl.so.3").write_text("would run code from the working directory")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(binding.ENV_VAR, "libdnnl.so.3")
    ok, reason = binding.is_available()
    assert not ok and "relative path" in reason and "absolute" in reason
    with pytest.raises(binding.DnnlUnavailable, match="relative path"):
        binding.load_library()
