// The decode path instantiated for 4-bit caches (both halves, or int8 keys over 4-bit values).
#include "attention_decode.h"

namespace ferrolm_attention {
FERROLM_DECODE_INSTANCE(4, LUT4, LUT4)
FERROLM_DECODE_INSTANCE(4, I8, LUT4)
FERROLM_DECODE_INSTANCE(8, LUT4, LUT4)
FERROLM_DECODE_INSTANCE(8, I8, LUT4)
}  // namespace ferrolm_attention
