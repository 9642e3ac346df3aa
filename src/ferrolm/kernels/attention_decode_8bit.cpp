// The decode path instantiated for int8, fp8 E4M3 and fp8 E5M2 caches.
#include "attention_decode.h"

namespace ferrolm_attention {
FERROLM_DECODE_INSTANCE(4, I8, I8)
FERROLM_DECODE_INSTANCE(4, E4M3, E4M3)
FERROLM_DECODE_INSTANCE(4, E5M2, E5M2)
FERROLM_DECODE_INSTANCE(8, I8, I8)
FERROLM_DECODE_INSTANCE(8, E4M3, E4M3)
FERROLM_DECODE_INSTANCE(8, E5M2, E5M2)
}  // namespace ferrolm_attention
