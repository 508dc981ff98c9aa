// Parameter structs of the gated-delta-rule kernels (same conventions as params.h: 32-bit
// fields only, one setBytes each; buffer binding order written next to each struct).
#pragma once

// ---- recurrent (fused_recurrent_gated_delta_rule) ------------------------------------------

// ---- chunk_local_cumsum, chunk_scaled_dot_kkt, solve_tril, l2norm ---------------------------

// ---- recompute_w_u, chunk_fwd_h, chunk_fwd_o -----------------------------------------------
