import pytest
from pydantic import ValidationError

from ferrolm.config import ENGINE_FLAGS, EngineConfig, env_var
from ferrolm.kv.dtypes import KvCacheDtype


def test_defaults():
    cfg = EngineConfig()
    assert cfg.kv_cache.dtype is KvCacheDtype.FP16
    assert cfg.kv_cache.block_size is None and cfg.kv_cache.memory_gb == 2  # 128, or 16 (per-channel)
    assert cfg.model.name == "smollm2-135m"


@pytest.mark.parametrize("fmt", ["toml", "yaml", "yml", "json"])
def test_file_round_trip(tmp_path, fmt):
    cfg = EngineConfig().with_flags({"kv_cache_dtype": "e4m3", "max_num_seqs": 8, "dtype": "float32"})
    path = tmp_path / f"c.{fmt}"
    cfg.save(path)
    assert "fp8" in path.read_text()  # serialized by its lowercase name
    assert EngineConfig.load(path) == cfg


def test_precedence_flag_over_env_over_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[kv_cache]\ndtype = "bf16"\nmemory_gb = 1.5\n[scheduler]\nmax_num_seqs = 3\n')
    env = {env_var("kv_cache_dtype"): "int8", env_var("max_num_seqs"): "5"}
    cfg = EngineConfig.resolve(path, env=env, flags={"max_num_seqs": 7})
    assert cfg.kv_cache.dtype is KvCacheDtype.INT8  # env over file
    assert cfg.kv_cache.memory_gb == 1.5  # file over default
    assert cfg.scheduler.max_num_seqs == 7  # flag over env
    assert EngineConfig.resolve(env={env_var("config"): str(path)}).kv_cache.dtype is KvCacheDtype.BF16


def test_env_var_names():
    assert env_var("kv-cache-dtype") == "FERROLM_KV_CACHE_DTYPE"
    assert env_var("max_model_len") == "FERROLM_MAX_MODEL_LEN"
    assert {"kv_cache_dtype", "kv_cache_memory_gb", "kv_cache_num_blocks", "max_num_seqs"} <= set(
        ENGINE_FLAGS
    )


def test_bad_values_are_rejected_with_reasons(tmp_path):
    with pytest.raises(ValidationError, match="valid names: fp32, fp16, bf16, int8, fp8, fp8_e5m2, int4"):
        EngineConfig().with_flags({"kv_cache_dtype": "q3"})
    with pytest.raises(ValidationError, match="block_size"):
        EngineConfig().with_flags({"block_size": 0})
    with pytest.raises(TypeError, match="unknown engine setting"):
        EngineConfig().with_flags({"kv_dtype": "int8"})
    bad = tmp_path / "c.toml"
    bad.write_text("[kv_cache]\ndtpye = 'int8'\n")
    with pytest.raises(ValidationError, match="dtpye"):
        EngineConfig.load(bad)
    with pytest.raises(FileNotFoundError):
        EngineConfig.load(tmp_path / "missing.yaml")


def test_block_size_default_depends_on_the_format():
    from ferrolm.kv.spec import KvSpec

    kv = EngineConfig().kv_cache
    assert kv.resolved_block_size(KvSpec.parse("int8", 2)) == 128
    assert kv.resolved_block_size(KvSpec.parse("int4pc/int4", 2)) == 16  # fp16 staging grows with blocks
    chosen = EngineConfig().with_flags({"block_size": 32}, ENGINE_FLAGS).kv_cache
    assert chosen.resolved_block_size(KvSpec.parse("int8", 2)) == 32
