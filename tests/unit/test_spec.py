"""KV specs: parsing, per-layer overrides, rotation, readable names, rejections."""

import pytest

from ferrolm.config import EngineConfig
from ferrolm.kv.dtypes import KvCacheDtype
from ferrolm.kv.spec import KvSpec


def test_split_and_per_layer_specs():
    spec = KvSpec.build(30, "int8", value_dtype="int4", layer_dtypes={"0": "fp16", "-1": "fp16"})
    assert spec.layers[5].key.dtype is KvCacheDtype.INT8 and spec.layers[5].value.dtype is KvCacheDtype.INT4
    assert spec.layers[0].key.dtype is KvCacheDtype.FP16 and spec.layers[29].value.dtype is KvCacheDtype.FP16
    assert spec.describe() == "int8/int4, layers 0,29: fp16"
    assert KvSpec.parse("int8/int4;0=fp16;-1=fp16", 30) == spec
    assert KvSpec.build(4, "fp8").describe() == "fp8"
    assert KvSpec.build(4, "int4", layer_dtypes={"1": "int8/fp8"}).describe() == "int4, layers 1: int8/fp8"


def test_rotation_switch():
    assert KvSpec.build(2, "int4").layers[0].key.rotated
    off = KvSpec.build(2, "int4", rotation="off")
    assert not off.layers[0].key.rotated and off.describe() == "int4+norot"  # differs from the row
    assert KvSpec.build(2, "int8").layers[1].value.rotated  # measured: the rotation helps int8 too
    off8 = KvSpec.build(2, "int8", rotation="off")
    assert not off8.layers[1].value.rotated and off8.describe() == "int8+norot"
    assert not KvSpec.build(2, "fp16", rotation="on").layers[0].key.rotated  # casts never rotate


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(dtype="int3"), "valid names"),
        (dict(dtype="int8/int4/fp8"), "KEY/VALUE"),
        (dict(layer_dtypes={"30": "fp16"}), "valid: 0..29"),
        (dict(layer_dtypes={"-31": "fp16"}), "out of range"),
        (dict(layer_dtypes={"x": "fp16"}), "not an integer"),
        (dict(layer_dtypes={"0": "q3"}), "valid names"),
        (dict(rotation="sometimes"), "valid: auto, on, off"),
    ],
)
def test_bad_specs_are_rejected_with_the_choices(kwargs, word):
    with pytest.raises(ValueError, match=word):
        KvSpec.build(30, **kwargs)


def test_config_carries_the_spec_from_flags_and_env():
    cfg = EngineConfig().with_flags(
        {"kv_cache_dtype": "int8", "kv_cache_value_dtype": "i4", "kv_cache_layer_dtypes": "0=fp16, -1=fp16"}
    )
    assert cfg.kv_cache.spec(30).describe() == "int8/int4, layers 0,29: fp16"
    cfg = EngineConfig.resolve(env={"FERROLM_KV_CACHE_LAYER_DTYPES": '{"2": "int8/int4"}'})
    assert cfg.kv_cache.layer_dtypes == {"2": "int8/int4"}
    with pytest.raises(ValueError, match="valid names"):
        EngineConfig().with_flags({"kv_cache_layer_dtypes": "0=q9"})
    with pytest.raises(ValueError, match="LAYER=DTYPE"):
        EngineConfig().with_flags({"kv_cache_layer_dtypes": "fp16"})
