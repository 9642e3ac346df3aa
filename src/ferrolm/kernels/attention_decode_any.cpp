// The decode path instantiated for every other pair and head dim (the format picked per row at run time).
#include "attention_decode.h"

namespace ferrolm_attention {
FERROLM_DECODE_INSTANCE(1, ANY, ANY)
FERROLM_DECODE_INSTANCE(2, ANY, ANY)
FERROLM_DECODE_INSTANCE(4, ANY, ANY)
FERROLM_DECODE_INSTANCE(8, ANY, ANY)
FERROLM_DECODE_INSTANCE(16, ANY, ANY)
}  // namespace ferrolm_attention
