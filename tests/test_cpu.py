"""CPU feature detection, the ISA caps CI runs under, and the kernel choices made from them: a format this
CPU cannot compute correctly is refused with a message naming the missing feature, never used silently."""

import pytest
import torch

from specgrove import LLM
from specgrove.cpu import ISA_LEVELS, UnsupportedOnCpuError, cpu_features, detect, isa_cap_env
from specgrove.models import linear
from specgrove.models.linear import Linear, check_w8a8, packing_available
from specgrove.models.loader import default_dtype, load_model

AVX2 = {"sse4_2", "avx", "avx2", "fma", "f16c"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
SAPPHIRE = AVX512 | {"avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx_vnni"}


def test_levels_follow_the_flags():
    assert detect(set(), environ={}).level == "scalar"
    assert detect({"avx2", "fma"}, environ={}).level == "scalar"  # AVX2 without F16C is not our AVX2 level
    assert detect(AVX2, environ={}).level == "avx2"
    assert detect(AVX512, environ={}).level == "avx512"
    assert detect(AVX512 | {"avx512_bf16"}, environ={}).level == "avx512"  # BF16 without VNNI: the ladder stops
    assert detect(AVX512 | {"avx512_vnni", "avx512_bf16"}, environ={}).level == "avx512_bf16"
    assert detect(SAPPHIRE, environ={}).level == "amx"


def test_what_each_machine_may_run():
    avx2, skylake = detect(AVX2, environ={}), detect(AVX512, environ={})
    cascade = detect(AVX512 | {"avx512_vnni"}, environ={})
    sapphire = detect(SAPPHIRE, environ={})
    assert not avx2.bf16_prepack and not avx2.int8_exact and not avx2.fast_bf16
    assert skylake.bf16_prepack and not skylake.int8_exact  # AVX-512 without VNNI still saturates int16 pairs
    assert cascade.int8_exact and not cascade.fast_bf16
    assert sapphire.bf16_prepack and sapphire.int8_exact and sapphire.fast_bf16
    # An AVX2 machine with AVX-NE-CONVERT (e.g. newer client cores) can prepack bf16.
    assert detect(AVX2 | {"avx_ne_convert"}, environ={}).bf16_prepack


@pytest.mark.parametrize("level", ISA_LEVELS)
def test_caps_lower_the_level_and_name_themselves(level):
    features = detect(SAPPHIRE, environ=isa_cap_env(level))
    assert features.level == level and features.detected_level == "amx"
    if level != "amx":
        assert "capped from amx" in features.describe()
        assert "avx_vnni" not in features.flags  # a capped run stands for the plain machine of that level
    assert set(features.as_dict()["caps"]) == {"SPECGROVE_MAX_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"}
    # A cap never raises the level above what the CPU has.
    assert detect(AVX2, environ=isa_cap_env(level)).level == ISA_LEVELS[min(ISA_LEVELS.index(level), 1)]


def test_each_library_cap_alone_is_honoured():
    assert detect(SAPPHIRE, environ={"ONEDNN_MAX_CPU_ISA": "AVX2"}).level == "avx2"
    assert detect(SAPPHIRE, environ={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}).level == "avx512_vnni"
    assert detect(SAPPHIRE, environ={"ATEN_CPU_CAPABILITY": "default"}).level == "scalar"
    assert detect(SAPPHIRE, environ={"ATEN_CPU_CAPABILITY": "avx512"}).level == "amx"
    with pytest.raises(ValueError, match="SPECGROVE_MAX_ISA"):
        detect(SAPPHIRE, environ={"SPECGROVE_MAX_ISA": "avx9000"})
    with pytest.raises(ValueError, match="ONEDNN_MAX_CPU_ISA"):
        detect(SAPPHIRE, environ={"ONEDNN_MAX_CPU_ISA": "NEON"})


@pytest.fixture
def avx512_without_vnni(monkeypatch):
    """Pretend to be an AVX-512 CPU without VNNI: fbgemm would saturate there."""
    fake = detect(AVX512, "fake Skylake-SP", environ={})
    monkeypatch.setattr(linear, "cpu_features", lambda: fake)
    return fake


def test_w8a8_is_refused_without_vnni(avx512_without_vnni):
    with pytest.raises(UnsupportedOnCpuError, match="AVX-512 VNNI") as info:
        check_w8a8("cpu")
    assert "fake Skylake-SP" in str(info.value) and "int4" in str(info.value)  # names the CPU and the way out
    assert not linear.w8a8_available("cpu")
    with pytest.raises(UnsupportedOnCpuError, match="AVX-512 VNNI"):
        Linear(torch.randn(16, 32), None, packed=False, quantization="w8a8")


def test_this_machine_refuses_what_it_cannot_compute(tiny_dirs):
    features = cpu_features()
    if features.int8_exact:
        assert linear.w8a8_available("cpu")
    else:
        with pytest.raises(UnsupportedOnCpuError, match="AVX-512 VNNI"):
            load_model(tiny_dirs["target"], dtype="float32", quantization="w8a8")
        with pytest.raises(UnsupportedOnCpuError, match="AVX-512 VNNI"):
            LLM(target=tiny_dirs["target"], dtype="float32", quantization="w8a8")
    # bf16 prepacking only where oneDNN can reorder bf16 weights; elsewhere a bf16 model still loads, unpacked.
    assert packing_available(torch.device("cpu"), torch.bfloat16) == (
        features.bf16_prepack and torch.backends.mkldnn.is_available()
    )
    model = load_model(tiny_dirs["target"], dtype="bfloat16").model
    assert model.packed == packing_available(torch.device("cpu"), torch.bfloat16)
    if not features.bf16_prepack:
        with pytest.raises(UnsupportedOnCpuError, match="AVX-512 BW/VL/DQ"):
            Linear(torch.randn(16, 32, dtype=torch.bfloat16), None, packed=True)


def test_auto_dtype_is_the_fast_correct_one():
    expected = torch.bfloat16 if cpu_features().fast_bf16 else torch.float32
    assert default_dtype("cpu") == expected
