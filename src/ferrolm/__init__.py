"""ferrolm: an LLM inference engine whose KV cache precision is a first-class axis."""

from ferrolm.config import EngineConfig, KvCacheConfig, ModelConfig, SchedulerConfig
from ferrolm.engine.engine import LLMEngine
from ferrolm.engine.outputs import CompletionOutput, RequestOutput
from ferrolm.engine.sampling_params import SamplingParams
from ferrolm.kv.dtypes import KvCacheDtype
from ferrolm.llm import LLM

__all__ = [
    "LLM",
    "LLMEngine",
    "SamplingParams",
    "EngineConfig",
    "KvCacheConfig",
    "KvCacheDtype",
    "ModelConfig",
    "SchedulerConfig",
    "RequestOutput",
    "CompletionOutput",
]
__version__ = "0.1.0"
