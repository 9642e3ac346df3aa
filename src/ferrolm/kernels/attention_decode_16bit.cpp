// The decode path instantiated for fp32, fp16 and bf16 caches.
#include "attention_decode.h"

namespace ferrolm_attention {
FERROLM_DECODE_INSTANCE(4, F32, F32)
FERROLM_DECODE_INSTANCE(4, F16, F16)
FERROLM_DECODE_INSTANCE(4, BF16, BF16)
FERROLM_DECODE_INSTANCE(8, F32, F32)
FERROLM_DECODE_INSTANCE(8, F16, F16)
FERROLM_DECODE_INSTANCE(8, BF16, BF16)
}  // namespace ferrolm_attention
