// summarize_moe_stats: the per-layer router statistics of a step from the recorded per-expert
// counts — the dropped fraction is a brute-force count against the capacity.
#include <gtest/gtest.h>

#include "train/moe_metrics.h"

namespace tessera {
namespace {

TEST(MoeMetrics, SummarizesLossesLoadAndDroppedSlots) {
  MoeLayerStats st;
  st.layer = 3;
  st.num_experts = 4;
  st.topk = 2;
  st.tokens = 6;    // 12 slots per micro-batch, mean 3 per expert
  st.capacity = 4;  // slots past 4 per expert are dropped
  st.aux = {0.5, 0.25};
  st.z = {0.125, 0.375};
  st.tokens_per_expert = {{6, 4, 2, 0}, {3, 3, 3, 3}};  // drops 2, then none
  const auto m = summarize_moe_stats({st});
  ASSERT_EQ(m.size(), 1u);
  EXPECT_EQ(m[0].layer, 3);
  EXPECT_DOUBLE_EQ(m[0].aux_loss, 0.375);
  EXPECT_DOUBLE_EQ(m[0].z_loss, 0.25);
  EXPECT_DOUBLE_EQ(m[0].max_tokens, 4.5);  // (6 + 3) / 2
  EXPECT_DOUBLE_EQ(m[0].mean_tokens, 3.0);
  EXPECT_DOUBLE_EQ(m[0].dropped, 2.0 / 24.0);
}

TEST(MoeMetrics, DroplessDropsNothing) {
  MoeLayerStats st;
  st.num_experts = 2;
  st.topk = 1;
  st.tokens = 4;
  st.capacity = 0;
  st.aux = {0.0};
  st.z = {0.0};
  st.tokens_per_expert = {{4, 0}};
  const auto m = summarize_moe_stats({st});
  EXPECT_DOUBLE_EQ(m[0].dropped, 0.0);
  EXPECT_DOUBLE_EQ(m[0].max_tokens, 4.0);
  EXPECT_DOUBLE_EQ(m[0].mean_tokens, 2.0);
}

}  // namespace
}  // namespace tessera
